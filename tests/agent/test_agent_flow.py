"""The real Agent on every emulated kernel generation, with a recording gate (the systemd adapter
and the whole update under a real systemd manager are tested in tests/systemd and tests/e2e)."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from luo_agent import phase as ph
from luo_agent.agent import Agent
from luo_agent.errors import Busy, InvalidArgument, PhaseError
from luo_agent.kernel.device import Abi
from luo_agent.kernel.emulator import EmulatedMachine
from luo_agent.persist import History
from luo_agent.systemd.gate import UnitStatus
from tests.agent_host import AgentHost, memfd_with, until
from tests.fakes.gate import FakeGate

PREPARE = ph.SPECS[ph.Phase.PREPARING].target
CANCEL = ph.SPECS[ph.Phase.CANCELLING].target
RESTORE = ph.SPECS[ph.Phase.RESTORING].target


@pytest.fixture
def host(abi: Abi, tmp_path: Path) -> Iterator[AgentHost]:
    machine = EmulatedMachine(tmp_path / "machine", abi)
    machine.boot()
    try:
        yield AgentHost(tmp_path, abi, machine)
    finally:
        machine.poweroff()


async def test_whole_update_carries_bytes_size_and_position(host: AgentHost) -> None:
    data = os.urandom(1 << 20)
    fd = memfd_with(data, 12345)
    async with host.agent(FakeGate()) as agent:
        agent.preserve(fd, "vm-1", 7, [], owner="uid=0")
        os.close(fd)  # the agent holds its own duplicate
        kfd = host.kernel_image()
        await agent.load_kernel(kfd, -1, "console=ttyS0")
        os.close(kfd)
        record = await agent.prepare("upd-1", caller="test")
        await until(agent, lambda: agent.phase is ph.Phase.PREPARED)
        assert host.kernel_files() == 2  # the participant's memfd and the agent's metadata
        await agent.execute("upd-1")
        await asyncio.to_thread(host.machine.wait_down, 10)
    assert record.id == "upd-1"

    host.machine.boot()
    restore_gate = FakeGate()
    retrieved: list[int] = []
    async with host.agent(restore_gate) as agent:
        assert agent.phase is ph.Phase.UPDATED
        assert agent.record is not None and agent.record.id == "upd-1"
        assert "luo_agent.update=upd-1" in agent.record.kernel_cmdline

        async def participant_restores() -> None:
            retrieved.append(await agent.retrieve("vm-1", 7))

        restore_gate.hooks[RESTORE] = participant_restores
        await agent.resume()
        await until(agent, lambda: agent.phase is ph.Phase.IDLE)
        assert agent.last is not None
        assert (agent.last.id, agent.last.result) == ("upd-1", "success")
        assert 0 <= agent.last.blackout_critical < 5.0
        assert [t.phase for t in agent.last.timings][:4] == [
            "preparing",
            "prepared",
            "freezing",
            "rebooting",
        ]
    (fd,) = retrieved
    size = os.fstat(fd).st_size
    assert size == len(data)
    assert hashlib.sha256(os.pread(fd, size, 0)).digest() == hashlib.sha256(data).digest()
    assert os.lseek(fd, 0, os.SEEK_CUR) == 12345
    os.close(fd)
    history = History(host.workdir / "state").load()
    assert [(e["id"], e["result"]) for e in history] == [("upd-1", "success")]


async def prepare_one_fd_until_ended(agent: Agent, update_id: str) -> None:
    """A participant's memfd handed in, then an update prepared until it has ended."""
    fd = memfd_with(b"x" * 4096, 0)
    agent.preserve(fd, "vm-1", 1, [], owner="uid=0")
    os.close(fd)
    await agent.prepare(update_id)
    await until(agent, lambda: agent.phase is ph.Phase.IDLE and agent.last is not None)


