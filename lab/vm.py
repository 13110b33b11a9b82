"""Boots the lab kernel under QEMU with the host's root over 9p and runs a job across kexecs.

The job is a shell script run in the VM by ``init.sh`` (as PID 1's child, or by systemd as
``lab-job.service``).  It may kexec: the next kernel gets the same command line, so the same init
runs again with ``LAB_BOOT`` one higher and the same job continues where the boot counter says.
When the job returns, its exit status is written to the run directory and the VM powers off.  A VM
that does not end by the deadline is killed and reported as ``timeout``; one that ends without a
status (a panic, a kexec that never came back) as ``crashed``: never as a pass.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

INIT = Path(__file__).with_name("init.sh").resolve()
# Console lines containing MARK put a VM clock reading next to the host's arrival time in
# serial.timed (lab/results.py reads them): the clock that a kexec in the VM does not reset.
MARK = "lab-mark: "
QEMU = "qemu-system-x86_64"
# Kernel command line of every lab boot (kexec --reuse-cmdline carries it to the next kernel).
BASE_APPEND = (
    "console=ttyS0 root=/dev/root rootfstype=9p ro "
    "rootflags=trans=virtio,version=9p2000.L,msize=512000,cache=loose "
    "liveupdate=1 kho=on nokaslr panic=-1 oops=panic loglevel=4"
)

# A read-only export of a whole tree spans several devices: remap their inode numbers.
_9P_OPTIONS = "security_model=none,multidevs=remap"

RUN_JOB = """\
# Written by lab/vm.py: runs this boot's job and records its status.
cd /
status_file="$LAB_RUN/status.$LAB_BOOT"
{ sh "$LAB_RUN/job"; echo $? > "$status_file"; } 2>&1 | tee "$LAB_RUN/job.$LAB_BOOT.log"
status=$(cat "$status_file" 2>/dev/null || echo 255)
echo "$status" > "$LAB_RUN/exit"
sync
echo "lab: job exited with $status (boot $LAB_BOOT)"
if [ "$LAB_MODE" = systemd ]; then
    systemctl --no-block poweroff
fi
"""


def qemu_missing_reason() -> str | None:
    """Why a lab VM cannot run on this machine, or None when it can."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} is not installed (Debian package qemu-system-x86)"
    if os.geteuid() != 0:
        return "the lab VM shares the host root over 9p and needs root"
    return None


