"""The VM participant on the real kernel: a QEMU guest inside the lab's VM (nested TCG, the
project's tiny guest, ``docs/vm-participant.md``) whose RAM survives a real kexec, driven by
``systemctl start liveupdate.service`` with the project installed from its Debian package
(``lab/liveupdate.py``).

The guest is built on the host (``python -m luo_agent.vmm.guest``, run as a program: ``lab``
imports nothing of the project) into the cache; the VM sees the host's root, so it boots that
file.  ``/var/lib/luo-vm`` is bound to the run directory like the agent's state: the host reads
the participant's ``last-restore.json`` and the guest's serial log afterwards.

The guest's pause (QMP ``stop`` at the freeze to ``cont`` returning after the kexec) is measured on
the host's clock: the participant records both moments on the VM's wall clock, and each boot's
offset to the host's clock comes from its ``lab-mark: clock`` line, stamped by the host on arrival
(``lab/vm.py``).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from .guest_setup import VENV_PYTHON
from .liveupdate import run_scenario
from .results import UpdateRun, read_marks
from .scenarios import Scenario
from .source import cache_root

NAME = "lab"
RAM = "64M"  # the lab VM has 2 GiB; the guest is tiny (bench/vm_pause.py also runs 512M)
HOOKS = ("prepare", "freeze", "cancel", "restore", "finish")
PARTICIPANT = "/usr/lib/luo-agent/bin/python3 -m luo_agent.vmm.participant"


def build_guest() -> Path:
    """The tiny guest, assembled on the host with binutils (cached by its source)."""
    proc = subprocess.run(
        [str(VENV_PYTHON), "-m", "luo_agent.vmm.guest", str(cache_root() / "guest")],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(proc.stdout.strip())


def setup(guest: Path, ram: str = RAM) -> str:
    """Set-up shell text of every boot: the guest's configuration, its units enabled (the package
    installs them), its state directory on the run directory's "disk"."""
    units = " ".join([f"luo-vm@{NAME}.service"] + [f"luo-vm-{h}@{NAME}.service" for h in HOOKS])
    return f"""\
mkdir -p "$root$LAB_RUN/state/luo-vm" "$root/var/lib/luo-vm" "$root/etc/luo-vm"
mount --bind "$root$LAB_RUN/state/luo-vm" "$root/var/lib/luo-vm"
cat > "$root/etc/luo-vm/{NAME}.toml" <<'TOML'
ram = "{ram}"
kernel = "{guest}"
verify_ram = true
TOML
chroot "$root" systemctl enable {units} >> "$log" 2>&1
# Each hook is a Python program started under nested TCG: at load 15 the freeze hook's start alone
# outlasted the lab's 60 s freeze gate (the update was cancelled).
sed -i -e 's/^freeze = .*/freeze = 600.0/' -e 's/^prepare = .*/prepare = 600.0/' \
    -e 's/^restore = .*/restore = 600.0/' "$root/etc/luo-agent/config.toml"
"""


def job(kernel: Path) -> str:
    return f"""\
vm_status() {{ {PARTICIPANT} status {NAME}; }}
# Wait until the guest has counted past $1 ticks; its status goes to $2.
vm_counted() {{
    n=0
    until vm_status > "$2" 2>/dev/null && "$PY" -c 'import json, sys
sys.exit(json.load(open(sys.argv[1])).get("ticks", -1) <= int(sys.argv[2]))' "$2" "$1"; do
        n=$((n + 1))
        if [ $n -gt 600 ]; then return 1; fi
        sleep 0.5
    done
}}
save_vm_journal() {{
    journalctl -b --no-pager -o short-precise -u 'luo-vm*' > "$out/journal-vm.$LAB_BOOT.log"
}}
if [ "$LAB_BOOT" = 1 ]; then
    wait_active luo-agent.service || exit 10
    wait_active luo-vm@{NAME}.service || {{ save_vm_journal; exit 11; }}
    vm_counted 20 "$out/vm.before.json" || {{ save_vm_journal; exit 12; }}
    liveupdatectl load-kernel {kernel} --reuse-cmdline || exit 13
    journalctl -f -b -n all -o short-precise -u luo-agent.service -u liveupdate.service \\
        -u 'luo-vm*' > "$out/journal.1.log" &
    mark clock "$(date +%s.%N)"
    systemctl start liveupdate.service
    rc=$?
    echo "lab: liveupdate.service returned $rc"
    if [ $rc = 0 ]; then sleep 300; fi
    echo "lab: no kexec"
    exit 14
fi
mark clock "$(date +%s.%N)"
cat /proc/cmdline > "$out/cmdline.$LAB_BOOT"
lab wait-ended --timeout 400 > "$out/status.after.json" \
    || {{ save_journal; save_vm_journal; exit 20; }}
liveupdatectl --json history --limit 5 > "$out/history.json"
frozen=$("$PY" -c 'import json, sys
print(json.load(open(sys.argv[1]))["frozen"]["ticks"])' /var/lib/luo-vm/{NAME}/last-restore.json) \\
    || {{ save_vm_journal; exit 21; }}
vm_counted $((frozen + 20)) "$out/vm.after.json" || {{ save_vm_journal; exit 22; }}
mark clock "$(date +%s.%N)"
save_journal
save_vm_journal
"""


