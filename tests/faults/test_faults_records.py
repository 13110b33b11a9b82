"""What the history says when a restore is not confirmed or the handover is lost, on every kernel
backend, with the real Agent in this process on the emulated kernel and the recording FakeGate
(issue 13, items 3 and 4):

* a participant that dies right after its Retrieve: the restore gate fails, Restore again hands
  back the agent's held copy (rfc-v2 and v3 restore a token only once), and the update succeeds;
* Finish without a confirmed restore: ``finished-with-losses``, naming the failed unit and the
  fds, never ``success``;
* a kernel crash after the kexec (the next boot is a cold one, /run empty): the next agent
  records the update as ``lost-in-reboot``;
* an agent that dies while cancelling: the next one completes the cancel, ``cancelled``.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from luo_agent import phase as ph
from luo_agent.kernel.device import Abi
from luo_agent.kernel.emulator import EmulatedMachine
from luo_agent.persist import History
from luo_agent.systemd.gate import UnitStatus
from tests.agent_host import AgentHost, memfd_with, until
from tests.fakes.gate import FakeGate

RESTORE = ph.SPECS[ph.Phase.RESTORING].target
DATA = b"participant state " * 1000


@pytest.fixture
def host(abi: Abi, tmp_path: Path) -> Iterator[AgentHost]:
    machine = EmulatedMachine(tmp_path / "machine", abi)
    machine.boot()
    try:
        yield AgentHost(tmp_path, abi, machine)
    finally:
        machine.poweroff()


def history(host: AgentHost) -> list[dict[str, object]]:
    return History(host.workdir / "state").load()


async def kexec_with_one_fd(host: AgentHost, update_id: str) -> None:
    fd = memfd_with(DATA, 0)
    async with host.agent(FakeGate()) as agent:
        agent.preserve(fd, "vm-1", 7, [], owner="uid=0")
        os.close(fd)
        kfd = host.kernel_image()
        await agent.load_kernel(kfd, -1, "console=ttyS0")
        os.close(kfd)
        await agent.prepare(update_id, caller="test")
        await until(agent, lambda: agent.phase is ph.Phase.PREPARED)
        await agent.execute(update_id)
        await asyncio.to_thread(host.machine.wait_down, 10)


def read_all(fd: int) -> bytes:
    return os.pread(fd, os.fstat(fd).st_size, 0)


async def test_restore_after_a_participant_died_hands_back_the_held_copy(host: AgentHost) -> None:
    await kexec_with_one_fd(host, "upd-held")
    host.machine.boot()
    gate = FakeGate()
    got: list[bytes] = []

    async def dies_after_retrieve() -> None:
        fd = await agent.retrieve("vm-1", 7)
        os.close(fd)  # the participant's process ends before it confirmed
        raise RuntimeError("participant died")

    async def restores() -> None:
        fd = await agent.retrieve("vm-1", 7)
        got.append(read_all(fd))
        os.close(fd)

    async with host.agent(gate) as agent:
        gate.hooks[RESTORE] = dies_after_retrieve
        await agent.resume()
        await until(agent, lambda: agent.phase is ph.Phase.UPDATED and gate.started == [RESTORE])
        assert agent.record is not None and agent.record.result == "failed"
        gate.hooks[RESTORE] = restores
        await agent.restore("upd-held")  # the documented remedy works again
        await until(agent, lambda: agent.phase is ph.Phase.IDLE)
    assert got == [DATA]
    (entry,) = history(host)
    assert (entry["id"], entry["result"], entry["error_name"]) == ("upd-held", "success", "")


async def test_finish_without_a_confirmed_restore_is_not_success(host: AgentHost) -> None:
    await kexec_with_one_fd(host, "upd-loss")
    host.machine.boot()
    bad = UnitStatus("vm-restore.service", "failed", "failed", "exit-code")
    gate = FakeGate(failing={RESTORE: bad})
    async with host.agent(gate) as agent:
        await agent.resume()
        await until(agent, lambda: agent.phase is ph.Phase.UPDATED and gate.started == [RESTORE])
        await agent.finish("upd-loss")
        await until(agent, lambda: agent.phase is ph.Phase.IDLE)
    (entry,) = history(host)
    assert entry["result"] == "finished-with-losses", entry
    assert entry["error_name"] == "FinishedWithLosses"
    message = str(entry["message"])
    assert "vm-restore.service" in message and "vm-1/7 (owner uid=0)" in message, message
    assert host.kernel_state() == "normal"


async def test_a_kernel_crash_after_the_kexec_is_recorded_on_the_next_boot(host: AgentHost) -> None:
    await kexec_with_one_fd(host, "upd-crash")
    # The new kernel crashed: the machine comes up cold (no handover, /run empty).
    host.machine.poweroff()
    host.power_on()
    async with host.agent(FakeGate()) as agent:
        assert agent.phase is ph.Phase.IDLE
        assert agent.last is not None and agent.last.result == "lost-in-reboot"
    (entry,) = history(host)
    assert entry["id"] == "upd-crash" and entry["result"] == "lost-in-reboot", entry
    assert entry["error_name"] == "HandoverLost"
    assert "after the kexec was issued" in str(entry["message"]), entry
    assert not (host.workdir / "state" / "in-flight.json").exists()
    # A later boot does not record it twice.
    async with host.agent(FakeGate()):
        pass
    assert [e["id"] for e in history(host)] == ["upd-crash"]


async def test_a_power_cut_during_restore_is_recorded_as_lost_in_the_live_update_boot(
    host: AgentHost,
) -> None:
    await kexec_with_one_fd(host, "upd-cut")
    host.machine.boot()
    in_flight = History(host.workdir / "state").in_flight_path
    async with host.agent(FakeGate(hanging={RESTORE})) as agent:
        await agent.resume()
        await until(agent, lambda: agent.phase is ph.Phase.RESTORING)
    # The live-update boot's agent made its durable record say so (its stop waited for the
    # write); then the power goes, with the restore gate still running.
    assert json.loads(in_flight.read_bytes())["phase"] == "restoring"
    host.machine.poweroff()
    host.power_on()
    async with host.agent(FakeGate()) as agent:
        assert agent.phase is ph.Phase.IDLE
    (entry,) = history(host)
    assert (entry["id"], entry["result"]) == ("upd-cut", "lost-in-reboot"), entry
    message = str(entry["message"])
    assert "in its live-update boot" in message and "phase restoring" in message, message
    assert entry["boot_count"] == 1, entry
    assert not in_flight.exists()


async def test_an_agent_killed_while_cancelling_is_recorded_cancelled(host: AgentHost) -> None:
    cancel = ph.SPECS[ph.Phase.CANCELLING].target
    cancel_hooks_run = asyncio.Event()

    async def cancel_hook_hangs() -> None:
        cancel_hooks_run.set()
        await asyncio.Event().wait()

    gate = FakeGate(hooks={cancel: cancel_hook_hangs})
    agent = host.build(gate, host.config())
    runner = asyncio.create_task(agent.run())
    await agent.start()
    fd = memfd_with(DATA, 0)
    agent.preserve(fd, "vm-1", 7, [], owner="uid=0")
    os.close(fd)
    await agent.prepare("upd-cancel", caller="test")
    await until(agent, lambda: agent.phase is ph.Phase.PREPARED)
    await agent.cancel("upd-cancel")
    await asyncio.wait_for(cancel_hooks_run.wait(), 10)
    # The agent dies here (its tasks end, its kernel handles close; nothing is written).
    runner.cancel()
    assert agent._work is not None
    agent._work.cancel()
    assert agent.kernel is not None
    agent.kernel.close()
    agent.registry.close_all()

    async with host.agent(FakeGate()) as again:
        await until(again, lambda: again.phase is ph.Phase.IDLE and again.last is not None)
    (entry,) = history(host)
    assert (entry["id"], entry["result"]) == ("upd-cancel", "cancelled"), entry
    assert host.kernel_state() == "normal"
