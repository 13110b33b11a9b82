"""Several emulated hosts updating at once against a real etcd: each host is its own agent
process under its own systemd user manager (``Testbed``: the project's units, unchanged but for
the sandbox's paths), with its own emulated kernel and machine id.

The agents reach etcd over unix sockets (the shipped unit has no network: ``PrivateNetwork=yes``),
one per member; the cluster's peers talk over loopback ports.  One timeline is built from every
host's history: from the end of ``coordinating`` (slot taken) to ``slot_released_at``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from luo_agent.fleet.etcd import HALT_KEY, SEMAPHORE_KEY
from luo_agent.fleet.identity import host_id_from_machine_id
from luo_agent.sandbox import Sandbox
from luo_agent.testbed import Testbed
from tests.e2e.conftest import needs_sandbox
from tests.e2e.liveupdate_flow import (
    ctl_json,
    history_entry,
    main_pid,
    participant,
    status,
    wait_until,
)

from .etcd_server import Cluster, Member, free_port, need_etcd

pytestmark = [pytest.mark.systemd, pytest.mark.root, pytest.mark.slow, needs_sandbox]

SLOW = 240.0  # seconds: a host may wait for several others' whole updates on a busy machine
HEALTH = "fleet-health.target"


class FleetBed(Testbed):
    """A testbed whose agent may reach the etcd sockets' directory."""

    def __init__(self, workdir: Path, etcd_dir: Path, fleet: str) -> None:
        machine_id = workdir / "etc/machine-id"
        machine_id.parent.mkdir(parents=True, exist_ok=True)
        machine_id.write_text(os.urandom(16).hex() + "\n")
        config = (
            "[fleet]\nenabled = true\nretry_interval = 0.2\nrelease_retry_max = 1.0\n"
            f'machine_id_file = "{machine_id}"\n{fleet}\n'
            "[timeouts]\ncoordinate = 300.0\n"
        )
        super().__init__(workdir, "session", agent_config=config)
        self.etcd_dir = etcd_dir
        self.host_id = host_id_from_machine_id(machine_id)

    def boot_with(self, stack: contextlib.ExitStack, units: dict[str, str]) -> Sandbox:
        """A boot with test participants ``units`` hooked in (enabled, with the example's)."""
        hooks = [u for u in units if u.endswith(".service")]
        enable = ("luo-example-prepare.service", "luo-example-restore.service", *hooks)
        return self.boot_sandbox(stack, extra_units=units, enable=enable)

    def update(self, box: Sandbox, update_id: str) -> dict[str, Any]:
        """``liveupdatectl update --wait``: returns once the kexec is issued (or it failed)."""
        kernel = str(self.kernel_image)
        args = ("update", "--id", update_id, "--kernel", kernel, "--wait", "--timeout", str(SLOW))
        return ctl_json(self, box, *args)

    def dropins(self) -> dict[str, str]:
        units = super().dropins()
        key = "luo-agent.service.d/50-sandbox.conf"
        units[key] += f"BindPaths={self.etcd_dir}\n"
        return units


def start_cluster(tmp: Path, size: int) -> Cluster:
    """Members listening on loopback (for the test) and on a unix socket (for the agents)."""
    need_etcd()
    cluster = Cluster()
    for index in range(size):
        name = f"m{index}"
        data = tmp / f"etcd-{name}"
        data.mkdir(parents=True)
        tcp = f"http://127.0.0.1:{free_port()}"
        member = Member(
            name,
            data / "data",
            tcp,
            f"http://127.0.0.1:{free_port()}",
            tmp / f"etcd-{name}.log",
            # etcd names a unix://HOST:PORT listener's socket HOST:PORT in its working directory.
            extra=(f"--listen-client-urls={tcp},unix://etcd.sock:0",),
            cwd=data,
        )
        cluster.members.append(member)
    initial = ",".join(f"{m.name}={m.peer_url}" for m in cluster.members)
    for member in cluster.members:
        member.start(initial)
    cluster.wait_healthy()
    return cluster


def unix_endpoints(tmp: Path, size: int) -> str:
    return json.dumps([f"unix://{tmp}/etcd-m{i}/etcd.sock:0" for i in range(size)])


def holders(cluster: Cluster, group: str) -> list[str]:
    raw = cluster.get(SEMAPHORE_KEY.format(group=group))
    return list(json.loads(raw)["holders"]) if raw else []


