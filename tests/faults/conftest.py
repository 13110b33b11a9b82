"""The per-ABI fault bed shared by the sandboxed fault tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from luo_agent.kernel.device import Abi

from .harness import SANDBOX_UNAVAILABLE, FaultBed

needs_sandbox = pytest.mark.skipif(
    SANDBOX_UNAVAILABLE is not None,
    reason=f"real systemd user manager unavailable: {SANDBOX_UNAVAILABLE}",
)


@pytest.fixture
async def bed(abi: Abi, tmp_path: Path) -> AsyncIterator[FaultBed]:
    """An emulated machine of one ABI, cold-booted; its sandboxes and agent bus are closed and the
    machine powered off afterwards."""
    fb = FaultBed(tmp_path, str(abi))
    fb.machine.boot()
    try:
        yield fb
    finally:
        fb.close()
        fb.machine.poweroff()