async def test_failing_prepare_participant_cancels(host: AgentHost) -> None:
    gate = FakeGate(failing={PREPARE: UnitStatus("bad.service", "failed", "failed", "exit-code")})
    async with host.agent(gate) as agent:
        await prepare_one_fd_until_ended(agent, "upd-2")
        assert agent.last is not None
        assert agent.last.result == "failed"
        assert agent.last.error_name == "ParticipantFailed"
        assert "bad.service" in agent.last.message and "exit-code" in agent.last.message
        assert gate.started == [PREPARE, CANCEL]
        assert host.kernel_files() == 0  # nothing left preserved in the kernel
        assert len(agent.registry) == 0
        if host.abi != Abi.SESSION:
            assert host.machine.inspect()["state"] == "normal"


async def test_hanging_prepare_participant_times_out_and_cancels(host: AgentHost) -> None:
    gate = FakeGate(hanging={PREPARE})
    async with host.agent(gate, config=host.config(prepare=0.3)) as agent:
        await agent.prepare("upd-3")
        await until(agent, lambda: agent.phase is ph.Phase.IDLE and agent.last is not None)
        assert agent.last is not None
        assert agent.last.error_name == "TimedOut"
        assert gate.cancelled == [PREPARE]  # the systemd job is cancelled, not left running
        assert CANCEL in gate.started


async def test_a_kernel_loaded_as_the_prepare_gate_ends_is_the_one_recorded(
    host: AgentHost,
) -> None:
    """LoadKernel while preparing, queued on the kernel thread just before the preservation,
    which reloads the earlier image with the update's marker: the kernel and the agent agree on
    the last image loaded, and it carries the marker."""
    images = {name: host.workdir / f"vmlinuz-{name}" for name in ("old", "new")}
    for name, path in images.items():
        path.write_bytes(name.encode() * 1000)
    fds = {name: os.open(path, os.O_RDONLY | os.O_CLOEXEC) for name, path in images.items()}
    kernel_thread_free = threading.Event()
    loads: list[asyncio.Task[str]] = []
    gate = FakeGate()
    try:
        async with host.agent(gate) as agent:

            async def participant_runs() -> None:
                # The load and the preservation queue up behind this, in that order.
                agent.custody._kernel_thread.submit(kernel_thread_free.wait)
                loads.append(asyncio.create_task(agent.load_kernel(fds["new"], -1, "new")))
                await asyncio.sleep(0)
                asyncio.get_running_loop().call_later(0.3, kernel_thread_free.set)

            gate.hooks[PREPARE] = participant_runs
            await agent.load_kernel(fds["old"], -1, "old")  # before the update: no id yet
            await agent.prepare("upd-load")
            await until(agent, lambda: agent.phase is ph.Phase.PREPARED)
            await loads[0]
            loaded = host.machine.inspect()["kexec_image"]
            new_image = hashlib.sha256(images["new"].read_bytes()).hexdigest()
            assert loaded["sha256"] == new_image
            assert loaded["cmdline"] == agent.custody.kernel_cmdline
            assert agent.record is not None and agent.record.kernel_cmdline == loaded["cmdline"]
            assert loaded["cmdline"].split() == ["new", "luo_agent.update=upd-load"]
    finally:
        kernel_thread_free.set()
        for fd in fds.values():
            os.close(fd)


class PhaseRecorder:
    def __init__(self) -> None:
        self.phases: list[ph.Phase] = []

    def phase_changed(self, record: object, phase: ph.Phase) -> None:
        self.phases.append(phase)

    def update_finished(self, record: object) -> None:
        pass

    def kernel_state_changed(self, value: str) -> None:
        pass


async def test_preparing_is_announced_and_answered_even_if_systemd_never_says_queued(
    host: AgentHost,
) -> None:
    """ "preparing" waits for its gate's job to be queued, but not on a PID 1 slow to answer."""
    heard = PhaseRecorder()
    gate = FakeGate(unqueued={PREPARE}, hanging={PREPARE})
    async with host.agent(gate) as agent:
        agent.listeners.append(heard)
        record = await asyncio.wait_for(agent.prepare("upd-q"), 5)
        assert record.id == "upd-q"
        assert heard.phases == [ph.Phase.PREPARING]
        await agent.cancel("upd-q")
        await until(agent, lambda: agent.phase is ph.Phase.IDLE)
        assert heard.phases == [ph.Phase.PREPARING, ph.Phase.CANCELLING, ph.Phase.IDLE]


