"""Power cuts on the real LUO kernel: the VM killed (QEMU SIGKILLed: no shutdown, no sync) while
an update is prepared, while it is frozen, and while the new kernel restores it; after each, a
cold boot on the same disk.  ``./scripts/vm powercut`` runs it by hand, ``tests/vm`` checks it.

The disk: the lab's root is a tmpfs overlay that a cold boot loses, so the agent's and the
participant's state directories are bound to the run directory (a writable 9p share without a
guest cache: what the guest wrote has reached the host, what it had not is lost with QEMU), as
``lab/liveupdate.py`` does for every scenario.  A cold boot is a new QEMU on that run directory
(``Vm.run(cold_boot=True)``): fresh RAM, no kexec handover, the boot counter going on.

Six boots, four QEMUs:

1. prepare ``cut-prepared`` (the kernel holds both sessions), cut.
2. cold: the checks below; prepare ``cut-frozen`` with a freeze hook that hangs, cut while the
   agent is ``freezing``.
3. cold: the checks; the whole update ``cut-restore``: the kexec, then
4. the live-update boot, with a restore hook that hangs: cut while the agent is ``restoring``.
5. cold: the checks; the whole update ``after-cuts``: the kexec, then
6. its live-update boot: it must end ``success`` with the participant's bytes verified.

The checks of a cold boot (files ``*.N.*`` of boot N): the history (``history.N.json``), the
agent idle (``status.N.json``), the raw session probe (``probe.N.json``), the KHO debugfs
``in`` directory (``kho-in.N``: absent without a handover), the state directory's files
(``state-files.N``) and the journal (``journal.N.log``: the example workload says it started
without its state).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .guest_setup import BOOKWORM, Host
from .scenarios import SESSIONS
from .systemd_job import HELD, RELEASED, last_json, read_text, systemd_vm
from .vm import VmResult

# Seconds per QEMU run (at most two boots and an update under TCG on a loaded 2-core host).
RUN_SECONDS = 1800.0
# (update id, phase it is cut in) of the three cuts, in order.
CUTS = (("cut-prepared", "prepared"), ("cut-frozen", "freezing"), ("cut-restore", "restoring"))
FINAL_UPDATE = "after-cuts"

# A hook that hangs while a flag file in the run directory says so: it takes the flag away (the
# next boots pass straight through), says it hangs, and goes on once released (or never: a power
# cut or a kill of the agent ends it first).
HANGING_HOOK = """\
[Unit]
Description=lab: a {phase} hook that hangs when asked to
Before=liveupdate-{phase}.target
PartOf=liveupdate-{phase}.target
DefaultDependencies=no

[Service]
Type=oneshot
EnvironmentFile=/etc/lab.env
TimeoutStartSec=infinity
ExecStart=/bin/sh -c 'if [ -e "$LAB_RUN/hang-{phase}" ]; then rm "$LAB_RUN/hang-{phase}"; \\
touch "$LAB_RUN/hanging-{phase}"; until [ -e "$LAB_RUN/release-{phase}" ]; do sleep 0.2; done; \\
rm "$LAB_RUN/release-{phase}"; fi'

[Install]
RequiredBy=liveupdate-{phase}.target
"""


def hanging_hooks(*phases: str) -> dict[str, str]:
    return {f"lab-hang-{phase}.service": HANGING_HOOK.format(phase=phase) for phase in phases}


UNITS = hanging_hooks("freeze", "restore")


def powercut_job(kernel: Path) -> str:
    probe = f'lab probe {" ".join(SESSIONS)} > "$out/probe.$LAB_BOOT.json"'
    probe_at_cut = f'lab probe {" ".join(SESSIONS)} > "$out/probe-at-cut.$LAB_BOOT.json"'
    return f"""\
until_file() {{  # wait up to 300 s for a file
    n=0
    until [ -e "$1" ]; do n=$((n + 1)); [ $n -gt 600 ] && return 1; sleep 0.5; done
}}
in_flight_says() {{  # the durable record of the update says phase $1
    n=0
    until grep -q "\\"phase\\": \\"$1\\"" /var/lib/luo-agent/in-flight.json 2>/dev/null; do
        n=$((n + 1)); [ $n -gt 600 ] && return 1; sleep 0.5
    done
}}
cut() {{  # what the kernel and the agent hold at the cut: files of their own (a cold boot's
    # checks in the same boot were written before)
    liveupdatectl --json status > "$out/status-at-cut.$LAB_BOOT.json"
    {probe_at_cut}
    cp /var/lib/luo-agent/in-flight.json "$out/in-flight.$LAB_BOOT.json"
    save_journal
    sync
    mark power-cut "$(date +%s.%N)"
    touch "$out/power-cut"
    sleep 600
    exit 40
}}
after_cut() {{
    lab wait-ended --timeout 120 > "$out/status.$LAB_BOOT.json" || {{ save_journal; exit 20; }}
    liveupdatectl --json history --limit 20 > "$out/history.$LAB_BOOT.json"
    {probe}
    ls /sys/kernel/debug/kho/in > "$out/kho-in.$LAB_BOOT" 2>&1
    ls -a /var/lib/luo-agent > "$out/state-files.$LAB_BOOT"
    save_journal
}}
kexec_update() {{  # the whole update $1: prepare, freeze, the agent's kexec
    liveupdatectl load-kernel {kernel} --reuse-cmdline > /dev/null || exit 12
    liveupdatectl --json prepare --wait --id "$1" > "$out/prepare.$LAB_BOOT.json" || exit 13
    liveupdatectl execute --id "$1"
    echo "lab: execute returned $?"
    sleep 300
    echo "lab: no kexec"
    exit 14
}}
ready
case "$LAB_BOOT" in
1)
    liveupdatectl load-kernel {kernel} --reuse-cmdline > /dev/null || exit 12
    liveupdatectl --json prepare --wait --id {CUTS[0][0]} > "$out/prepare.1.json" || exit 13
    in_flight_says prepared || exit 15
    cut
    ;;
