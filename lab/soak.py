"""Live update after live update on one lab VM: ``./scripts/vm soak N`` (run by hand, not in CI).

One VM (systemd as PID 1, the Debian package, the example participant, as in
``lab/liveupdate.py``) goes through N real kexecs in a row.  Every boot after a kexec checks that
the update ended ``success`` and that the participant verified every byte of its 4 MiB memfd and
its file position, then measures, at the same point (the update finished, the agent idle):

* the sessions left: the agent's ``ListSessions`` and a raw probe of the kernel
  (RETRIEVE_SESSION / CREATE_SESSION of every session name the updates used);
* the agent's open fds, memfds among them, and its RSS; then again after a prepare and a cancel
  in the same agent process (an agent that lives through many updates);
* the kernel's preserved-memory bookkeeping as Linux 7.2 exposes it: the KHO debugfs tree
  (``/sys/kernel/debug/kho/in``: the handover FDT and its subtrees, whose sizes grow with what is
  carried; ``out/scratch_len``), the LUO liveupdate number from the boot log, and
  ``/proc/meminfo`` (MemTotal, MemFree, Shmem).

The host prints one row per boot and a verdict: every update a success and verified, and every
count flat (the same after every update).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

from .guest_setup import BOOKWORM, Host
from .in_vm import probe
from .scenarios import SESSIONS
from .systemd_job import RELEASED, last_json, systemd_vm
from .vm import VmResult

# Seconds per round at most (TCG on a loaded 2-core host): a boot, the package setup, an update.
ROUND_SECONDS = 360.0
KHO = Path("/sys/kernel/debug/kho")
MEMINFO_KEYS = ("MemTotal", "MemFree", "MemAvailable", "Shmem")


def soak_job(kernel: Path, rounds: int) -> str:
    return f"""\
soak() {{ (cd "$REPO" && "$PY" -m lab.soak "$@"); }}
ready
if [ "$LAB_BOOT" = 1 ]; then
    soak measure > "$out/measure.$LAB_BOOT.json" || exit 21
else
    lab wait-ended --timeout 300 > "$out/status.$LAB_BOOT.json" || {{ save_journal; exit 20; }}
    cp /var/lib/luo-example/last-restore.json "$out/restore.$LAB_BOOT.json" || exit 22
    soak measure > "$out/measure.$LAB_BOOT.json" || exit 21
    # The same agent process through a prepare and a cancel: what it holds comes back.
    liveupdatectl --json prepare --wait --id "soak-cancel-$LAB_BOOT" > /dev/null || exit 23
    liveupdatectl cancel --id "soak-cancel-$LAB_BOOT" || exit 24
    lab wait-ended --timeout 120 > /dev/null || exit 25
    soak measure > "$out/measure-after-cancel.$LAB_BOOT.json" || exit 21
fi
if [ "$LAB_BOOT" -le {rounds} ]; then
    liveupdatectl load-kernel {kernel} --reuse-cmdline > /dev/null || exit 12
    mark clock "$(date +%s.%N)"
    systemctl start liveupdate.service
    echo "lab: liveupdate.service returned $?"
    sleep 300
    echo "lab: no kexec"
    exit 14
