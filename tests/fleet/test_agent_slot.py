"""The agent's coordination step on the emulated kernel, against a real etcd on loopback.

The agent runs in this process with the recording gate (tests/fakes); the same hosts under real
systemd managers and as real processes are tests/fleet/test_fleet_hosts.py.  A "boot" clears the
runtime directory, as a real boot clears /run.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from luo_agent import phase as ph
from luo_agent.agent import Agent
from luo_agent.config import Config, FleetConfig
from luo_agent.fleet import make_coordinator
from luo_agent.fleet.etcd import SEMAPHORE_KEY
from luo_agent.kernel.device import Abi
from luo_agent.kernel.emulator import EmulatedMachine
from luo_agent.persist import History
from luo_agent.systemd.gate import UnitStatus
from tests.agent_host import AgentHost, memfd_with, poll, until
from tests.fakes.gate import FakeGate

from .etcd_server import Cluster, free_port, make_cluster

HEALTH = "fleet-health.target"


@pytest.fixture
def host(tmp_path: Path) -> Iterator[AgentHost]:
    machine = EmulatedMachine(tmp_path / "machine", Abi.SESSION)
    machine.boot()
    (tmp_path / "machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    try:
        yield AgentHost(tmp_path, Abi.SESSION, machine)
    finally:
        machine.poweroff()


def fleet(host: AgentHost, endpoints: list[str], group: str, **kw: object) -> FleetConfig:
    return FleetConfig(
        enabled=True,
        endpoints=tuple(endpoints),
        group=group,
        slots=1,
        retry_interval=0.05,
        release_retry_max=0.2,
        machine_id_file=host.workdir / "machine-id",
        **kw,  # type: ignore[arg-type]
    )


def agent(
    host: AgentHost, gate: FakeGate, fleet_config: FleetConfig
) -> contextlib.AbstractAsyncContextManager[Agent]:
    cfg: Config = dataclasses.replace(host.config(coordinate=5.0), fleet=fleet_config)
    return host.agent(gate, config=cfg, coordinator=make_coordinator(fleet_config))


def holders(etcd: Cluster, group: str) -> list[str]:
    raw = etcd.get(SEMAPHORE_KEY.format(group=group))
    return list(json.loads(raw)["holders"]) if raw else []


async def prepare_and_execute(agent: Agent, host: AgentHost, update_id: str) -> None:
    fd = memfd_with(b"x" * 4096, 0)
    agent.preserve(fd, "vm-1", 1, [], owner="uid=0")
    kfd = host.kernel_image()
    await agent.load_kernel(kfd, -1, "console=ttyS0")
    await agent.prepare(update_id)
    await until(agent, lambda: agent.phase is ph.Phase.PREPARED)
    await agent.execute(update_id)


async def test_slot_held_across_the_kexec_and_released_after_a_healthy_finish(
    host: AgentHost, etcd: Cluster, group: str
) -> None:
    config = fleet(host, etcd.endpoints, group, health_target=HEALTH)
    async with agent(host, FakeGate(), config) as first:
        host_id = first.fleet.host_id
        await prepare_and_execute(first, host, "upd-1")
        await asyncio.to_thread(host.machine.wait_down, 10)
        assert holders(etcd, group) == [host_id]
    host.power_on()
    gate = FakeGate(failing={HEALTH: _unhealthy()})
    async with agent(host, gate, config) as second:
        assert second.fleet.host_id == host_id  # the machine id, not the boot
        assert second.record is not None
        assert second.record.fleet_slot.startswith(f"{host_id} @ etcd ")
        await second.resume()
        await until(second, lambda: second.phase is ph.Phase.IDLE)
        # Finished, but the health target fails: the slot stays held, the check is retried.
        await poll(lambda: gate.started.count(HEALTH) >= 3)
        assert holders(etcd, group) == [host_id]
        assert second.fleet.slot_state == "releasing"
        del gate.failing[HEALTH]
        await poll(lambda: second.fleet.slot_state == "")  # released, then forgotten
        assert holders(etcd, group) == []
    (entry,) = History(host.workdir / "state").load()
    assert entry["result"] == "success"
    assert entry["fleet_slot"].startswith(host_id)
    assert entry["slot_released_at"] >= entry["timings"][-1]["ended"]
    phases = [t["phase"] for t in entry["timings"]]
    assert phases[:4] == ["preparing", "prepared", "coordinating", "freezing"]


def _unhealthy() -> UnitStatus:
    return UnitStatus("app-health.service", "failed", "failed", "exit-code")


async def test_coordinator_down_cancels_before_the_freeze(host: AgentHost, group: str) -> None:
    config = fleet(host, [f"http://127.0.0.1:{free_port()}"], group)
    gate = FakeGate()
    async with agent(host, gate, config) as only:
        await prepare_and_execute(only, host, "upd-1")
        await until(only, lambda: only.phase is ph.Phase.IDLE and only.last is not None)
        assert only.last is not None
        assert only.last.result == "failed"
        assert "no etcd member answered" in only.last.message
        assert only.last.error_name == "CoordinatorError"
        assert ph.SPECS[ph.Phase.FREEZING].target not in gate.started
        assert host.kernel_state() == "normal"


async def test_a_lost_boot_keeps_its_slot_and_halts(
    host: AgentHost, etcd: Cluster, group: str
) -> None:
    config = fleet(host, etcd.endpoints, group)
    async with agent(host, FakeGate(), config) as first:
        host_id = first.fleet.host_id
        await prepare_and_execute(first, host, "upd-1")
        await asyncio.to_thread(host.machine.wait_down, 10)
    # The new kernel crashed: a cold boot, nothing handed over.
    host.machine.poweroff()
    host.power_on()
    async with agent(host, FakeGate(), config) as second:
        assert second.phase is ph.Phase.IDLE
        await poll(lambda: second.fleet.slot_state == "failed")
        coordinator = second.fleet.coordinator
        assert coordinator is not None
        status = await coordinator.status()
        for _ in range(200):
            if status.halted:
                break
            await asyncio.sleep(0.05)
            status = await coordinator.status()
        assert status.failed == (host_id,)
        assert holders(etcd, group) == [host_id]
        # The halt stops everyone, this host included.
        await prepare_and_execute(second, host, "upd-2")
        await until(second, lambda: second.last is not None and second.last.id == "upd-2")
        assert second.last is not None and "halted" in second.last.message


async def test_release_is_retried_until_etcd_answers(host: AgentHost, tmp_path: Path) -> None:
    cluster = make_cluster(tmp_path, 1)
    try:
        config = fleet(host, cluster.endpoints, "g")
        async with agent(host, FakeGate(), config) as first:
            await prepare_and_execute(first, host, "upd-1")
            await asyncio.to_thread(host.machine.wait_down, 10)
        (member,) = cluster.members
        member.kill()  # etcd is down for the whole new boot's restore and finish
        host.power_on()
        async with agent(host, FakeGate(), config) as second:
            await second.resume()
            await until(second, lambda: second.phase is ph.Phase.IDLE)
            await poll(lambda: "cannot release the slot" in second.fleet.last_error)
            assert (second.fleet.slot_state, second.fleet.update_id) == ("releasing", "upd-1")
            # Restarted on its own data: the retried release gets through.
            member.start(f"{member.name}={member.peer_url}")
            cluster.wait_healthy()
            await poll(lambda: second.fleet.slot_state == "", limit=30)
            assert holders(cluster, "g") == []
            assert second.fleet.last_error == ""
    finally:
        cluster.stop()