2)
    after_cut
    touch "$out/hang-freeze"
    liveupdatectl load-kernel {kernel} --reuse-cmdline > /dev/null || exit 12
    liveupdatectl --json prepare --wait --id {CUTS[1][0]} > "$out/prepare.2.json" || exit 13
    liveupdatectl execute --id {CUTS[1][0]} &
    until_file "$out/hanging-freeze" || exit 16
    in_flight_says freezing || exit 15
    cut
    ;;
3)
    after_cut
    touch "$out/hang-restore"
    kexec_update {CUTS[2][0]}
    ;;
4)
    until_file "$out/hanging-restore" || {{ save_journal; exit 16; }}
    in_flight_says restoring || {{ save_journal; exit 15; }}
    cut
    ;;
5)
    after_cut
    kexec_update {FINAL_UPDATE}
    ;;
6)
    after_cut
    cp /var/lib/luo-example/last-restore.json "$out/restore.6.json"
    ;;
*)
    exit 30
    ;;
esac
"""


@dataclass
class PowerCutRun:
    runs: list[VmResult]
    run_dir: Path

    @property
    def ok(self) -> bool:
        """Every cut happened and the last QEMU's job exited 0 after six boots."""
        statuses = [r.status for r in self.runs]
        last = self.runs[-1]
        return statuses == ["cut", "cut", "cut", "exited"] and last.ok and last.boots == 6

    def describe(self) -> str:
        return "; ".join(f"QEMU {n + 1}: {r.describe()}" for n, r in enumerate(self.runs))


def run_power_cuts(
    kernel: Path, run_dir: Path, *, host: Host = BOOKWORM, echo: IO[str] | None = None
) -> PowerCutRun:
    vm, job, setup = systemd_vm(kernel, host, powercut_job, UNITS, echo=echo)
    runs: list[VmResult] = []
    for n, expect_cut in enumerate((True, True, True, False)):
        result = vm.run(
            job, run_dir, RUN_SECONDS, systemd_setup=setup, power_cut=expect_cut, cold_boot=n > 0
        )
        runs.append(result)
        if result.status != ("cut" if expect_cut else "exited"):
            break
    return PowerCutRun(runs, run_dir)


def checks(run_dir: Path) -> list[tuple[str, bool, str]]:
    """(what, held, what was seen) for everything the run must show."""
    found: list[tuple[str, bool, str]] = []

    def check(what: str, held: bool, seen: object) -> None:
        found.append((what, held, str(seen)[:300]))

    for boot in (1, 2):
        probe = last_json(run_dir / f"probe-at-cut.{boot}.json")
        check(
            f"boot {boot}: the kernel holds both sessions at the cut",
            probe == dict.fromkeys(SESSIONS, HELD),
            probe,
        )
    for boot, (update_id, phase) in zip((2, 3, 5), CUTS, strict=True):
        history = (last_json(run_dir / f"history.{boot}.json") or {}).get("history", [])
        entries = [h for h in history if h["id"] == update_id]
        entry = entries[0] if len(entries) == 1 else {}
        check(
            f"boot {boot}: {update_id} recorded once, lost-in-reboot, HandoverLost",
            (entry.get("result"), entry.get("error-name", "").rsplit(".", 1)[-1])
            == ("lost-in-reboot", "HandoverLost"),
            entries,
        )
        message = entry.get("message", "")
        when = "in its live-update boot" if phase == "restoring" else "went down"
        check(
            f"boot {boot}: the record says when: last seen in phase {phase}",
            f"last seen in phase {phase}" in message and when in message,
            message,
        )
        probe = last_json(run_dir / f"probe.{boot}.json")
        check(
            f"boot {boot}: no session left in the kernel",
            probe == dict.fromkeys(SESSIONS, RELEASED),
            probe,
        )
        kho_in = read_text(run_dir / f"kho-in.{boot}")
        check(
            f"boot {boot}: no KHO handover came in (kho/in absent)",
            "No such file" in kho_in,
            kho_in,
        )
        files = read_text(run_dir / f"state-files.{boot}").split()
        check(f"boot {boot}: no in-flight record left", "in-flight.json" not in files, files)
        journal = read_text(run_dir / f"journal.{boot}.log")
        said = f"luo-example: started without the state it preserved: update {update_id} was lost"
        check(
            f"boot {boot}: the participant knows it started without its state", said in journal, ""
        )
        status = (last_json(run_dir / f"status.{boot}.json") or {}).get("Phase")
        check(f"boot {boot}: the agent is idle", status == "idle", status)
    history = (last_json(run_dir / "history.6.json") or {}).get("history", [])
    outcomes = [(h["id"], h["result"]) for h in history]
    expected = [(u, "lost-in-reboot") for u, _ in CUTS] + [(FINAL_UPDATE, "success")]
    check(
        "boot 6: the history, one entry per update, the next update a success",
        outcomes == expected,
        outcomes,
    )
    restore = last_json(run_dir / "restore.6.json") or {}
    check(
        "boot 6: the participant verified every byte and the position",
        bool(restore.get("verified")) and restore.get("got") == restore.get("expected"),
        restore.get("got"),
    )
    probe = last_json(run_dir / "probe.6.json")
    check(
        "boot 6: no session left in the kernel", probe == dict.fromkeys(SESSIONS, RELEASED), probe
    )
    return found
