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

In the VM, ``python -m lab.liveupdate probe NAME...`` opens ``/dev/liveupdate`` and tries to
retrieve and to create each session with the raw ioctls of ``tests/kernel/luo_raw.py``;
``python -m lab.liveupdate wait-ended`` waits for the agent to be idle with a finished update.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import IO, Any

from .rootfs import PRIVATE_ENV, ensure_sid_root, install_project_hook
from .source import cache_root, locked, log
from .vm import MARK, Vm, VmResult, console_lines

REPO = Path(__file__).resolve().parents[1]
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
# The participant's session (luo_agent/examples/participant.py) and the agent's own.
SESSIONS = ("example", "luo-agent")
EXAMPLE_UNITS = ("luo-example-workload", "luo-example-prepare", "luo-example-restore")
CONFIG_TOML = """\
# /etc/luo-agent/config.toml of the lab VM (docs/configuration.md)
reboot_strategy = "{strategy}"
auto_finish = true

[timeouts]
prepare = 120.0
freeze = 60.0
restore = 120.0
"""

MASKED = ("postgresql.service", "postgresql@.service", "kexec-load.service", "kexec.service")

# Puts the moment the participant holds its verified fd on the host's clock (see the docstring).
RESTORE_MARK_DROPIN = """\
[Service]
ExecStartPost=/bin/sh -c 'echo "lab-mark: restored $(date +%%s.%%N)" > /dev/console'
"""

FAILING_FREEZE_UNIT = """\
# A participant whose freeze hook fails: by then the kernel holds the preserved sessions.
[Unit]
Description=lab: a freeze hook that fails
Before=liveupdate-freeze.target
PartOf=liveupdate-freeze.target
DefaultDependencies=no

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo "lab: this freeze hook fails on purpose"; exit 3'

[Install]
RequiredBy=liveupdate-freeze.target
"""


# ------------------------------------------------------------------------------ the package


KEEP_DEBS = 4
# What the package is made of (packaging/debian/rules, *.install, *.docs, *.examples).
PACKAGED = ("luo_agent/", "units/", "policy/", "packaging/", "docs/", "pyproject.toml", "README.md")