async def test_execute_without_kernel_and_double_prepare_are_refused(host: AgentHost) -> None:
    async with host.agent(FakeGate()) as agent:
        await agent.prepare("upd-4")
        with pytest.raises(Busy):
            await agent.prepare("upd-5")
        await until(agent, lambda: agent.phase is ph.Phase.PREPARED)
        with pytest.raises(PhaseError):
            await agent.execute()
        await agent.cancel("upd-4")
        await until(agent, lambda: agent.phase is ph.Phase.IDLE)
        assert agent.last is not None and agent.last.result == "cancelled"


async def test_reboot_failure_keeps_the_update_prepared(host: AgentHost) -> None:
    fd = memfd_with(b"keep me", 0)
    async with host.agent(FakeGate()) as agent:
        agent.preserve(fd, "vm-1", 1, [], owner="uid=0")
        os.close(fd)
        kfd = host.kernel_image()
        await agent.load_kernel(kfd, -1, "")
        os.close(kfd)
        await agent.prepare("upd-6")
        await until(agent, lambda: agent.phase is ph.Phase.PREPARED)
        host.machine.inject_fault("reboot", errno.EAGAIN)
        await agent.execute()
        expected = ph.Phase.IDLE if host.abi == Abi.RFC_V2 else ph.Phase.PREPARED
        await until(agent, lambda: agent.phase is expected)
        assert host.machine.running
        if host.abi == Abi.RFC_V2:
            # FROZEN before the reboot: only cancel is left, and it ran.
            assert agent.last is not None and agent.last.result == "failed"
        else:
            assert host.kernel_files() == 2  # sessions / files intact, reported, retryable
            await agent.execute()
            await asyncio.to_thread(host.machine.wait_down, 10)


async def test_preserve_checks_fds_and_phase(host: AgentHost) -> None:
    r, w = os.pipe2(os.O_CLOEXEC)
    async with host.agent(FakeGate()) as agent:
        with pytest.raises(InvalidArgument, match="only memfds"):
            agent.preserve(r, "vm-1", 1, [], owner="uid=0")
        with pytest.raises(InvalidArgument, match="reserved"):
            agent.preserve(memfd_with(b"", 0), "systemd", 1, [], owner="uid=0")
        await agent.prepare("upd-7")
        await until(agent, lambda: agent.phase is ph.Phase.PREPARED)
        with pytest.raises(PhaseError):
            agent.preserve(memfd_with(b"", 0), "late", 1, [], owner="uid=0")
        await agent.cancel()
        await until(agent, lambda: agent.phase is ph.Phase.IDLE)
    os.close(r)
    os.close(w)


async def test_restart_in_the_same_boot_reports_the_aborted_update(host: AgentHost) -> None:
    """The agent stops while prepared (as a crash would leave it): the next start finds the
    kernel back to normal (or cancels it) and records the update as aborted."""
    async with host.agent(FakeGate()) as agent:
        agent.preserve(memfd_with(b"d" * 100, 0), "vm-1", 1, [], owner="uid=0")
        await agent.prepare("upd-8")
        await until(agent, lambda: agent.phase is ph.Phase.PREPARED)
        # Simulate the crash: keep current.json, drop the agent without its orderly stop.
        agent.stop = _no_stop  # type: ignore[method-assign]
        kernel = agent.kernel
        assert kernel is not None
        kernel.close()  # what process death does to every fd
    async with host.agent(FakeGate()) as agent:
        await until(agent, lambda: agent.phase is ph.Phase.IDLE)
        assert agent.last is not None
        assert agent.last.id == "upd-8"
        assert agent.last.result in ("aborted", "failed")
        assert host.kernel_files() == 0
        if host.abi != Abi.SESSION:
            assert host.machine.inspect()["state"] == "normal"


async def _no_stop() -> None:
    return None
