"""SIGKILL of the agent at each phase on the real LUO kernel, in one VM run of two boots
(``tests/vm/test_sigkill_phases.py``; ``lab/liveupdate.py``'s ``killed-agent`` covers
``prepared``).  A hook of the phase hangs (``lab/powercut.py``'s hanging hooks), the agent is
killed while it waits on it, systemd restarts it (``Restart=on-failure``), and the run checks
what the restarted agent made of it:

boot 1 (before the kexec): killed in ``preparing`` and in ``freezing``: each update recorded
``aborted``, no session left in the kernel, the agent idle.  Then an update with hanging restore
and finish hooks is kexec'd into.

boot 2 (after the kexec): killed in ``restoring`` (the restarted agent adopts the incoming
sessions from the fd store and joins the restore job), the hook released; killed in
``finishing``, released: the update ends ``success``, the participant verified every byte, no
session left.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from .guest_setup import BOOKWORM, Host
from .powercut import hanging_hooks
from .scenarios import SESSIONS
from .systemd_job import HELD, RELEASED, last_json, systemd_vm
from .vm import VmResult

KILLED_BEFORE = (("k-preparing", "prepare"), ("k-freezing", "freeze"))
KILLED_AFTER = "k-after"
UNITS = hanging_hooks("prepare", "freeze", "restore", "finish")


def sigkill_job(kernel: Path) -> str:
    probe = f"lab probe {' '.join(SESSIONS)}"
    return f"""\
sigkill() {{ (cd "$REPO" && "$PY" -m lab.sigkill "$@"); }}
until_file() {{
    n=0
    until [ -e "$1" ]; do n=$((n + 1)); [ $n -gt 600 ] && return 1; sleep 0.5; done
}}
kill_agent() {{  # $1: what to call it
    liveupdatectl --json status > "$out/status.$1.json"
    pid=$(systemctl show -p MainPID --value luo-agent.service)
    kill -KILL "$pid"
    while [ -d "/proc/$pid" ]; do sleep 0.1; done
    mark killed-$1 "$(date +%s.%N)"
    n=0
    until systemctl is-active --quiet luo-agent.service && \\
        [ "$(systemctl show -p MainPID --value luo-agent.service)" != "$pid" ]; do
        n=$((n + 1)); [ $n -gt 600 ] && return 1; sleep 0.2
    done
}}
ready
if [ "$LAB_BOOT" = 1 ]; then
    liveupdatectl load-kernel {kernel} --reuse-cmdline > /dev/null || exit 12
    touch "$out/hang-prepare"
    liveupdatectl prepare --id {KILLED_BEFORE[0][0]} || exit 13
    until_file "$out/hanging-prepare" || exit 16
    kill_agent preparing || exit 17
    sigkill recorded {KILLED_BEFORE[0][0]} > "$out/recorded.preparing.json" || exit 18
    touch "$out/release-prepare"
    {probe} > "$out/probe.preparing.json"
    touch "$out/hang-freeze"
    # The image goes with an update that ended before its kexec: load it again.
    liveupdatectl load-kernel {kernel} --reuse-cmdline > /dev/null || exit 12
    liveupdatectl --json prepare --wait --id {KILLED_BEFORE[1][0]} > /dev/null || exit 13
    liveupdatectl execute --id {KILLED_BEFORE[1][0]} || exit 13
    until_file "$out/hanging-freeze" || exit 16
    {probe} > "$out/probe.frozen.json"
    kill_agent freezing || exit 17
    sigkill recorded {KILLED_BEFORE[1][0]} > "$out/recorded.freezing.json" || exit 18
    touch "$out/release-freeze"
    {probe} > "$out/probe.freezing.json"
    touch "$out/hang-restore" "$out/hang-finish"
    liveupdatectl load-kernel {kernel} --reuse-cmdline > /dev/null || exit 12
    liveupdatectl --json prepare --wait --id {KILLED_AFTER} > /dev/null || exit 13
    liveupdatectl execute --id {KILLED_AFTER}
    sleep 300
    exit 14