def _tree_digest() -> str:
    """A digest of the files the package is made of (tracked and untracked, not ignored)."""
    names = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    digest = hashlib.sha256()
    for name in sorted(n for n in names if n and os.fsdecode(n).startswith(PACKAGED)):
        path = REPO / os.fsdecode(name)
        if path.is_file():
            digest.update(name + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def ensure_deb() -> Path:
    """The Debian package of this checkout, built once per content of the tree and cached."""
    entry = cache_root() / "debs" / _tree_digest()
    with locked(cache_root() / "deb.lock"):
        built = sorted(entry.glob("luo-agent_*.deb"))
        if built:
            return built[0]
        entry.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=entry.parent))
        log(f"building the Debian package (packaging/build-deb.sh) into {entry}")
        proc = subprocess.run(
            [str(REPO / "packaging" / "build-deb.sh"), str(staging)],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            raise RuntimeError(f"build-deb.sh failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        shutil.rmtree(entry, ignore_errors=True)
        os.rename(staging, entry)
        # One entry per state of the tree: keep the few newest (other checkouts use them too).
        entries = sorted(
            (p for p in entry.parent.iterdir() if not p.name.startswith(".")),
            key=lambda p: p.stat().st_mtime,
        )
        for old in entries[:-KEEP_DEBS]:
            shutil.rmtree(old, ignore_errors=True)
        return entry / Path(proc.stdout.strip().splitlines()[-1]).name


# ------------------------------------------------------------------------------ in the VM


def systemd_setup(
    install: str, extra_units: dict[str, str], strategy: str, example: bool = True, more: str = ""
) -> str:
    """Shell text run by init.sh before systemd starts, with the new root as $1; ``install`` lays
    the project and the example participant's units into it (``Host.install``); ``example``: the
    example participant is enabled; ``more``: shell text of the scenario's own."""
    units = "".join(
        f"cat > \"$root/etc/systemd/system/{name}\" <<'UNIT'\n{text}UNIT\n"
        for name, text in extra_units.items()
    )
    examples = [f"{u}.service" for u in EXAMPLE_UNITS] if example else []
    enable = " ".join(examples + list(extra_units))
    # ``systemctl enable`` with no unit fails ("Too few arguments"), and the set-up with it.
    enable_line = f'chroot "$root" systemctl enable {enable} >> "$log" 2>&1\n' if enable else ""
    return f"""\
set -e
root=$1
log="$root$LAB_RUN/setup.$LAB_BOOT.log"
echo "lab-mark: setup-start $(date +%s.%N)" > /dev/console
echo "LAB_RUN=$LAB_RUN" > "$root/etc/lab.env"
# What shapes this boot's speed under TCG (a kexec'd kernel may choose another clock source).
{{ cat "$root/sys/devices/system/clocksource/clocksource0/current_clocksource"
  grep MemTotal /proc/meminfo; }} > "$root$LAB_RUN/machine.$LAB_BOOT.txt" 2>&1 || true
# The disk a real machine keeps across the kexec: the agent's history, the participant's record.
for dir in luo-agent luo-example; do
    mkdir -p "$root$LAB_RUN/state/$dir" "$root/var/lib/$dir"
    mount --bind "$root$LAB_RUN/state/$dir" "$root/var/lib/$dir"
done
{install}
mkdir -p "$root/etc/luo-agent"
cat > "$root/etc/luo-agent/config.toml" <<'TOML'
{CONFIG_TOML.format(strategy=strategy)}TOML
mkdir -p "$root/etc/systemd/system/luo-example-restore.service.d"
cat > "$root/etc/systemd/system/luo-example-restore.service.d/lab-mark.conf" <<'UNIT'
{RESTORE_MARK_DROPIN}UNIT
{units}{enable_line}
# Services of this host that the VM does not need: a database (CPU under TCG) and kexec-tools'
# boot-time load of the host's own kernel (the agent loads the kernel to switch to).
for unit in {" ".join(MASKED)}; do
    ln -sf /dev/null "$root/etc/systemd/system/$unit"
done
{more}echo "lab-mark: setup-done $(date +%s.%N)" > /dev/console
"""


TIMELINE_FIELDS = (
    "MESSAGE,MESSAGE_ID,UNIT,_SYSTEMD_UNIT,_TRANSPORT,SYSLOG_IDENTIFIER,_SOURCE_MONOTONIC_TIMESTAMP"
)
JOB_HEAD = """\
REPO={repo}
PY={python}
out=$LAB_RUN
mark() {{ echo "lab-mark: $*" > /dev/console; }}
wait_active() {{
    n=0
    until systemctl is-active --quiet "$1"; do
        n=$((n + 1))
        if [ $n -gt 120 ]; then systemctl status --no-pager "$1"; return 1; fi
        sleep 1
    done
}}
lab() {{ (cd "$REPO" && "$PY" -m lab.liveupdate "$@"); }}
save_journal() {{
    journalctl -b --no-pager -o short-precise -u luo-agent.service -u liveupdate.service \\
        -u 'luo-example-*' -u 'lab-*' > "$out/journal.$LAB_BOOT.log"
    # The whole boot with both clocks of every entry: the per-step timeline (``timeline``).
    journalctl -b --no-pager -o json --output-fields={timeline_fields} \\
        > "$out/journal.$LAB_BOOT.json"
}}
ready() {{
    wait_active luo-agent.service || exit 10
    {wait_workload}
}}
"""


def whole_update_job(kernel: Path, *, before_update: str = "", after_update: str = "") -> str:
    """``before_update``: shell text of the first boot once the agent is up; ``after_update``:
    of the new boot once the update ended."""
    return f"""\
if [ "$LAB_BOOT" = 1 ]; then
    ready
{before_update}    liveupdatectl --json status > "$out/status.before.json"
    liveupdatectl load-kernel {kernel} --reuse-cmdline || exit 12
    liveupdatectl check || exit 13
    # Everything up to the kexec (the journal of this boot is gone afterwards).
    journalctl -f -b -n all -o short-precise -u luo-agent.service -u liveupdate.service \\
        -u 'luo-example-*' > "$out/journal.1.log" &
    mark clock "$(date +%s.%N)"
    systemctl start liveupdate.service
    rc=$?
    # direct custody: the agent's reboot(KEXEC) ends this boot inside the call.  systemd
    # custody: kexec.target, queued in replace-irreversibly mode, may cancel this very start
    # job (rc 1) or let it finish (rc 0); either way PID 1 ends the boot shortly.
    echo "lab: liveupdate.service returned $rc"
    if [ $rc = 0 ] || [ "$(systemctl is-system-running)" = stopping ]; then sleep 300; fi
    echo "lab: no kexec"
    exit 14
fi
mark clock "$(date +%s.%N)"
cat /proc/cmdline > "$out/cmdline.$LAB_BOOT"
lab wait-ended --timeout 240 > "$out/status.after.json" || {{ save_journal; exit 20; }}
{after_update}liveupdatectl --json history --limit 5 > "$out/history.json"
lab probe {" ".join(SESSIONS)} > "$out/probe.agent-running.json"
systemctl stop luo-agent.service
lab probe {" ".join(SESSIONS)} > "$out/probe.agent-stopped.json"
save_journal
"""


def failing_participant_job(kernel: Path) -> str:
    return f"""\
ready
liveupdatectl load-kernel {kernel} --reuse-cmdline || exit 12
systemctl start liveupdate.service
echo $? > "$out/liveupdate-service.rc"
lab wait-ended --timeout 120 > "$out/status.after.json" || {{ save_journal; exit 20; }}
liveupdatectl --json history --limit 5 > "$out/history.json"
lab probe {" ".join(SESSIONS)} > "$out/probe.agent-running.json"
systemctl stop luo-agent.service
lab probe {" ".join(SESSIONS)} > "$out/probe.agent-stopped.json"
save_journal
"""


def killed_agent_job(kernel: Path) -> str:
    return f"""\
ready
liveupdatectl load-kernel {kernel} --reuse-cmdline || exit 12
liveupdatectl --json prepare --wait > "$out/prepare.json" || {{ save_journal; exit 13; }}
lab probe {" ".join(SESSIONS)} > "$out/probe.prepared.json"
pid=$(systemctl show -p MainPID --value luo-agent.service)
kill -KILL "$pid"
while [ -d "/proc/$pid" ]; do sleep 0.1; done
lab probe {" ".join(SESSIONS)} > "$out/probe.killed.json"
wait_active luo-agent.service || exit 15
lab wait-ended --timeout 120 > "$out/status.after.json" || {{ save_journal; exit 20; }}
liveupdatectl --json history --limit 5 > "$out/history.json"
save_journal
"""


def no_kernel_job(kernel: Path) -> str:
    del kernel  # never loaded: that is the point
    return f"""\
ready
liveupdatectl --json update --wait > "$out/update.json" 2> "$out/update.stderr"
echo $? > "$out/update.rc"
liveupdatectl --json status > "$out/status.after.json"
liveupdatectl --json history --limit 5 > "$out/history.json"
lab probe {" ".join(SESSIONS)} > "$out/probe.agent-running.json"
save_journal
"""


# The baseline of the benchmark: the kernel's own selftest path in the same VM, with the same
# package installed and running.  Its stage 2 is a plain service ordered like any other, so the
# interval kexec call -> verified fd has everything but the agent's own work.
STAGE2_UNIT = """\
[Unit]
Description=lab: the kernel selftest's stage 2 (the benchmark's baseline)
[Service]
Type=oneshot
EnvironmentFile=/etc/lab.env
ExecCondition=/bin/sh -c 'test -e "$LAB_RUN/stage1.done"'
ExecStart=/bin/sh -c '"$LAB_RUN/luo_kexec_simple" --stage 2 > "$LAB_RUN/stage2.log" 2>&1'
ExecStartPost=/bin/sh -c 'echo "lab-mark: restored $(date +%%s.%%N)" > /dev/console'
[Install]
WantedBy=multi-user.target
"""


def selftest_baseline_job(kernel: Path) -> str:
    selftests = kernel.parent / "selftests"
    return f"""\
if [ "$LAB_BOOT" = 1 ]; then
    ready
    cp {selftests}/luo_kexec_simple "$out/"
    "$out/luo_kexec_simple" --stage 1 > "$out/stage1.log" 2>&1 || exit 12
    touch "$out/stage1.done"
    kexec -l -s --reuse-cmdline {kernel} || exit 13
    mark clock "$(date +%s.%N)"
    mark kexec-call "$(date +%s.%N)"
    kexec -e
    exit 14
fi
n=0
until grep -q "PASSED" "$out/stage2.log" 2>/dev/null; do
    n=$((n + 1)); [ $n -gt 240 ] && exit 20
    sleep 0.5
done
save_journal
"""


# systemd 262 only (the sid root): a unit with its own LUO session next to the agent's
# participants.  Ordered before the agent: both open the single-open device at start-up, and PID 1
# does not retry a LUOSession= start that meets EBUSY (docs/architecture.md).
LUOSESSION_UNIT = f"""\
[Unit]
Description=lab: a service with its own LUO session (LUOSession=)
Before=luo-agent.service
[Service]
Type=simple
EnvironmentFile=/etc/lab.env
WorkingDirectory=/run/host{REPO}
ExecStart={PRIVATE_ENV}/bin/python3 -m lab.luosession_unit
LUOSession=labsess
FileDescriptorStorePreserve=yes
FileDescriptorStoreMax=4
[Install]
WantedBy=multi-user.target
"""


def luosession_job(kernel: Path) -> str:
    wait_preserved = (
        'if [ "$LAB_BOOT" = 1 ]; then\n'
        "    n=0\n"
        '    until test -s "$out/luosession.preserved"; do\n'
        "        n=$((n + 1))\n"
        "        [ $n -gt 120 ] && { systemctl status lab-luosession.service; exit 31; }\n"
        "        sleep 0.5\n"
        "    done\n"
        "fi\n"
    )
    return (
        wait_preserved
        + whole_update_job(kernel)
        + 'grep -qx ok "$out/luosession.verified" || { save_journal; exit 30; }\n'
    )


def manual_kexec_job(kernel: Path) -> str:
    """An operator runs ``systemctl kexec`` while an update is prepared."""
    return f"""\
if [ "$LAB_BOOT" = 1 ]; then
    ready
    liveupdatectl load-kernel {kernel} --reuse-cmdline || exit 12
    liveupdatectl --json prepare --wait > "$out/prepare.json" || {{ save_journal; exit 13; }}
    lab probe {" ".join(SESSIONS)} > "$out/probe.prepared.json"
    journalctl -f -b -n all -o short-precise -u luo-agent.service \\
        -u 'luo-example-*' > "$out/journal.1.log" &
    systemctl kexec
    sleep 600
    exit 14
fi
wait_active luo-agent.service || exit 15
sleep 5
liveupdatectl --json status > "$out/status.after.json"
liveupdatectl --json history --limit 5 > "$out/history.json"
lab probe {" ".join(SESSIONS)} > "$out/probe.after-kexec.json"
save_journal
"""


@dataclass(frozen=True)
class Scenario:
    name: str
    job: Callable[[Path], str]  # the job, given the kernel image to switch to
    # Seconds for the whole VM run: about 2.5x what a quiet 2-core host needs (TCG is slowed
    # down by every other process on the host).
    timeout: float
    extra_units: dict[str, str] = field(default_factory=dict)
    # The rest by name only: a positional one once went to the wrong field (a unit name became
    # set-up shell text, the set-up failed before its end mark and skewed a benchmark).
    _: KW_ONLY
    # The example participant (Python) is enabled; without it, ``extra_units`` bring their own.
    example: bool = True
    # More set-up shell text for every boot (``systemd_setup``), e.g. a participant's config.
    setup: str = ""
    # The unit whose start is the participant's start in the new boot (``timeline``).
    participant_unit: str = "luo-example-restore.service"
    # An ordinary reboot boots the VM again (else it ends the VM): lab/vm.py's ``reboots``.
    reboots: bool = False
    # A disk with a page cache at DISK_MOUNT (see there).
    disk: bool = False


# The run directory exported a second time and mounted with the guest's page cache (9p
# ``cache=mmap``): a disk that survives the kexec as the run directory does, on which what was
# written and fsync'd reaches the host and the rest is lost with the boot.  For programs that map
# their files shared (etcd's bbolt): the run directory's own mount has no guest cache, and there
# the kernel refuses a shared mapping of a file open for writing (EINVAL).  A virtio-9p channel
# takes one mount only, hence a second export of the same directory.
DISK_TAG = "labdisk"
DISK_MOUNT = "/var/lib/lab-disk"
DISK_SETUP = f"""mkdir -p "$root{DISK_MOUNT}"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=mmap {DISK_TAG} "$root{DISK_MOUNT}"
"""


def disk_share(run_dir: Path) -> list[str]:
    """QEMU arguments exporting ``run_dir`` for DISK_MOUNT."""
    return [
        *("-fsdev", f"local,id={DISK_TAG},path={run_dir.resolve()},security_model=none"),
        *("-device", f"virtio-9p-pci,fsdev={DISK_TAG},mount_tag={DISK_TAG}"),
    ]


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("whole-update", whole_update_job, 600.0),
        Scenario(
            "failing-participant",
            failing_participant_job,
            360.0,
            {"lab-failing-freeze.service": FAILING_FREEZE_UNIT},
        ),
        Scenario("killed-agent", killed_agent_job, 360.0),
        Scenario("no-kernel", no_kernel_job, 360.0),
        Scenario(
            "luosession-alongside",
            luosession_job,
            600.0,
            {"lab-luosession.service": LUOSESSION_UNIT},
        ),
        Scenario("manual-kexec-while-prepared", manual_kexec_job, 600.0),
        Scenario(
            "selftest-baseline",
            selftest_baseline_job,
            600.0,
            {"lab-stage2.service": STAGE2_UNIT},
        ),
    )
}


