"""The fleet slot on the real kernel (``docs/fleet.md``): taken before the freeze, held across a
real kexec, released in the new boot after finish and health.

The lab kernel has no TCP/IP and the VM may reach no address but its own, so etcd 3.4 runs inside
the VM on unix sockets only (etcd names a ``unix://NAME:PORT`` listener's socket file
``NAME:PORT`` in its working directory: ``/run/lab-etcd/etcd.sock:0``), its data on the lab's
disk (``DISK_MOUNT``, the run directory with a page cache), which the kexec keeps.  The direct
strategy's ``reboot(KEXEC)`` stops nothing: etcd goes down as in a power cut and the new boot
starts it again from what it had fsync'd.  The agent's unit is unchanged: ``/run`` is visible to
it and a unix socket needs no network.

In the new boot the release waits for ``lab-fleet-health.target`` (``fleet.health_target``), whose
check passes only once the job has read airlock's key: that read is proof that the slot was still
held after the kexec, not merely history.  Then every revision of the key is read (the take in
the first boot, the release in the second).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from .guest_setup import DISK_MOUNT
from .liveupdate import run_scenario
from .results import UpdateRun
from .scenarios import Scenario, whole_update_job

SOCKET = "/run/lab-etcd/etcd.sock:0"
GROUP = "lab"
KEY = f"com.coreos.airlock/groups/{GROUP}/v1/semaphore"
HEALTH_TARGET = "lab-fleet-health.target"
HELD_READ = "fleet-held-read"  # the job's flag: the key was read in the new boot

ETCD_UNIT = f"""\
[Unit]
Description=lab: etcd for the fleet slot, its data on the disk that the kexec keeps
[Service]
RuntimeDirectory=lab-etcd
WorkingDirectory=/run/lab-etcd
ExecStart=/usr/bin/etcd --name lab --data-dir {DISK_MOUNT}/etcd-data \\
    --listen-client-urls unix://etcd.sock:0 --advertise-client-urls unix://etcd.sock:0 \\
    --listen-peer-urls unix://peer.sock:0 --initial-advertise-peer-urls unix://peer.sock:0 \\
    --initial-cluster lab=unix://peer.sock:0 --logger=zap --log-level=warn
[Install]
WantedBy=multi-user.target
"""

# Not enabled: only the agent starts it, in the new boot, before the release.
HEALTH_UNITS = f"""\
cat > "$root/etc/systemd/system/{HEALTH_TARGET}" <<'UNIT'
[Unit]
Description=lab: this host is healthy (its fleet slot may be released)
Requires=lab-fleet-health.service
After=lab-fleet-health.service
UNIT
cat > "$root/etc/systemd/system/lab-fleet-health.service" <<'UNIT'
[Unit]
Description=lab: healthy once the job has read the slot still held in the new boot
[Service]
Type=oneshot
TimeoutStartSec=600
EnvironmentFile=/etc/lab.env
ExecStart=/bin/sh -c 'until [ -e "$LAB_RUN/{HELD_READ}" ]; do sleep 0.5; done'
UNIT
"""

SETUP = f"""{HEALTH_UNITS}cat >> "$root/etc/luo-agent/config.toml" <<'TOML'
[fleet]
enabled = true
endpoints = ["unix://{SOCKET}"]
group = "{GROUP}"
retry_interval = 1.0
release_retry_max = 5.0
health_target = "{HEALTH_TARGET}"
TOML
"""

# Functions of both boots: etcd answering, airlock's key read (at a revision, if given).
HEAD = f"""\
etcd_ready() {{
    n=0
    until curl -s --unix-socket '{SOCKET}' http://localhost/health | grep -q '"health":"true"'; do
        n=$((n + 1))
        if [ $n -gt 300 ]; then systemctl status --no-pager lab-etcd.service; return 1; fi
        sleep 1
    done
}}
read_key() {{
    body="{{\\"key\\":\\"$(printf %s '{KEY}' | base64 -w0)\\""
    if [ -n "$1" ]; then body="$body,\\"revision\\":\\"$1\\""; fi
    curl -s --unix-socket '{SOCKET}' -X POST http://localhost/v3/kv/range -d "$body}}"
}}
"""

# The first boot, before the update: etcd answers, its data is on the kept disk.
BEFORE_UPDATE = f"""\
    etcd_ready || {{ save_journal; exit 16; }}
    grep ' {DISK_MOUNT} ' /proc/mounts > "$out/fleet-disk.mount"
    test -d "$out/etcd-data/member/wal" || {{ save_journal; exit 17; }}
    journalctl -f -b -n all -o short-precise -u lab-etcd.service > "$out/journal-etcd.1.log" &
