"""What the issue-23 lab jobs share (``lab/soak.py``, ``powercut.py``, ``sigkill.py``,
``bigmem.py``): a systemd VM set up as ``lab/liveupdate.py``'s scenarios are (the package, the
example participant, the state directories on the run directory), and reading what a job left."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from .guest_setup import Host, systemd_setup
from .rootfs import REPO
from .scenarios import JOB_HEAD, TIMELINE_FIELDS
from .vm import Vm

# The jobs hold phases open on purpose (hanging hooks) and act with several liveupdatectl calls,
# each seconds long under TCG on a loaded host: the phases must not time out meanwhile.
LONG_TIMEOUTS = (
    "sed -i 's/^\\(prepare\\|freeze\\|restore\\) = .*/\\1 = 1800.0/' "
    '"$root/etc/luo-agent/config.toml"\n'
)
RELEASED = {"retrieve": "ENOENT", "create": "ok"}  # the probe's answer for a session not held
HELD = {"retrieve": "ENOENT", "create": "EEXIST"}  # an outgoing session holds the name


def systemd_vm(
    kernel: Path,
    host: Host,
    body: Callable[[Path], str],
    units: dict[str, str] | None = None,
    *,
    install_extra: str = "",
    memory: str = "2G",
    echo: IO[str] | None = None,
) -> tuple[Vm, str, str]:
    """(the VM, its job, its setup): ``body`` is given the kernel image as the VM sees it."""
    job = JOB_HEAD.format(
        repo=host.seen(REPO),
        python=host.python,
        timeline_fields=TIMELINE_FIELDS,
        wait_workload="wait_active luo-example-workload.service || exit 11",
    )
    job += body(Path(host.seen(kernel)))
    setup = systemd_setup(
        pinned(host.install()) + install_extra, units or {}, "direct", more=LONG_TIMEOUTS
    )
    return Vm(kernel, memory=memory, mode="systemd", root=host.root, echo=echo), job, setup


def pinned(install: str) -> str:
    """``install`` with the package it names copied out of the shared cache, which keeps only
    the newest few packages: a run of many boots installs it again at each one."""
    for word in install.split():
        if word.endswith(".deb") and Path(word).is_file():
            keep = Path(tempfile.mkdtemp(prefix="luo-lab-deb-", dir="/var/tmp")) / Path(word).name
            shutil.copy2(word, keep)
            install = install.replace(word, str(keep))
    return install


def last_json(path: Path) -> Any:
    """The last line of a JSON-lines file the job left (liveupdatectl's output), or None."""
    text = read_text(path).strip()
    try:
        return json.loads(text.splitlines()[-1]) if text else None
    except ValueError:
        return None


def read_text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""
