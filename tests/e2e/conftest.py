"""Fixtures for end-to-end tests: the emulated machine plus a real systemd user manager running the
project's own units/ (``luo_agent.testbed.Testbed``), once per kernel ABI."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from luo_agent.kernel.device import Abi
from luo_agent.sandbox import missing_requirements
from luo_agent.testbed import Testbed

SANDBOX_UNAVAILABLE = missing_requirements()
ABIS = (Abi.SESSION, Abi.V3, Abi.RFC_V2)
# Small enough to keep a whole update well under a second of copying, large enough to span pages.
DATA_SIZE = 256 << 10


needs_sandbox = pytest.mark.skipif(
    SANDBOX_UNAVAILABLE is not None,
    reason=f"real systemd user manager unavailable: {SANDBOX_UNAVAILABLE}",
)


@pytest.fixture(params=ABIS)
def testbed(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Testbed]:
    """An emulated machine (cold-booted) of one ABI; tests boot sandboxes on it.  The machine is
    powered off afterwards; each sandbox is stopped by the test's ExitStack, which raises if any
    of its processes survive."""
    bed = Testbed(tmp_path / "host", str(request.param), size=DATA_SIZE)
    bed.machine.boot()
    try:
        yield bed
    finally:
        bed.machine.poweroff()
