"""A whole live update on the lab's real LUO kernel, installed and driven as an operator would.

The host builds the Debian package (``packaging/build-deb.sh``, cached by the content of the
checkout).  Every boot of the VM (systemd as PID 1) installs it into the fresh overlay with
``dpkg -i`` (its postinst enables ``luo-agent.service``), copies in the example participant's
units from the package's documentation and enables them, and writes
``/etc/luo-agent/config.toml``.  The agent's and the participant's state directories are bound to
the run directory: they stand in for the disk that a real machine keeps across a kexec, and the
host reads them afterwards.

Scenarios (each a shell job, see ``SCENARIOS``):

* ``whole-update``: ``liveupdatectl load-kernel --reuse-cmdline``, ``systemctl start
  liveupdate.service`` (prepare, freeze, the agent's own ``kexec_file_load`` + ``reboot(KEXEC)``);
  in the new kernel the agent restores, the participant verifies every byte and the position, the
  update finishes; then the kernel is probed for leftover sessions.
* ``failing-participant``: a freeze hook fails after the kernel preserved the sessions.
* ``killed-agent``: SIGKILL of the agent while ``prepared``.
* ``no-kernel``: ``liveupdatectl update`` with no kernel loaded.

Timestamps: the VM's clocks do not survive a kexec (``CLOCK_MONOTONIC``/``BOOTTIME`` restart at
zero, ``CLOCK_REALTIME`` is re-read from the emulated RTC, whole seconds).  The VM prints
``lab-mark:`` lines carrying its ``CLOCK_REALTIME``; the host stamps each with its own
``CLOCK_REALTIME`` on arrival (``lab/vm.py``), which gives each boot's clock offset and puts the
kexec call (the agent's record) and the participant's verified restore on one clock.

Where each part lives: the package (``lab/deb.py``), what a boot gets before PID 1 starts
(``lab/guest_setup.py``), the scenarios' shell jobs (``lab/scenarios.py``), what a run showed
and its timeline (``lab/results.py``), the commands the jobs run in the VM, such as probing the
kernel for leftover sessions (``lab/in_vm.py``, the one lab module that imports the project).
This module runs a scenario.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import IO

from .deb import ensure_deb
from .guest_setup import BOOKWORM, DISK_SETUP, Host, disk_share, sid_host, systemd_setup
from .results import UNIT_STARTED, UNIT_STARTING, UpdateRun, summarize, timeline, update_ok
from .rootfs import REPO
from .scenarios import JOB_HEAD, SCENARIOS, SESSIONS, TIMELINE_FIELDS, Scenario
from .vm import Vm

# What bench/ and tests/ import from here.
__all__ = [
    "BOOKWORM",
    "SCENARIOS",
    "SESSIONS",
    "UNIT_STARTED",
    "UNIT_STARTING",
    "Scenario",
    "UpdateRun",
    "ensure_deb",
    "new_run_dir",
    "run_scenario",
    "sid_host",
    "timeline",
    "update_ok",
]


def new_run_dir(name: str) -> Path:
    """A run directory not used yet, named after ``name``, under $LUO_LAB_RUNS (default: a
    temporary directory)."""
    base = Path(os.environ.get("LUO_LAB_RUNS") or tempfile.mkdtemp(prefix="luo-lab-runs-"))
    run_dir = base / name
    n = 1
    while run_dir.exists():
        n += 1
        run_dir = base / f"{name}.{n}"
    return run_dir


def run_scenario(
    kernel: Path,
    scenario: str | Scenario,
    run_dir: Path,
    *,
    host: Host = BOOKWORM,
    strategy: str = "direct",
    echo: IO[str] | None = None,
    timeout: float | None = None,
) -> UpdateRun:
    spec = SCENARIOS[scenario] if isinstance(scenario, str) else scenario
    timeout = timeout or spec.timeout
    head = JOB_HEAD.format(
        repo=host.seen(REPO),
        python=host.python,
        timeline_fields=TIMELINE_FIELDS,
        wait_workload=(
            "wait_active luo-example-workload.service || exit 11" if spec.example else ":"
        ),
    )
    job = head + spec.job(Path(host.seen(kernel)))
    more = (DISK_SETUP if spec.disk else "") + spec.setup
    setup = systemd_setup(host.install(), spec.extra_units, strategy, spec.example, more)
    vm = Vm(
        kernel,
        mode="systemd",
        root=host.root,
        echo=echo,
        qemu_args=disk_share(run_dir) if spec.disk else [],
        reboots=spec.reboots,
    )
    result = vm.run(job, run_dir, timeout, systemd_setup=setup)
    run = UpdateRun(spec.name, result, {})
    run.summary = summarize(run, spec.participant_unit)
    (result.run_dir / "summary.json").write_text(json.dumps(run.summary, indent=2) + "\n")
    return run