# ------------------------------------------------------------------------------ the host side


@dataclass
class UpdateRun:
    scenario: str
    vm: VmResult
    summary: dict[str, Any]

    @property
    def run_dir(self) -> Path:
        return self.vm.run_dir

    def json(self, name: str) -> Any:
        """A JSON document the job left in the run directory (the last line for liveupdatectl's
        line-per-document output), or None."""
        text = self.text(name).strip()
        try:
            return json.loads(text.splitlines()[-1]) if text else None
        except ValueError:  # cut short by a crash: the test reports the run instead
            return None

    def text(self, name: str) -> str:
        path = self.run_dir / name
        return path.read_text(errors="replace") if path.exists() else ""

    @property
    def history(self) -> list[dict[str, Any]]:
        document = self.json("history.json")
        return list(document["history"]) if document else []

    def describe(self) -> str:
        return f"{self.scenario}: {self.vm.describe()}\n{json.dumps(self.summary, indent=2)}"


@dataclass(frozen=True)
class Host:
    """The system the VM boots.  ``bookworm``: this machine's own root (Debian 12, systemd 252)
    with the project's Debian package installed by ``dpkg -i``.  ``sid``: ``lab/rootfs.py``'s
    root (systemd 262), the project laid out as the package lays it out, its code from the
    checkout (sid has no Python 3.11 for the Debian 12 package's private environment)."""

    name: str
    root: Path | None = None

    def seen(self, path: Path) -> str:
        """Where a host path is inside the VM (a root of its own has the host's at /run/host)."""
        return str(path) if self.root is None else f"/run/host{path}"

    @property
    def python(self) -> str:
        """An interpreter in the VM that imports luo_agent and runs ``lab.liveupdate``."""
        return str(VENV_PYTHON) if self.root is None else f"{PRIVATE_ENV}/bin/python3"

    def install(self) -> str:
        """Setup shell text: the project and the example participant's units into $root."""
        if self.root is None:
            deb = ensure_deb()
            return (
                f'chroot "$root" dpkg -i {deb} > "$log" 2>&1\n'
                'cp "$root"/usr/share/doc/luo-agent/examples/units/luo-example-*.service '
                '"$root/etc/systemd/system/"'
            )
        # As the package's rules do: the example units run the private environment's python.
        examples = " ".join(str(REPO / "units" / f"{unit}.service") for unit in EXAMPLE_UNITS)
        return (
            f'( {install_project_hook()} ) > "$log" 2>&1\n'
            f"for unit in {examples}; do\n"
            f"    sed 's|^ExecStart=/usr/bin/python3 |ExecStart={PRIVATE_ENV}/bin/python3 |' "
            '"$unit" > "$root/etc/systemd/system/$(basename "$unit")"\n'
            "done"
        )