def scenario(guest: Path, ram: str = RAM) -> Scenario:
    return Scenario(
        "vm-guest",
        job,
        # Two boots with the package installed in each, QEMU under nested TCG: ~10 min on a quiet
        # host, over 15 at load 17 (other test suites and VMs beside it).
        1800.0,
        example=False,
        setup=setup(guest, ram),
        participant_unit=f"luo-vm-restore@{NAME}.service",
    )


def run(kernel: Path, run_dir: Path, ram: str = RAM, **options: Any) -> UpdateRun:
    run = run_scenario(kernel, scenario(build_guest(), ram), run_dir, **options)
    run.summary["guest"] = guest_summary(run)
    (run.run_dir / "summary.json").write_text(json.dumps(run.summary, indent=2) + "\n")
    return run


def guest_summary(run: UpdateRun) -> dict[str, Any]:
    """What the guest showed: the restore's report, the guest before and after, and its pause
    on the host's clock."""
    report = run.json(f"state/luo-vm/{NAME}/last-restore.json")
    out: dict[str, Any] = {
        "restore": report,
        "before": run.json("vm.before.json"),
        "after": run.json("vm.after.json"),
    }
    clocks = [(host, vm) for host, what, vm in read_marks(run.run_dir) if what == "clock"]
    if report and len(clocks) >= 2:
        # The first clock mark is boot 1's, the later ones boot 2's (after the restore).
        stopped = report["stopped_at"] + clocks[0][0] - clocks[0][1]
        running = report["running_at"] + clocks[-1][0] - clocks[-1][1]
        out["pause_host_clock_s"] = round(running - stopped, 3)
    return out


def summary_lines(run: UpdateRun) -> list[str]:
    vm = run.summary.get("guest", {})
    report = vm.get("restore") or {}
    frozen, carried, after = report.get("frozen", {}), report.get("carried", {}), vm.get("after")
    ram = f"{report['ram_bytes'] >> 20}M" if report.get("ram_bytes") else RAM
    return [
        f"guest:            {NAME}, {ram} of RAM in a memfd, QEMU {report.get('qemu_version', '-')}"
        f" ({report.get('machine', '-')}), nested TCG",
        f"ticks:            {vm.get('before', {}).get('ticks', '-')} before the update, "
        f"{frozen.get('ticks', '-')} at the freeze, {carried.get('ticks', '-')} after the kexec, "
        f"{(after or {}).get('ticks', '-')} later (it runs on)",
        f"RAM sha256:       {frozen.get('ram_sha256', '-')} at the freeze",
        f"                  {carried.get('ram_sha256', '-')} after the kexec "
        f"({'equal' if frozen.get('ram_sha256') == carried.get('ram_sha256') else 'DIFFERENT'})",
        f"device state:     {report.get('state_bytes', '-')} bytes, saved in "
        f"{report.get('save_seconds', '-')} s",
        f"guest pause (stop -> cont, host clock, across the real kexec): "
        f"{vm.get('pause_host_clock_s', '-')} s",
    ]


def guest_ok(run: UpdateRun) -> bool:
    vm = run.summary.get("guest", {})
    report = vm.get("restore") or {}
    frozen, carried = report.get("frozen", {}), report.get("carried", {})
    return bool(
        run.vm.ok
        and run.vm.boots == 2
        and run.summary.get("update", {}).get("result") == "success"
        and frozen.get("ram_sha256")
        and frozen.get("ram_sha256") == carried.get("ram_sha256")
        and (vm.get("after") or {}).get("ticks", -1) > frozen.get("ticks", 0)
    )
