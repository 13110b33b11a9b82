"""Fixtures: an emulated machine, the agent as a process, on a private session bus (fast tests) or
on a real system bus with a real polkitd in a private mount namespace (authorisation tests)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from luo_agent.dbus.names import IFACE_MANAGER
from luo_agent.kernel.device import Abi
from luo_agent.kernel.emulator import EmulatedMachine
from tests.agent_host import AgentProcess
from tests.security.harness import (
    PolkitNamespace,
    SessionBus,
    missing_requirements,
)
from tests.security.wire import perform_all

UNAVAILABLE = missing_requirements()
needs_root_namespaces = pytest.mark.skipif(
    UNAVAILABLE is not None, reason=f"security harness unavailable: {UNAVAILABLE}"
)
# The agent's limits in these tests: small, so the limits are reached with a handful of calls.
LIMITS = "[limits]\nmax_sessions = 3\nmax_fds_per_session = 2\nmax_fds_total = 4\n"


def get(prop: str) -> dict[str, Any]:
    return {
        "interface": "org.freedesktop.DBus.Properties",
        "member": "Get",
        "signature": "ss",
        "body": [IFACE_MANAGER, prop],
    }


async def wait_phase(address: str, wanted: str, limit: float = 15.0) -> None:
    """Wait (polling the Phase property) until the agent reports ``wanted``."""
    deadline = time.monotonic() + limit
    while True:
        (result,) = await perform_all(address, [get("Phase")])
        phase = result["body"][0]["$variant"][1] if not result["error"] else result["error"]
        if phase == wanted:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"agent phase {phase!r}, not {wanted!r}, after {limit}s")
        await asyncio.sleep(0.02)


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[EmulatedMachine]:
    box = EmulatedMachine(tmp_path / "machine", Abi.SESSION)
    box.boot()
    try:
        yield box
    finally:
        box.poweroff()


@pytest.fixture
def session_bus(tmp_path: Path) -> Iterator[SessionBus]:
    if UNAVAILABLE is not None:
        pytest.skip(f"security harness unavailable: {UNAVAILABLE}")
    with SessionBus(tmp_path / "session-bus") as bus:
        yield bus


@pytest.fixture
def session_agent(
    tmp_path: Path, machine: EmulatedMachine, session_bus: SessionBus
) -> Iterator[AgentProcess]:
    """The agent on the private session bus (callers of its own uid are authorised)."""
    agent = AgentProcess(tmp_path / "agent", machine, "session", env=session_bus.env, config=LIMITS)
    try:
        yield agent
    finally:
        agent.stop()


@pytest.fixture(scope="module")
def polkit_ns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PolkitNamespace]:
    """One namespace (system bus + polkitd) per module; afterwards no process of it may be left."""
    if UNAVAILABLE is not None:
        pytest.skip(f"security harness unavailable: {UNAVAILABLE}")
    ns = PolkitNamespace(tmp_path_factory.mktemp("polkit-ns"))
    with ns:
        assert ns.namespace_pids(), "the namespace runs its bus and polkitd"
        yield ns
    assert ns.leftovers() == []