BOOKWORM = Host("bookworm")


def sid_host() -> Host:
    return Host("sid", ensure_sid_root().dir)


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


def read_marks(run_dir: Path) -> list[tuple[float, str, float]]:
    """(host CLOCK_REALTIME, what, VM CLOCK_REALTIME) of each ``lab-mark: WHAT SECONDS`` console
    line, from the host-stamped console (``serial.timed``)."""
    marks = []
    for host, line in console_lines(run_dir, MARK):
        parts = line.split(MARK, 1)[1].split()
        if len(parts) == 2:
            try:
                marks.append((host, parts[0], float(parts[1])))
            except ValueError:
                continue
    return marks


def summarize(
    run: UpdateRun, participant_unit: str = "luo-example-restore.service"
) -> dict[str, Any]:
    """What the run showed, for people and benchmarks (written to summary.json)."""
    summary: dict[str, Any] = {
        "scenario": run.scenario,
        "vm": {
            "status": run.vm.status,
            "exit_code": run.vm.exit_code,
            "boots": run.vm.boots,
            "seconds": round(run.vm.elapsed, 1),
        },
    }
    # The agent's own history file (kept on the "disk", the run directory), with both clocks.
    records = run.json("state/luo-agent/history.json") or []
    record = records[-1] if records else None
    if record is not None:
        summary["update"] = {
            key: record.get(key)
            for key in ("id", "result", "error_name", "message", "abi", "boot_count")
        }
        summary["blackout_critical_ms"] = round(record.get("blackout_critical", -1) * 1000, 3)
        summary["phases"] = [_phase(t) for t in record.get("timings", [])]
    restore = run.json("state/luo-example/last-restore.json")
    if restore is not None:
        summary["verified"] = {
            "ok": restore["verified"],
            "bytes": restore["got"]["size"],
            "position": restore["got"]["pos"],
            "sha256": restore["got"]["sha256"],
        }
    summary["probes"] = {
        name.removeprefix("probe.").removesuffix(".json"): run.json(name)
        for name in sorted(p.name for p in run.run_dir.glob("probe.*.json"))
    }
    if record is not None:
        summary["clock"] = _kexec_clock(run.run_dir, record)
    elif any(what == "kexec-call" for _, what, _ in read_marks(run.run_dir)):
        summary["clock"] = _kexec_clock(run.run_dir, {})  # a baseline: no agent, its own mark
    if "clock" in summary and run.vm.boots >= 2:
        summary["timeline"] = timeline(
            run.run_dir, run.vm.boots, summary["clock"], participant_unit
        )
    return summary


