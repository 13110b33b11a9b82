"""Fixtures for tests against a real systemd user manager in a private mount namespace."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from luo_agent.sandbox import Sandbox, missing_requirements
from luo_agent.systemd.pystemd_gate import PystemdGate

SANDBOX_UNAVAILABLE = missing_requirements()

needs_sandbox = pytest.mark.skipif(
    SANDBOX_UNAVAILABLE is not None,
    reason=f"real systemd user manager unavailable: {SANDBOX_UNAVAILABLE}",
)


def _bus_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "systemd-bus"]


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    """A fresh manager per test; afterwards nothing of it may be left running."""
    box = Sandbox(tmp_path / "sandbox")
    box.start()
    assert box.processes(), "the sandbox runs its manager"
    try:
        yield box
    finally:
        box.stop()  # raises if processes or cgroups survive
    assert box.processes() == []


@pytest.fixture
async def gate(sandbox: Sandbox) -> AsyncIterator[PystemdGate]:
    assert _bus_threads() == []
    gate = PystemdGate(user_mode=True, bus_address=sandbox.bus_address)
    try:
        yield gate
    finally:
        await gate.close()
    assert _bus_threads() == []
