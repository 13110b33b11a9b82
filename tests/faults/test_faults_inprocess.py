"""Faults where systemd is irrelevant, on every kernel backend, with the real Agent in this process
on the emulated kernel and the recording FakeGate: EBUSY on open (issue 6 item 4), the kexec
reboot failing (item 5), a corrupted state file (item 6) and a shutdown job queued by someone
else while prepared (item 7, FakeGate side; the PID 1 signal side is in test_faults_systemd)."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from luo_agent import phase as ph
from luo_agent.errors import DeviceBusy
from luo_agent.kernel.device import Abi
from luo_agent.kernel.emulator import EmulatedMachine
from luo_agent.kernel.syscalls import KEXEC_FILE_UNLOAD
from luo_agent.persist import History
from tests.agent_host import AgentHost, memfd_with, until
from tests.fakes.gate import FakeGate

CANCEL = ph.SPECS[ph.Phase.CANCELLING].target


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


# ------------------------------------------------------------------------- 4: EBUSY on open


async def test_ebusy_on_open_is_retried_with_back_off_and_a_clear_status(host: AgentHost) -> None:
    host.machine.inject_fault("open", errno.EBUSY, 3)
    async with host.agent(FakeGate()) as agent:
        assert agent.phase is ph.Phase.IDLE
        assert agent.abi == host.abi
        waiting = [s for s in host.statuses if s.startswith("waiting for /dev/liveupdate")]
        assert [s.split(")")[0] for s in waiting] == [
            f"waiting for /dev/liveupdate (attempt {n}" for n in (1, 2, 3)
        ], host.statuses
        assert "another process holds the exclusive device" in waiting[0]
        assert "/dev/liveupdate opened after 4 attempts" in host.statuses


async def test_ebusy_on_open_gives_up_at_the_bound(host: AgentHost) -> None:
    host.machine.inject_fault("open", errno.EBUSY, 10_000)
    agent = host.build(FakeGate(), host.config(busy_retry_seconds=0.4))
    with pytest.raises(DeviceBusy):
        await agent.start()
    await agent.stop()
    assert host.statuses[-1].startswith("gave up waiting for /dev/liveupdate after"), host.statuses
    assert 3 <= len(host.statuses) <= 8, host.statuses  # back-off, not a busy loop
    host.machine.inject_fault("open", errno.EBUSY, 0)


async def test_ebusy_while_preparing_is_retried(host: AgentHost) -> None:
    """The session ABI opens the device again to create the outgoing sessions at prepare; the
    state-machine ABIs hold it (so a co-owner cannot appear) and never see EBUSY there."""
    async with host.agent(FakeGate()) as agent:
        host.machine.inject_fault("open", errno.EBUSY, 2)
        await agent.prepare("busy-prepare", caller="test")
        await until(agent, lambda: agent.phase is ph.Phase.PREPARED)
        assert host.kernel_state() == "prepared"
        await agent.cancel()
        await until(agent, lambda: agent.phase is ph.Phase.IDLE)
        host.machine.inject_fault("open", errno.EBUSY, 0)


# ------------------------------------------------------------------- 5: the kexec reboot fails


@pytest.mark.parametrize("how", ["EAGAIN", "no-image"])
async def test_failed_kexec_returns_to_a_consistent_state(host: AgentHost, how: str) -> None:
    data = os.urandom(64 << 10)
    fd = memfd_with(data)
    gate = FakeGate()
    async with host.agent(gate) as agent:
        agent.preserve(fd, "vm", 1, [], owner="uid=0")
        os.close(fd)
        kfd = host.kernel_image()
        await agent.load_kernel(kfd, -1, "console=ttyS0")
        os.close(kfd)
        await agent.prepare(f"kexec-{how}", caller="test")
        await until(agent, lambda: agent.phase is ph.Phase.PREPARED)
        assert host.kernel_files() == 2
        if how == "EAGAIN":
            host.machine.inject_fault("reboot", errno.EAGAIN)
        else:  # the image vanished behind the agent's back (kexec -u)
            host.machine.syscalls.kexec_file_load(-1, -1, "", KEXEC_FILE_UNLOAD)
        await agent.execute(f"kexec-{how}")
        if host.abi == Abi.RFC_V2:
            # FROZEN cannot go back to PREPARED: the only way out is cancel.
            await until(agent, lambda: agent.phase is ph.Phase.IDLE)
            (entry,) = history(host)
            assert entry["result"] == "failed", entry
            assert entry["error_name"] == "KernelError", entry
            assert host.kernel_state() == "normal" and host.kernel_files() == 0
            assert CANCEL in gate.started
        else:
            # Back to prepared with every preserved file still held, the failure reported.
            await until(agent, lambda: agent.phase is ph.Phase.PREPARED)
            assert agent.record is not None and agent.record.result == "failed"
            assert "reboot" in agent.record.message.lower(), agent.record
            assert host.kernel_state() == "prepared" and host.kernel_files() == 2
            assert [s[3] for s in agent.sessions()] == ["preserved"]
            assert history(host) == []  # never reported as ended, let alone as a success
            await agent.cancel()
            await until(agent, lambda: agent.phase is ph.Phase.IDLE)
            assert host.kernel_state() == "normal" and host.kernel_files() == 0
        assert host.machine.running
        assert agent.last is not None and agent.last.result != "success"


# ------------------------------------------------------------- 6: a corrupted state file


async def test_corrupt_current_json_at_start_up_is_moved_aside(host: AgentHost) -> None:
    run = host.workdir / "run"
    run.mkdir(parents=True)
    (run / "current.json").write_bytes(b'{"id": "half-writ')
    async with host.agent(FakeGate()) as agent:
        assert agent.phase is ph.Phase.IDLE and agent.record is None
        assert (run / "current.corrupt").read_bytes() == b'{"id": "half-writ'
        assert not (run / "current.json").exists()
        # And the agent works: a new update can be prepared and cancelled.
        await agent.prepare("after-corruption", caller="test")
        await until(agent, lambda: agent.phase is ph.Phase.PREPARED)
        await agent.cancel()
        await until(agent, lambda: agent.phase is ph.Phase.IDLE)
    assert [e["result"] for e in history(host)] == ["cancelled"]


async def test_corrupt_history_at_start_up_is_moved_aside(host: AgentHost) -> None:
    state = host.workdir / "state"
    state.mkdir(parents=True)
    (state / "history.json").write_bytes(b"[{]")
    async with host.agent(FakeGate()) as agent:
        assert agent.phase is ph.Phase.IDLE and agent.last is None
        await agent.prepare("after-bad-history", caller="test")
        await until(agent, lambda: agent.phase is ph.Phase.PREPARED)
        await agent.cancel()
        await until(agent, lambda: agent.phase is ph.Phase.IDLE)
    assert (state / "history.corrupt").read_bytes() == b"[{]"
    assert [e["id"] for e in json.loads((state / "history.json").read_text())] == [
        "after-bad-history"
    ]


# ------------------------------------------------ 7: someone else's reboot while prepared


async def test_shutdown_job_while_prepared_cancels_the_update(host: AgentHost) -> None:
    gate = FakeGate()
    async with host.agent(gate) as agent:
        await gate.watching.wait()
        gate.queue_shutdown_job("poweroff.target")  # idle: nothing to do
        await agent.prepare("shutdown-race", caller="test")
        await until(agent, lambda: agent.phase is ph.Phase.PREPARED)
        assert host.kernel_files() == 1  # the agent's metadata
        gate.queue_shutdown_job("reboot.target")
        await until(agent, lambda: agent.phase is ph.Phase.IDLE)
        assert CANCEL in gate.started  # the cancel hooks ran
        assert host.kernel_state() == "normal" and host.kernel_files() == 0
    (entry,) = history(host)
    assert entry["result"] == "cancelled", entry
    assert "reboot.target was queued by someone else" in str(entry["message"]), entry
