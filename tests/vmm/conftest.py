"""Fixtures of the VM participant's tests: the tiny guest built once per session (binutils), and
a skip when QEMU or binutils are missing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from luo_agent.sandbox import missing_requirements
from luo_agent.vmm.guest import build_guest

QEMU = "qemu-system-x86_64"
MISSING = next(
    (f"{tool} not installed" for tool in (QEMU, "as", "ld") if shutil.which(tool) is None), None
)
needs_qemu = pytest.mark.skipif(MISSING is not None, reason=f"no VM here: {MISSING}")
SANDBOX_UNAVAILABLE = missing_requirements()
# A guest under a real systemd user manager (luo_agent.testbed).
needs_sandbox_and_qemu = [
    pytest.mark.systemd,
    pytest.mark.root,
    needs_qemu,
    pytest.mark.skipif(
        SANDBOX_UNAVAILABLE is not None,
        reason=f"real systemd user manager unavailable: {SANDBOX_UNAVAILABLE}",
    ),
]


@pytest.fixture(scope="session")
def guest_kernel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if MISSING is not None:
        pytest.skip(f"no VM here: {MISSING}")
    return build_guest(tmp_path_factory.mktemp("guest"))