@dataclass
class VmResult:
    status: str  # "exited" | "timeout" | "crashed" | "cut" (killed on the job's request)
    exit_code: int | None
    boots: int
    elapsed: float
    run_dir: Path
    serial_log: Path
    reason: str = ""
    boot_status: dict[int, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "exited" and self.exit_code == 0

    def describe(self) -> str:
        what = {
            "exited": f"job exited with {self.exit_code}",
            "timeout": "VM killed at the timeout",
            "crashed": f"VM ended without a job status ({self.reason})",
            "cut": "VM killed on the job's request (a power cut)",
        }[self.status]
        return f"{what} after {self.boots} boot(s), {self.elapsed:.0f} s (log: {self.serial_log})"

    def job_log(self, boot: int) -> str:
        path = self.run_dir / f"job.{boot}.log"
        return path.read_text(errors="replace") if path.exists() else ""


@dataclass
class Vm:
    kernel: Path
    memory: str = "2G"
    mode: str = "job"  # "job": init runs the job; "systemd": systemd is PID 1
    root: Path | None = None  # a root file system of its own (else the host's root)
    extra_append: str = ""
    echo: IO[str] | None = None  # where to copy the serial console live (None: only the log)
    qemu_args: list[str] = field(default_factory=list)
    # An ordinary reboot in the VM boots it again (QEMU resets the machine) instead of ending the
    # run; a panic then reboots too (panic=-1), and only the boot count and the timeout tell.
    reboots: bool = False

    def command(self, run_dir: Path) -> list[str]:
        append = f"{BASE_APPEND} LAB_RUN={run_dir} LAB_MODE={self.mode}"
        shares = [
            *("-fsdev", "local,id=hostroot,path=/,readonly=on," + _9P_OPTIONS),
            *("-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=/dev/root"),
            *("-fsdev", f"local,id=lab,path={run_dir},security_model=none"),
            *("-device", "virtio-9p-pci,fsdev=lab,mount_tag=lab"),
        ]
        if self.root is not None:
            shares += [
                *("-fsdev", f"local,id=sysroot,path={self.root},readonly=on," + _9P_OPTIONS),
                *("-device", "virtio-9p-pci,fsdev=sysroot,mount_tag=sysroot"),
            ]
            append += " LAB_ROOT_TAG=sysroot"
        append += f" init={INIT} {self.extra_append}".rstrip()
        # TCG, one thread: nested KVM hangs on these machines and MTTCG once oopsed.
        machine = f"-accel tcg,thread=single -cpu max -smp 1 -m {self.memory}".split()
        plain = ["-nodefaults", "-no-user-config"] + ([] if self.reboots else ["-no-reboot"])
        plain += ["-display", "none", "-monitor", "none"]
        return [
            QEMU,
            *machine,
            *plain,
            "-serial",
            "stdio",
            "-kernel",
            str(self.kernel),
            "-append",
            append,
            *shares,
            *self.qemu_args,
        ]

    def run(
        self,
        job: str,
        run_dir: Path,
        timeout: float,
        *,
        systemd_setup: str = "",
        power_cut: bool = False,
        cold_boot: bool = False,
    ) -> VmResult:
        """Runs ``job`` (shell text) in the VM; ``run_dir`` must be empty or absent.

        ``power_cut``: once the job creates ``$LAB_RUN/power-cut``, QEMU is killed (SIGKILL: no
        shutdown, nothing flushed that the guest had not written through to the 9p share) and
        the result is ``cut``.  ``cold_boot``: boot again on the run directory of such a run
        (its boot counter goes on, the job sees ``LAB_BOOT`` one higher): a power cycle."""
        run_dir = run_dir.resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        if cold_boot:
            (run_dir / "power-cut").unlink(missing_ok=True)
        elif any(run_dir.iterdir()):
            raise ValueError(f"{run_dir} is not empty: one run directory per VM run")
        (run_dir / "job").write_text(job)
        (run_dir / "run-job").write_text(RUN_JOB)
        if systemd_setup:
            (run_dir / "systemd-setup").write_text(systemd_setup)
        serial_log = run_dir / "serial.log"
        command = self.command(run_dir)
        (run_dir / "qemu.cmd").write_text(shlex.join(command) + "\n")
        started = time.monotonic()
        mode = "a" if cold_boot else "w"  # one console log across the power cycles
        with (
            open(serial_log, mode) as log,
            open(run_dir / "serial.timed", mode) as timed,
        ):
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            assert proc.stdout is not None
            copier = threading.Thread(
                target=_copy, args=(proc.stdout, log, timed, self.echo), daemon=True
            )
            copier.start()
            timed_out = cut = False
            try:
                if power_cut:
                    cut = _cut_when_asked(proc, run_dir / "power-cut", started + timeout)
                proc.wait(max(0.0, started + timeout - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
                proc.kill()
                proc.wait()
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            copier.join(10)
            proc.stdout.close()
        elapsed = time.monotonic() - started
        if cut:
            boots = int((run_dir / "boots").read_text().strip() or 0)
            return VmResult("cut", None, boots, elapsed, run_dir, serial_log, "power cut")
        return _result(run_dir, serial_log, elapsed, timed_out, proc.returncode)


def _cut_when_asked(proc: subprocess.Popen[bytes], request: Path, deadline: float) -> bool:
    """Kill QEMU as soon as ``request`` exists (checked every 50 ms): a power cut."""
    while time.monotonic() < deadline and proc.poll() is None:
        if request.exists():
            proc.kill()
            proc.wait()
            return True
        time.sleep(0.05)
    return False


def _copy(src: IO[bytes], log: IO[str], timed: IO[str], echo: IO[str] | None) -> None:
    for raw in iter(src.readline, b""):
        arrived = time.time()
        line = raw.decode(errors="replace").replace("\r", "")
        log.write(line)
        log.flush()
        # The host's clock on each console line: unlike the VM's clocks, a kexec in the VM does
        # not reset it; for intervals that span boots (serial latency is well under a millisecond).
        timed.write(f"{arrived:.6f} {line}")
        timed.flush()
        if echo is not None:
            echo.write(line)
            echo.flush()


def _result(
    run_dir: Path, serial_log: Path, elapsed: float, timed_out: bool, qemu_rc: int
) -> VmResult:
    boots = int((run_dir / "boots").read_text().strip() or 0) if (run_dir / "boots").exists() else 0
    boot_status = {
        int(p.suffix[1:]): int(p.read_text().strip() or 255)
        for p in run_dir.glob("status.*")
        if p.suffix[1:].isdigit()
    }
    exit_file = run_dir / "exit"
    if timed_out:
        return VmResult(
            "timeout",
            None,
            boots,
            elapsed,
            run_dir,
            serial_log,
            "killed at the timeout",
            boot_status,
        )
    if exit_file.exists():
        return VmResult(
            "exited",
            int(exit_file.read_text().strip() or 255),
            boots,
            elapsed,
            run_dir,
            serial_log,
            "",
            boot_status,
        )
    serial = serial_log.read_text(errors="replace")
    panic = re.search(r"Kernel panic - not syncing: .*", serial)
    reason = panic.group(0) if panic else f"qemu exited with {qemu_rc}, no status written"
    return VmResult("crashed", None, boots, elapsed, run_dir, serial_log, reason, boot_status)


def console_lines(run_dir: Path, pattern: str) -> list[tuple[float, str]]:
    """(host CLOCK_REALTIME arrival, line) of the console lines of a run matching ``pattern``."""
    timed = run_dir / "serial.timed"
    if not timed.exists():
        return []
    found = []
    for line in timed.read_text(errors="replace").splitlines():
        stamp, _, text = line.partition(" ")
        if re.search(pattern, text):
            found.append((float(stamp), text))
    return found