# The steps of the new boot (``timeline``): journal entries of PID 1 (unit starting/started, by
# their catalogue ids) and of the agent (its own events).
UNIT_STARTING = "7d4958e842da4a758f6c1cdc7b36dcc5"
UNIT_STARTED = "39f53479d3a045ac8e11786248231fbf"
TIMELINE_UNITS = {
    "sysinit.target": "sysinit_target",
    "basic.target": "basic_target",
    "dbus.service": "dbus",
    "luo-agent.service": "agent",
}


def _ended(agent_message: str) -> bool:
    return "event='phase_changed'" in agent_message and "phase='idle'" in agent_message


def timeline(
    run_dir: Path, boot: int, clock: dict[str, Any], participant_unit: str
) -> dict[str, Any]:
    """The new boot's steps, in seconds since the new kernel's first log line, with the lab's
    package install (between init.sh's setup marks, just before PID 1 starts) taken out of every
    point after it; ``kexec_call`` is the kexec call on that scale (negative).

    Each boot's journal entry carries CLOCK_REALTIME and CLOCK_MONOTONIC read together (kernel
    messages their own printk time): the kernel's first line is monotonic 0, and the lab marks'
    and PID 1's times convert through that boot's realtime - monotonic difference."""
    path = run_dir / f"journal.{boot}.json"
    if not path.exists():
        return {}
    entries = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    own = [e for e in entries if "_SOURCE_MONOTONIC_TIMESTAMP" not in e]
    if not entries or not own:
        return {}
    # realtime - monotonic of this boot (µs), from an entry journald stamped itself.
    rt_minus_mono = (
        int(own[0]["__REALTIME_TIMESTAMP"]) - int(own[0]["__MONOTONIC_TIMESTAMP"])
    ) / 1e6

    def mono(entry: dict[str, Any]) -> float:
        return int(entry.get("_SOURCE_MONOTONIC_TIMESTAMP") or entry["__MONOTONIC_TIMESTAMP"]) / 1e6

    marks = {
        what: vm for host, what, vm in read_marks(run_dir) if host > clock.get("kexec_call_host", 0)
    }
    points: dict[str, float] = {"kernel_first_line": 0.0}
    if "setup-start" in marks:
        points["init"] = marks["setup-start"] - rt_minus_mono
    setup = 0.0
    if "setup-done" in marks:
        points["pid1_start"] = marks["setup-done"] - rt_minus_mono
        setup = float(clock.get("lab_package_setup_s", 0.0))
    for entry in entries:
        unit, message_id = entry.get("UNIT"), entry.get("MESSAGE_ID")
        name = TIMELINE_UNITS.get(str(unit)) or (
            "participant" if unit == participant_unit else None
        )
        if name is not None and message_id in (UNIT_STARTING, UNIT_STARTED):
            step = f"{name}_{'start' if message_id == UNIT_STARTING else 'ready'}"
            points.setdefault(step, mono(entry))
        if entry.get("_SYSTEMD_UNIT") == "luo-agent.service":
            message = str(entry.get("MESSAGE", ""))
            if "event='agent_starting'" in message:
                points.setdefault("agent_imported", mono(entry))
            elif "event='fd_retrieved'" in message:
                points.setdefault("first_retrieve_answered", mono(entry))
            elif "first_retrieve_answered" in points and _ended(message):
                points.setdefault("finish", mono(entry))
    if "restored" in marks:
        points["participant_verified"] = marks["restored"] - rt_minus_mono
    if "kexec_call_host" in clock and "vm_clock_offset_after_s" in clock:
        # The kexec call on the new boot's monotonic scale, through both boots' offsets.
        kernel_start_host = rt_minus_mono + float(clock["vm_clock_offset_after_s"])
        points["kexec_call"] = float(clock["kexec_call_host"]) - kernel_start_host
    pid1 = points.get("pid1_start", 0.0)
    return {
        "seconds_since_kernel_first_line": {
            name: round(value - (setup if "pid1_start" in points and value >= pid1 else 0.0), 3)
            for name, value in sorted(points.items(), key=lambda item: item[1])
        },
        "lab_package_setup_taken_out_s": setup,
    }