fi
liveupdatectl --json history --limit 100 > "$out/history.json"
save_journal
"""


def run_soak(
    kernel: Path,
    rounds: int,
    run_dir: Path,
    *,
    host: Host = BOOKWORM,
    echo: IO[str] | None = None,
) -> VmResult:
    vm, job, setup = systemd_vm(kernel, host, lambda image: soak_job(image, rounds), echo=echo)
    return vm.run(job, run_dir, ROUND_SECONDS * (rounds + 1), systemd_setup=setup)


# ------------------------------------------------------------------------------ in the VM


def measure() -> dict[str, Any]:
    pid = subprocess.run(
        ["systemctl", "show", "-p", "MainPID", "--value", "luo-agent.service"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    fds = os.listdir(f"/proc/{pid}/fd")
    memfds = sum(1 for fd in fds if _link(f"/proc/{pid}/fd/{fd}").startswith("/memfd:"))
    status = Path(f"/proc/{pid}/status").read_text()
    rss = re.search(r"VmRSS:\s+(\d+) kB", status)
    sessions = subprocess.run(
        ["liveupdatectl", "--json", "sessions"], capture_output=True, text=True, check=True
    ).stdout
    meminfo = {
        line.split(":")[0]: int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
    }
    dmesg = subprocess.run(["dmesg"], capture_output=True, text=True, check=False).stdout
    number = re.search(r"liveupdate number: (\d+)", dmesg)
    return {
        "agent": {
            "pid": int(pid),
            "fds": len(fds),
            "memfds": memfds,
            "rss_kib": int(rss.group(1)) if rss else -1,
        },
        "agent_sessions": len(json.loads(sessions.splitlines()[-1])["sessions"]),
        "kernel_sessions": probe(list(SESSIONS)),
        "kho": _kho_tree(),
        "liveupdate_number": int(number.group(1)) if number else None,
        "meminfo_kib": {key: meminfo.get(key) for key in MEMINFO_KEYS},
    }


def _link(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def _kho_tree() -> dict[str, int]:
    """Every file of the KHO debugfs tree: its size in bytes (blobs) or its value (numbers)."""
    found: dict[str, int] = {}
    for path in sorted(KHO.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            name = str(path.relative_to(KHO))
            if name.startswith("out/scratch"):
                found[name] = sum(int(v, 16) for v in data.split())
            else:
                found[name] = len(data)
    return found


# ------------------------------------------------------------------------------ the host side


def table(run_dir: Path, rounds: int) -> tuple[list[str], bool]:
    """One row per boot, and whether every update succeeded, verified, with flat counts."""
    rows, ok = [], True
    header = (
        "| boot | update | verified | sessions (agent/kernel) | agent fds | memfds | RSS MiB "
        "| after prepare+cancel: fds/memfds/RSS MiB | KHO in (FDT+subtrees, B) | LUO number "
        "| MemFree MiB | Shmem MiB |"
    )
    rows += [header, "|" + "---|" * (header.count("|") - 1)]
    history = last_json(run_dir / "history.json")
    records = {h["id"]: h for h in history["history"]} if history else {}
    flat: dict[str, set[Any]] = {}
    rss: list[int] = []
    for boot in range(1, rounds + 2):
        m = last_json(run_dir / f"measure.{boot}.json")
        if m is None:
            rows.append(f"| {boot} | (no measure: the run stopped here) |")
            ok = False
            break
        after = last_json(run_dir / f"measure-after-cancel.{boot}.json")
        restore = last_json(run_dir / f"restore.{boot}.json")
        status = last_json(run_dir / f"status.{boot}.json")
        update, verified = "-", "-"
        if boot > 1:
            last = (status or {}).get("LastResult", ["", "", "", ""])
            result = records.get(last[0], {}).get("result", last[1])
            update = f"{last[0]} {result}"
            good = bool(restore and restore["verified"] and restore["got"] == restore["expected"])
            verified = f"{restore['got']['size']} B, pos {restore['got']['pos']}" if good else "NO"
            ok = ok and result == "success" and good
        held = [n for n, r in m["kernel_sessions"].items() if r != RELEASED]
        kho_in = sum(v for k, v in m["kho"].items() if k.startswith("in/"))
        a = m["agent"]
        after_text = "-"
        if after is not None:
            b = after["agent"]
            after_text = f"{b['fds']}/{b['memfds']}/{b['rss_kib'] / 1024:.1f}"
            flat.setdefault("fds after cancel", set()).add(b["fds"])
            flat.setdefault("memfds after cancel", set()).add(b["memfds"])
        mem = m["meminfo_kib"]
        rows.append(
            f"| {boot} | {update} | {verified} | {m['agent_sessions']}/{len(held)} | {a['fds']} "
            f"| {a['memfds']} | {a['rss_kib'] / 1024:.1f} | {after_text} | "
            f"{kho_in if boot > 1 else '-'} | {m['liveupdate_number']} | "
            f"{mem['MemFree'] / 1024:.0f} | {mem['Shmem'] / 1024:.1f} |"
        )
        if boot > 1:  # the first boot is a cold one: no handover, another agent's start
            rss.append(a["rss_kib"])
            flat.setdefault("agent fds", set()).add(a["fds"])
            flat.setdefault("agent memfds", set()).add(a["memfds"])
            flat.setdefault("KHO in bytes", set()).add(kho_in)
        flat.setdefault("sessions left (agent)", set()).add(m["agent_sessions"])
        flat.setdefault("sessions left (kernel)", set()).add(len(held))
    for name, values in flat.items():
        steady = len(values) == 1
        ok = ok and steady
        rows.append(f"{name}: {'flat' if steady else 'NOT flat'} ({sorted(values)})")
    if rss:
        # A new agent process each boot: its RSS varies with what it ran, so it is reported
        # (first, last, spread) rather than required to be equal.
        rows.append(
            f"agent RSS after each update: first {rss[0] / 1024:.1f} MiB, last "
            f"{rss[-1] / 1024:.1f} MiB, spread {(max(rss) - min(rss)) / 1024:.1f} MiB"
        )
    return rows, ok


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if args == ["measure"]:
        print(json.dumps(measure()))
        return 0
    print("usage: python -m lab.soak measure (in the VM); ./scripts/vm soak N", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