"""

# The new boot, once the update ended: etcd is back; the key read while the release still waits
# for the health check; then the release awaited and every revision of the key read.
AFTER_UPDATE = f"""\
etcd_ready || {{ save_journal; exit 21; }}
read_key > "$out/fleet-key.held.json"
liveupdatectl --json status > "$out/status.held.json"
date +%s.%N > "$out/{HELD_READ}"
n=0
until liveupdatectl --json status | grep -q '"Fleet": \\["",'; do
    n=$((n + 1)); if [ $n -gt 180 ]; then save_journal; exit 22; fi; sleep 1
done
last=$(read_key | sed 's/.*"revision":"\\([0-9]*\\)".*/\\1/')
for rev in $(seq 1 "$last"); do read_key "$rev"; echo; done > "$out/fleet-key.jsonl"
lab host-id > "$out/host-id"
# The same derivation by systemd itself (sd_id128_get_machine_app_specific).
app=$(lab fleet-app-id)
systemd-id128 machine-id --app-specific="$app" > "$out/host-id.systemd"
"""


def job(kernel: Path) -> str:
    return HEAD + whole_update_job(kernel, before_update=BEFORE_UPDATE, after_update=AFTER_UPDATE)


SCENARIO = Scenario(
    "fleet-slot",
    job,
    # Two boots with the package installed in each and etcd started in each under TCG.
    1200.0,
    {"lab-etcd.service": ETCD_UNIT},
    setup=SETUP,
    disk=True,
)


def run(kernel: Path, run_dir: Path, **options: Any) -> UpdateRun:
    return run_scenario(kernel, SCENARIO, run_dir, **options)


def _semaphore(answer: str) -> dict[str, Any] | None:
    """airlock's value in one range answer of etcd's gateway, or None (no key, no answer)."""
    try:
        kvs = json.loads(answer).get("kvs") if answer.strip() else None
    except ValueError:
        return None
    return json.loads(base64.b64decode(kvs[0]["value"])) if kvs else None


def key_values(run: UpdateRun) -> list[dict[str, Any]]:
    """Each distinct value airlock's key had, oldest first (from ``fleet-key.jsonl``)."""
    values: list[dict[str, Any]] = []
    for line in run.text("fleet-key.jsonl").splitlines():
        value = _semaphore(line)
        if value is not None and (not values or values[-1] != value):
            values.append(value)
    return values


def checks(run: UpdateRun) -> list[tuple[str, bool, str]]:
    """(what must hold, whether it did, what was seen) for ``./scripts/vm demo``'s verdict."""
    host = run.text("host-id").strip()
    by_systemd = run.text("host-id.systemd").strip()
    update = run.summary.get("update", {})
    values = key_values(run)
    held = _semaphore(run.text("fleet-key.held.json"))
    entries = [e for e in run.history if e.get("id") == update.get("id")]
    entry = entries[-1] if entries else {}
    read_at = run.text(HELD_READ).strip()
    released_at = float(entry.get("slot-released-at") or 0.0)
    phases = [str(timing[0]) for timing in entry.get("timings", [])]
    return [
        (
            "the update succeeded across one real kexec",
            run.vm.ok and run.vm.boots == 2 and update.get("result") == "success",
            f"{run.vm.describe()}; result {update.get('result')!r}",
        ),
        (
            "the host id is derived from the machine id (the agent's and systemd's derivation)",
            bool(host) and host == by_systemd,
            f"agent {host!r}, systemd-id128 {by_systemd!r}",
        ),
        (
            # The agent's own record of its phases (journal.1.log is saved before the freeze).
            "the slot was taken before the freeze (the record's phases: coordinating, freezing)",
            "coordinating" in phases
            and phases[phases.index("coordinating") + 1 :][:1] == ["freezing"],
            f"phases {phases}",
        ),
        (
            "airlock's key held this host, then nobody (the take, then the release)",
            [v.get("holders") for v in values] == [[host], []],
            f"{values}",
        ),
        (
            "the key read in the new boot, before the release, still held this host",
            held is not None and held.get("holders") == [host],
            f"{held}",
        ),
        (
            "the history names the slot and when it was released, after that read",
            str(entry.get("fleet-slot", "")).startswith(f"{host} @ ")
            and bool(read_at)
            and released_at > float(read_at or 0),
            f"fleet-slot {entry.get('fleet-slot')!r}, slot-released-at {released_at}, "
            f"read at {read_at or '?'}",
        ),
    ]


def summary_lines(run: UpdateRun) -> list[str]:
    lines = [f"this host's fleet id: {run.text('host-id').strip() or '?'}"]
    lines.append("every value of airlock's key, oldest first:")
    lines += [f"    {value}" for value in key_values(run)]
    lines.append(f"read in the new boot before the release: {run.text('fleet-key.held.json')}")
    return lines