def _phase(timing: dict[str, Any]) -> dict[str, Any]:
    start, end = timing.get("monotonic_start"), timing.get("monotonic_end")
    wall_start, wall_end = timing.get("started"), timing.get("ended")
    phase: dict[str, Any] = {"phase": timing.get("phase"), "started": wall_start}
    if start is not None and end is not None:
        phase["seconds"] = round(end - start, 6)
    elif wall_start is not None and wall_end is not None:
        # It spans the kexec (the agent leaves the monotonic end out): the VM's wall clocks,
        # re-read from the RTC at boot, compare to about a second.
        phase["seconds_wall_clock"] = round(wall_end - wall_start, 3)
    return phase


def _kexec_clock(run_dir: Path, record: dict[str, Any]) -> dict[str, Any]:
    """The kexec call and the verified restore on the host's clock (see the module docstring).

    The kexec call is the start of the agent's last ``rebooting`` timing: stamped just before its
    final metadata write, ``sync()`` and ``reboot(KEXEC)`` (all inside the blackout-critical
    milliseconds).  The new boot's timeline comes from the marks: its init starting the lab's
    setup (package installation: a lab artefact, a real machine has the package on its disk),
    systemd starting, the participant's restore hook having verified its fd."""
    rebooting = [t for t in record.get("timings", []) if t.get("phase") == "rebooting"]
    marks = read_marks(run_dir)
    rebooting += [{"started": vm} for _, what, vm in marks if what == "kexec-call"]
    out: dict[str, Any] = {
        "clock": "host CLOCK_REALTIME; the VM's CLOCK_REALTIME is re-read from the emulated RTC "
        "(whole seconds) at each boot and its monotonic clocks restart, so VM times are put on "
        "the host's clock through each boot's offset",
    }
    clocks = [(host, vm) for host, what, vm in marks if what == "clock"]
    if not rebooting or not clocks:
        return out
    kexec_vm = float(rebooting[-1]["started"])
    offset_before = clocks[0][0] - clocks[0][1]
    kexec_host = kexec_vm + offset_before
    out.update(
        kexec_call_vm=kexec_vm,
        kexec_call_host=round(kexec_host, 6),
        vm_clock_offset_before_s=round(offset_before, 3),
    )
    after = {what: (host, vm) for host, what, vm in marks if host > kexec_host}
    if "restored" in after:
        host, vm = after["restored"]
        out.update(
            restored_host=host,
            restored_vm=vm,
            vm_clock_offset_after_s=round(host - vm, 3),
            kexec_to_verified_restore_s=round(host - kexec_host, 3),
        )
    if "setup-start" in after and "setup-done" in after:
        out.update(
            kexec_to_new_init_s=round(after["setup-start"][0] - kexec_host, 3),
            lab_package_setup_s=round(after["setup-done"][0] - after["setup-start"][0], 3),
        )
        if "restored" in after:
            out["systemd_start_to_verified_restore_s"] = round(
                after["restored"][0] - after["setup-done"][0], 3
            )
    return out