@dataclass
class Outcome:
    host: str
    update: dict[str, Any]
    error: str = ""


def fleet_state(bed: Testbed, box: Sandbox) -> list[str]:
    return list(status(bed, box).get("Fleet", ["", "", "", ""]))


def one_host_update(bed: FleetBed, update_id: str, health_units: dict[str, str]) -> Outcome:
    """Update one host through its kexec; the new boot restores, finishes, passes its health
    target and releases its slot.  Returns its history entry from the new boot."""
    with contextlib.ExitStack() as first_boot:
        box = bed.boot_sandbox(first_boot)
        result = bed.update(box, update_id)
        if result.get("phase") != "rebooting":
            return Outcome(bed.host_id, history_entry(bed, box, update_id), json.dumps(result))
        bed.machine.wait_down(timeout=SLOW)
    bed.machine.boot()
    with contextlib.ExitStack() as second_boot:
        box = bed.boot_with(second_boot, health_units)
        # Released only after finish and the health target: the slot file is gone then.
        wait_until(
            f"{bed.host_id} to release its slot",
            lambda: (s := fleet_state(bed, box)) and s[0] == "" and s[1] == bed.host_id,
            timeout=SLOW,
        )
        return Outcome(bed.host_id, history_entry(bed, box, update_id))


# A health check the slot waits for: passes 0.3 s after the new boot's finish.
HEALTH_UNITS = {
    HEALTH: "[Unit]\nDescription=fleet health\n",
    "app-health.service": participant(HEALTH, "/bin/sleep 0.3", "application health"),
}


def blackout(entry: dict[str, Any]) -> tuple[float, float]:
    """From the freeze (after the slot was taken: coordinating ends as freezing starts) to the
    end of the new boot's finish (before the release is even asked for)."""
    phases = [t[0] for t in entry["timings"]]
    assert phases[phases.index("coordinating") + 1] == "freezing", phases
    freezing = entry["timings"][phases.index("freezing")]
    finishing = entry["timings"][phases.index("finishing")]
    return float(freezing[1]), float(finishing[1] + finishing[2])


def test_six_hosts_two_slots_leader_killed_midway(tmp_path: Path) -> None:
    group = "rollout"
    cluster = start_cluster(tmp_path, 3)
    beds = [
        FleetBed(
            tmp_path / f"host{i}",
            tmp_path,
            f'endpoints = {unix_endpoints(tmp_path, 3)}\ngroup = "{group}"\nslots = 2\n'
            f'health_target = "{HEALTH}"\n',
        )
        for i in range(6)
    ]
    most = 0
    seen: set[str] = set()
    stop = threading.Event()
    killed: list[str] = []

    def watch() -> None:
        # etcd's own view, alongside the agents' histories; and the leader killed once two hosts
        # hold slots.
        nonlocal most
        while not stop.is_set():
            with contextlib.suppress(subprocess.SubprocessError, ValueError):
                now = holders(cluster, group)
                most = max(most, len(now))
                seen.update(now)
                if not killed and len(seen) >= 2:
                    leader = cluster.leader()
                    leader.kill()
                    killed.append(leader.name)
            time.sleep(0.05)

    for bed in beds:
        bed.machine.boot()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with ThreadPoolExecutor(len(beds)) as pool:
            outcomes = list(
                pool.map(lambda b: one_host_update(b, f"roll-{b.workdir.name}", HEALTH_UNITS), beds)
            )
    finally:
        stop.set()
        watcher.join(10)
        for bed in beds:
            bed.machine.poweroff()
        cluster.stop()
    assert killed, "the leader was never killed"
    for outcome in outcomes:
        assert not outcome.error, outcome
        assert outcome.update["result"] == "success", outcome
        assert outcome.update["fleet-slot"].startswith(outcome.host + " @ etcd ")
    # One timeline from every host (one clock: the emulated hosts share this machine's): never
    # more than two in blackout at once.
    events = sorted(
        [(blackout(o.update)[0], +1) for o in outcomes]
        + [(blackout(o.update)[1], -1) for o in outcomes],
        key=lambda e: (e[0], e[1]),
    )
    held = peak = 0
    for _, change in events:
        held += change
        peak = max(peak, held)
    assert peak <= 2, events
    # Released after the finish and the health check (0.3 s at least), not before.
    for outcome in outcomes:
        assert outcome.update["slot-released-at"] >= blackout(outcome.update)[1] + 0.3
    assert most <= 2 and seen == {b.host_id for b in beds}


