"""Big memory on the real LUO kernel (by hand: ``./scripts/vm bigmem``; not in CI).

* ``carry``: the whole live update of ``lab/liveupdate.py`` with the example participant's memfd
  made hundreds of MiB (a drop-in gives the workload ``--size``), in a VM with as much memory as
  asked for: the participant verifies every byte (SHA-256) and the position after the kexec.
* ``limit`` (job mode, no systemd): in one session after another, memfds of ``--step`` MiB each
  are filled and preserved until the kernel refuses one or the VM's free memory runs low; the
  errno of the refusal and the memory figures are printed as JSON.  Then the sessions are closed
  and the memory is measured again: what the kernel took back.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path
from typing import IO, Any

from .liveupdate import BOOKWORM, REPO, VENV_PYTHON, Host, UpdateRun, summarize, whole_update_job
from .rootfs import PRIVATE_ENV
from .systemd_job import systemd_vm
from .vm import Vm, VmResult

CHUNK = 4 << 20
# The example workload's unit and the drop-in that sizes its memfd.
SIZE_DROPIN = """\
mkdir -p "$root/etc/systemd/system/luo-example-workload.service.d"
cat > "$root/etc/systemd/system/luo-example-workload.service.d/lab-size.conf" <<'UNIT'
[Service]
ExecStart=
ExecStart={python} -m luo_agent.examples.participant serve --size {size}
TimeoutStartSec=900
UNIT
mkdir -p "$root/etc/systemd/system/luo-example-restore.service.d"
cat > "$root/etc/systemd/system/luo-example-restore.service.d/lab-timeout.conf" <<'UNIT'
[Service]
TimeoutStartSec=900
UNIT
"""


def run_carry(
    kernel: Path,
    size_mib: int,
    memory: str,
    run_dir: Path,
    *,
    host: Host = BOOKWORM,
    echo: IO[str] | None = None,
) -> UpdateRun:
    """The whole update carrying a ``size_mib`` MiB memfd in a VM of ``memory``."""
    python = f"{PRIVATE_ENV}/bin/python3"  # the example units' interpreter on both hosts
    sizing = "\n" + SIZE_DROPIN.format(python=python, size=size_mib << 20)
    vm, job, setup = systemd_vm(
        kernel, host, whole_update_job, install_extra=sizing, memory=memory, echo=echo
    )
    result = vm.run(job, run_dir, 1800.0, systemd_setup=setup)
    run = UpdateRun("big-memory", result, {})
    run.summary = summarize(run)
    (run_dir / "summary.json").write_text(json.dumps(run.summary, indent=2) + "\n")
    return run


def run_limit(
    kernel: Path, step_mib: int, memory: str, run_dir: Path, *, echo: IO[str] | None = None
) -> VmResult:
    job = (
        f"cd {REPO} && {VENV_PYTHON} -m lab.bigmem limit {step_mib} "
        '"$LAB_RUN/limit-steps.jsonl" > "$LAB_RUN/limit.json"\n'
    )
    return Vm(kernel, memory=memory, echo=echo).run(job, run_dir, 1800.0)


# ------------------------------------------------------------------------------ in the VM


def meminfo() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        fields[name] = int(rest.split()[0])
    keys = ("MemTotal", "MemFree", "MemAvailable", "Shmem", "CmaTotal", "CmaFree")
    return {k: fields.get(k, -1) for k in keys}


def limit(step_mib: int, out_file: IO[str]) -> dict[str, Any]:
    """Each step is also written to ``out_file`` at once: the OOM killer may end this process."""
    sys.path.insert(0, str(REPO))
    from luo_agent.kernel.syscalls import DEVICE_PATH, RealSyscalls
    from tests.kernel import luo_raw

    sc = RealSyscalls()
    dev = os.open(DEVICE_PATH, os.O_RDWR | os.O_CLOEXEC)
    steps: list[dict[str, Any]] = []
    held: list[tuple[int, int]] = []
    out: dict[str, Any] = {"step_mib": step_mib, "before": meminfo(), "steps": steps}
    chunk = b"\xa5" * CHUNK
    try:
        while True:
            now = meminfo()
            # Pinning moves the pages out of the KHO scratch (CMA): count only memory outside it.
            if now["MemAvailable"] - now["CmaFree"] < (step_mib + 160) << 10:
                out["stopped"] = "memory outside the KHO scratch ran low before the kernel refused"
                break
            fd = os.memfd_create(f"big-{len(held)}", os.MFD_CLOEXEC)
            for offset in range(0, step_mib << 20, CHUNK):
                os.pwrite(fd, chunk, offset)
            sess = luo_raw.create_session(sc, dev, f"big-{len(held)}")
            try:
                luo_raw.preserve_fd(sc, sess, fd, 1)
            except OSError as exc:
                name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
                steps.append({"preserved_mib": len(held) * step_mib, "refused": name})
                print(json.dumps(steps[-1]), file=out_file, flush=True)
                out["refused"] = {"errno": name, "after_mib": len(held) * step_mib}
                os.close(sess)
                os.close(fd)
                break
            held.append((sess, fd))
            steps.append({"preserved_mib": len(held) * step_mib, "meminfo": meminfo()})
            print(json.dumps(steps[-1]), file=out_file, flush=True)
        out["at_the_end"] = meminfo()
    finally:
        for sess, fd in held:
            os.close(sess)  # an outgoing session closed: the kernel unpreserves its files
            os.close(fd)
        os.close(dev)
    out["after_closing"] = meminfo()
    return out


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) == 3 and args[0] == "limit":
        with open(args[2], "a") as steps:
            print(json.dumps(limit(int(args[1]), steps)))
        return 0
    print("usage: python -m lab.bigmem limit STEP_MIB STEPS_FILE (in the VM)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