def summary_lines(run: UpdateRun) -> list[str]:
    """A summary like ./scripts/demo's."""
    s = run.summary
    update = s.get("update", {})
    verified = s.get("verified", {})
    clock = s.get("clock", {})
    phases = ", ".join(
        f"{p['phase']} {p['seconds']:.3f}s" for p in s.get("phases", []) if "seconds" in p
    )
    lines = [
        f"VM:               {run.vm.describe()}",
        f"update id:        {update.get('id', '-')}",
        f"result:           {update.get('result', '-')} {update.get('message', '')}".rstrip(),
        f"kernel ABI:       {update.get('abi', '-')}",
        f"live-update boots: {update.get('boot_count', '-')}",
    ]
    if verified:
        lines += [
            f"survived:         {verified['bytes']} bytes, sha256 {verified['sha256']}",
            f"                  file position {verified['position']}; verified byte for byte: "
            f"{'yes' if verified['ok'] else 'NO'}",
        ]
    if s.get("blackout_critical_ms", -1) >= 0:
        lines.append(
            f"blackout-critical (freeze gate done → kexec call): {s['blackout_critical_ms']} ms"
        )
    lines.append(f"phase timings:    {phases}")
    if "kexec_to_verified_restore_s" in clock:
        lines.append(
            "kexec call → participant holds its verified fd (host clock, TCG emulation): "
            f"{clock['kexec_to_verified_restore_s']:.1f} s"
        )
    if "systemd_start_to_verified_restore_s" in clock:
        lines.append(
            "                  of which: new kernel to its init "
            f"{clock['kexec_to_new_init_s']:.1f} s, lab package install "
            f"{clock['lab_package_setup_s']:.1f} s, systemd start to "
            f"verified restore {clock['systemd_start_to_verified_restore_s']:.1f} s"
        )
    probes = s.get("probes", {})
    if "agent-stopped" in probes:
        left = [
            name
            for name, result in (probes["agent-stopped"] or {}).items()
            if result.get("retrieve") != "ENOENT"
        ]
        lines.append(f"sessions left in the kernel: {', '.join(left) if left else 'none'}")
    return lines


