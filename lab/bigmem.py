"""Big memory on the real LUO kernel (by hand: ``./scripts/vm bigmem``; not in CI).

* ``carry``: the whole live update of ``lab/liveupdate.py`` with the example participant's memfd
  made hundreds of MiB (a drop-in gives the workload ``--size``), in a VM with as much memory as
  asked for: the participant verifies every byte (SHA-256) and the position after the kexec.
* ``limit`` (job mode, no systemd): in one session after another, memfds of ``--step`` MiB each
  are filled and preserved until the kernel refuses one or the VM's free memory runs low; the
  errno of the refusal and the memory figures are printed as JSON.  Then the sessions are closed
  and the memory is measured again: what the kernel took back.  The VM runs ``limit`` of
  ``lab/in_vm.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO

from .guest_setup import BOOKWORM, VENV_PYTHON, Host
from .results import UpdateRun, summarize
from .rootfs import PRIVATE_ENV, REPO
from .scenarios import whole_update_job
from .systemd_job import systemd_vm
from .vm import Vm, VmResult

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
        f"cd {REPO} && {VENV_PYTHON} -m lab.in_vm limit {step_mib} "
        '"$LAB_RUN/limit-steps.jsonl" > "$LAB_RUN/limit.json"\n'
    )
    return Vm(kernel, memory=memory, echo=echo).run(job, run_dir, 1800.0)
