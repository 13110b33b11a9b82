"""The lab itself: a job's status comes back, a kexec continues the job in the next kernel, and a
VM that hangs or ends without a status is never reported as a pass."""

from __future__ import annotations

from lab.build import KernelBuild
from tests.vm.conftest import RunInVm


def test_job_status_and_output_come_back(run_in_vm: RunInVm) -> None:
    result = run_in_vm("echo marker-$((6*7)); test -c /dev/liveupdate || exit 4; exit 3")
    assert result.status == "exited", result.describe()
    assert result.exit_code == 3
    assert "marker-42" in result.job_log(1)
    assert result.boots == 1


def test_job_continues_across_a_real_kexec(run_in_vm: RunInVm, lab_kernel: KernelBuild) -> None:
    job = (
        'if [ "$LAB_BOOT" = 1 ]; then\n'
        f"  kexec -l -s --reuse-cmdline {lab_kernel.bzimage} && kexec -e\n"
        "  exit 9\n"
        "fi\n"
        "dmesg | grep -q 'luo: Retrieved live update data' || exit 5\n"
        'echo "boot $LAB_BOOT"\n'
    )
    result = run_in_vm(job)
    assert result.ok, result.describe()
    assert result.boots == 2
    assert "boot 2" in result.job_log(2)


def test_a_hung_vm_is_killed_and_reported_as_a_timeout(run_in_vm: RunInVm) -> None:
    result = run_in_vm("sleep 3600", timeout=30)
    assert result.status == "timeout"
    assert not result.ok
    assert "killed at the timeout" in result.describe()


def test_a_vm_that_ends_without_a_status_is_a_crash(run_in_vm: RunInVm) -> None:
    # Powers the VM off behind the job runner's back: no status is ever written.
    result = run_in_vm(
        "sync; python3 -c 'import ctypes; ctypes.CDLL(None).reboot(0x4321FEDC)'; sleep 60"
    )
    assert result.status == "crashed", result.describe()
    assert not result.ok
    assert result.exit_code is None