def update_ok(run: UpdateRun) -> bool:
    s = run.summary
    return bool(
        run.vm.ok
        and run.vm.boots == 2
        and s.get("update", {}).get("result") == "success"
        and s.get("verified", {}).get("ok")
    )


# ------------------------------------------------------------------------------ VM-side tools


def probe(names: list[str]) -> dict[str, dict[str, str]]:
    """For each session name: what RETRIEVE_SESSION and CREATE_SESSION answer ("ok" or the
    errno's name).  A created session is closed at once (an empty outgoing session vanishes)."""
    sys.path.insert(0, str(REPO))
    from luo_agent.kernel.syscalls import DEVICE_PATH, RealSyscalls
    from tests.kernel import luo_raw

    sc = RealSyscalls()
    dev = _open_device(sc, DEVICE_PATH)
    results: dict[str, dict[str, str]] = {}
    try:
        for name in names:
            results[name] = {
                op: _attempt(fn, sc, dev, name)
                for op, fn in (
                    ("retrieve", luo_raw.retrieve_session),
                    ("create", luo_raw.create_session),
                )
            }
    finally:
        os.close(dev)
    return results


def _open_device(sc: Any, path: str) -> int:
    deadline = time.monotonic() + 10
    while True:  # the agent opens the exclusive device for single operations: retry EBUSY
        try:
            return int(sc.open(path, os.O_RDWR | os.O_CLOEXEC))
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _attempt(fn: Any, *args: Any) -> str:
    try:
        fd = fn(*args)
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    os.close(fd)
    return "ok"


def wait_ended(timeout: float) -> dict[str, Any]:
    """``liveupdatectl --json status`` once the agent is idle with a finished update."""
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        proc = subprocess.run(
            ["liveupdatectl", "--json", "status"], capture_output=True, text=True, check=False
        )
        if proc.returncode == 0:
            status = json.loads(proc.stdout.strip().splitlines()[-1])["status"]
            if status.get("Phase") == "idle" and status.get("LastResult", [""])[0]:
                return status
        time.sleep(0.5)
    raise TimeoutError(f"no finished update after {timeout} s; last status {status}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.liveupdate")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("probe", help="(in the VM) retrieve and create each session name")
    p.add_argument("names", nargs="+")
    w = sub.add_parser("wait-ended", help="(in the VM) wait for an idle agent with a result")
    w.add_argument("--timeout", type=float, default=240.0)
    args = parser.parse_args(argv)
    if args.command == "probe":
        print(json.dumps(probe(args.names)))
        return 0
    try:
        print(json.dumps(wait_ended(args.timeout)))
    except TimeoutError as exc:
        print(f"lab: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