def test_a_failed_boot_keeps_its_slot_and_halts_the_rollout(tmp_path: Path) -> None:
    group = "halting"
    cluster = start_cluster(tmp_path, 1)
    fleet = f'endpoints = {unix_endpoints(tmp_path, 1)}\ngroup = "{group}"\nslots = 1\n'
    failing, waiting = (
        FleetBed(tmp_path / "fails", tmp_path, fleet),
        FleetBed(tmp_path / "waits", tmp_path, fleet),
    )
    # The failing host's restore participant fails in its new boot.
    broken = {
        "broken-restore.service": participant(
            "liveupdate-restore.target", "/bin/false", "a restore that fails"
        )
    }
    for bed in (failing, waiting):
        bed.machine.boot()
    try:
        with contextlib.ExitStack() as first_boot:
            box = failing.boot_sandbox(first_boot)
            result = failing.update(box, "u-fail")
            assert result["phase"] == "rebooting", result
            failing.machine.wait_down(timeout=SLOW)
        assert holders(cluster, group) == [failing.host_id]
        failing.machine.boot()
        with contextlib.ExitStack() as stack:
            box = failing.boot_with(stack, broken)
            wait_until(
                "the failed host's slot to be marked failed",
                lambda: fleet_state(failing, box)[0] == "failed",
                timeout=SLOW,
            )
            wait_until(
                "the halt key",
                lambda: cluster.get(HALT_KEY.format(group=group)),
                timeout=SLOW,
            )
            other = waiting.boot_sandbox(stack)
            refused = waiting.update(other, "u-wait")
            entry = history_entry(waiting, other, "u-wait")
            assert entry["result"] == "failed", (refused, entry)
            assert "halted" in entry["message"] and entry["error-name"].endswith("CoordinatorError")
            assert waiting.machine.inspect()["outgoing_sessions"] == []
        # The failed host keeps its slot; the halt stays for everyone.
        assert holders(cluster, group) == [failing.host_id]
        failed = json.loads(cluster.get(f"luo-agent/groups/{group}/v1/failed") or "{}")
        assert failed == {"hosts": [failing.host_id]}
    finally:
        for bed in (failing, waiting):
            bed.machine.poweroff()
        cluster.stop()


def test_sigkill_between_acquire_and_kexec_gives_the_slot_back(tmp_path: Path) -> None:
    group = "killed"
    cluster = start_cluster(tmp_path, 1)
    bed = FleetBed(
        tmp_path / "host",
        tmp_path,
        f'endpoints = {unix_endpoints(tmp_path, 1)}\ngroup = "{group}"\n',
    )
    # A freeze participant that takes its time: the agent holds its slot meanwhile.
    slow_freeze = {
        "slow-freeze.service": participant(
            "liveupdate-freeze.target", "/bin/sleep 30", "a slow freeze hook"
        )
    }
    bed.machine.boot()
    try:
        with contextlib.ExitStack() as stack:
            box = bed.boot_with(stack, slow_freeze)
            bed.ctl(box, "load-kernel", str(bed.kernel_image))
            assert ctl_json(bed, box, "prepare", "--id", "u-kill", "--wait")["phase"] == "prepared"
            bed.ctl(box, "execute", "--id", "u-kill")
            wait_until("the freeze", lambda: status(bed, box).get("Phase") == "freezing")
            assert holders(cluster, group) == [bed.host_id]
            victim = main_pid(box, "luo-agent.service")
            os.kill(victim, signal.SIGKILL)
            # systemd restarts the agent; it cancels the dead update and gives the slot back.
            wait_until("the slot to be released", lambda: holders(cluster, group) == [], SLOW)
            entry = history_entry(bed, box, "u-kill")
            assert entry["result"] == "aborted", entry
            assert fleet_state(bed, box)[0] == ""
            shown = f"Fleet slot:     none (host {bed.host_id}, etcd unix://"
            assert shown in bed.ctl(box, "status")
            assert bed.machine.inspect()["outgoing_sessions"] == []
    finally:
        bed.machine.poweroff()
        cluster.stop()