fi
until_file "$out/hanging-restore" || {{ save_journal; exit 16; }}
kill_agent restoring || {{ save_journal; exit 17; }}
touch "$out/release-restore"
until_file "$out/hanging-finish" || {{ save_journal; exit 16; }}
kill_agent finishing || {{ save_journal; exit 17; }}
touch "$out/release-finish"
sigkill recorded {KILLED_AFTER} > "$out/recorded.after.json" || {{ save_journal; exit 18; }}
cp /var/lib/luo-example/last-restore.json "$out/restore.json"
{probe} > "$out/probe.after.json"
save_journal
"""


def run_sigkills(
    kernel: Path, run_dir: Path, *, host: Host = BOOKWORM, echo: IO[str] | None = None
) -> VmResult:
    vm, job, setup = systemd_vm(kernel, host, sigkill_job, UNITS, echo=echo)
    return vm.run(job, run_dir, 1200.0, systemd_setup=setup)


def checks(run_dir: Path) -> list[tuple[str, bool, str]]:
    """(what, held, what was seen) for everything the run must show."""
    found: list[tuple[str, bool, object]] = []
    for (update_id, _), phase in zip(KILLED_BEFORE, ("preparing", "freezing"), strict=True):
        status = (last_json(run_dir / f"status.{phase}.json") or {}).get("status", {})
        found.append((f"killed in {phase}", status.get("Phase") == phase, status.get("Phase")))
        entry = last_json(run_dir / f"recorded.{phase}.json") or {}
        found.append(
            (
                f"{update_id}: the restarted agent records it aborted, naming {phase}",
                entry.get("result") == "aborted" and f"phase {phase}" in entry.get("message", ""),
                entry,
            )
        )
        probe = last_json(run_dir / f"probe.{phase}.json")
        found.append(
            (f"{update_id}: no session left", probe == dict.fromkeys(SESSIONS, RELEASED), probe)
        )
    probe = last_json(run_dir / "probe.frozen.json")
    found.append(
        (
            "the kernel held both sessions while frozen",
            probe == dict.fromkeys(SESSIONS, HELD),
            probe,
        )
    )
    for phase in ("restoring", "finishing"):
        status = (last_json(run_dir / f"status.{phase}.json") or {}).get("status", {})
        found.append(
            (
                f"killed in {phase} after the kexec",
                status.get("Phase") == phase,
                status.get("Phase"),
            )
        )
    entry = last_json(run_dir / "recorded.after.json") or {}
    found.append(
        (
            f"{KILLED_AFTER}: success after both kills, one live-update boot",
            (entry.get("result"), entry.get("boots")) == ("success", 1),
            entry,
        )
    )
    restore = last_json(run_dir / "restore.json") or {}
    found.append(
        (
            "the participant verified every byte and the position",
            bool(restore.get("verified")) and restore.get("got") == restore.get("expected"),
            restore.get("got"),
        )
    )
    probe = last_json(run_dir / "probe.after.json")
    found.append(
        ("no session left after the finish", probe == dict.fromkeys(SESSIONS, RELEASED), probe)
    )
    return [(what, bool(held), str(seen)[:300]) for what, held, seen in found]


# ------------------------------------------------------------------------------ in the VM


def recorded(update_id: str, timeout: float = 240.0) -> dict[str, Any]:
    """The history entry of ``update_id`` once the agent has recorded it and is idle."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        history = subprocess.run(
            ["liveupdatectl", "--json", "history"], capture_output=True, text=True, check=False
        )
        status = subprocess.run(
            ["liveupdatectl", "--json", "status"], capture_output=True, text=True, check=False
        )
        if history.returncode == 0 and status.returncode == 0:
            phase = json.loads(status.stdout.splitlines()[-1])["status"]["Phase"]
            entries = json.loads(history.stdout.splitlines()[-1])["history"]
            mine = [e for e in entries if e["id"] == update_id]
            if mine and phase == "idle":
                return dict(mine[-1])
        time.sleep(0.5)
    raise TimeoutError(f"{update_id} not recorded after {timeout} s")


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) == 2 and args[0] == "recorded":
        try:
            print(json.dumps(recorded(args[1])))
        except TimeoutError as exc:
            print(f"lab: {exc}", file=sys.stderr)
            return 1
        return 0
    print("usage: python -m lab.sigkill recorded ID (in the VM)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
