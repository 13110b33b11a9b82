"""The VM tier: tests that boot the lab's real LUO kernel under QEMU (``lab/``).

They run wherever QEMU can (root, ``qemu-system-x86_64`` installed) and skip with the reason
elsewhere.  The kernel is built once per machine and cached (``./scripts/vm kernel``); the first
fixture call builds it if ``./scripts/test`` has not already.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from lab.build import KernelBuild, ensure_kernel
from lab.vm import Vm, VmResult, qemu_missing_reason

# The first VM test of a cold run may build the kernel (minutes on 2 cores).
VM_TEST_TIMEOUT = int(os.environ.get("LUO_VM_TEST_TIMEOUT", "1800"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.vm)
            item.add_marker(pytest.mark.timeout(VM_TEST_TIMEOUT))


@pytest.fixture(scope="session")
def lab_kernel() -> KernelBuild:
    reason = qemu_missing_reason()
    if reason is not None:
        pytest.skip(f"no lab VM here: {reason}")
    return ensure_kernel()


RunInVm = Callable[..., VmResult]


@pytest.fixture
def run_in_vm(lab_kernel: KernelBuild, request: pytest.FixtureRequest) -> RunInVm:
    """Runs a shell job in a fresh VM; the run directory (serial log, job logs) is kept under
    $LUO_LAB_RUNS (default: a temporary directory) and named after the test."""
    base = Path(os.environ.get("LUO_LAB_RUNS") or tempfile.mkdtemp(prefix="luo-lab-runs-"))
    name = request.node.name.replace("/", "_").replace("[", "-").replace("]", "")

    def run(job: str, timeout: float = 300.0, **vm_args: object) -> VmResult:
        run_dir = base / name
        n = 1
        while run_dir.exists():
            n += 1
            run_dir = base / f"{name}.{n}"
        vm = Vm(lab_kernel.bzimage, **vm_args)  # type: ignore[arg-type]
        return vm.run(job, run_dir, timeout)

    return run
