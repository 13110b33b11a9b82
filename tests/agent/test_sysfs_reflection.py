"""The kernel's sysfs ``state`` reflected into the Agent and onto D-Bus (KernelState), on an
emulated rfc-v2 machine: the daemon's watcher task feeds the agent, which tells its own kernel
changes from someone else's.  On rfc-v2 any process may open the device, so another process can
cancel a prepared update behind the agent's back; the agent must notice and end the update."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
from collections.abc import AsyncIterator, Callable, Iterator, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus
from structlog.testing import capture_logs

from luo_agent import phase as ph
from luo_agent.agent import Agent
from luo_agent.daemon import feed_kernel_state, kernel_state_file
from luo_agent.dbus.names import IFACE_MANAGER, OBJECT_PATH
from luo_agent.dbus.server import serve
from luo_agent.kernel.device import Abi
from luo_agent.kernel.emulator import EmulatedMachine, EmulatedSyscalls
from luo_agent.records import UpdateRecord
from tests.agent_host import AgentHost
from tests.private_bus import PrivateBus

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 10.0

# Another process, with its own open of the rfc-v2 device (opens are not exclusive there).
CANCEL_BEHIND_THE_AGENTS_BACK = """
import sys
from luo_agent.kernel.emulator import EmulatedSyscalls
from luo_agent.kernel.rfc_v2 import RfcV2Device

with RfcV2Device(EmulatedSyscalls(sys.argv[1])) as device:
    device.event_cancel()
"""


class Recorder:
    """An AgentListener that records kernel states and wakes waiters on every notification."""

    def __init__(self) -> None:
        self.kernel_states: list[str] = []
        self.changed = asyncio.Event()

    def phase_changed(self, record: UpdateRecord | None, phase: ph.Phase) -> None:
        self.changed.set()

    def update_finished(self, record: UpdateRecord) -> None:
        self.changed.set()

    def kernel_state_changed(self, value: str) -> None:
        self.kernel_states.append(value)
        self.changed.set()

    async def until(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(LIMIT):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[EmulatedMachine]:
    with EmulatedMachine(tmp_path / "machine", Abi.RFC_V2) as emulated:
        emulated.boot()
        yield emulated


@pytest.fixture
def private_bus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A throwaway session bus; the agent serves on it as it does with --session-bus."""
    if shutil.which("dbus-daemon") is None:
        pytest.skip("dbus-daemon not installed")
    with PrivateBus(tmp_path) as bus:
        monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", bus.address)
        yield bus.address


@contextlib.asynccontextmanager
async def running_agent(tmp_path: Path, machine: EmulatedMachine) -> AsyncIterator[Agent]:
    """The Agent plus the daemon's sysfs watcher task, as daemon.run wires them."""
    syscalls = EmulatedSyscalls(machine.root)
    async with AgentHost(tmp_path, Abi.RFC_V2, machine).agent(syscalls=syscalls) as agent:
        state_file = kernel_state_file(agent, syscalls)
        assert state_file == str(machine.layout.sysfs_state)
        watcher = asyncio.create_task(feed_kernel_state(agent, state_file))
        try:
            yield agent
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


def external_changes(
    logs: Sequence[MutableMapping[str, Any]],
) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == "kernel_state_changed_externally"]


async def prepared_update(agent: Agent, recorder: Recorder, update_id: str) -> None:
    fd = os.memfd_create("participant", os.MFD_CLOEXEC)
    os.write(fd, b"guest memory")
    agent.preserve(fd, "vm-1", 1, [], owner="uid=0")
    os.close(fd)
    await agent.prepare(update_id, caller="test")
    await recorder.until(
        lambda: agent.phase is ph.Phase.PREPARED and agent.observed_kernel_state == "prepared"
    )


async def test_cancel_behind_the_agents_back_ends_the_update(
    tmp_path: Path, machine: EmulatedMachine, private_bus: str
) -> None:
    recorder = Recorder()
    async with running_agent(tmp_path, machine) as agent:
        agent.listeners.append(recorder)
        bus, _ = await serve(agent, "session")
        client = await MessageBus(bus_address=private_bus).connect()
        on_bus: list[str] = []

        def properties_changed(msg: Message) -> None:
            if msg.message_type is MessageType.SIGNAL and msg.member == "PropertiesChanged":
                interface, changed, _ = msg.body
                if interface == IFACE_MANAGER and "KernelState" in changed:
                    on_bus.append(changed["KernelState"].value)
                    recorder.changed.set()

        client.add_message_handler(properties_changed)
        await client.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="AddMatch",
                signature="s",
                body=[f"type='signal',path='{OBJECT_PATH}',member='PropertiesChanged'"],
            )
        )
        try:
            with capture_logs() as logs:
                await prepared_update(agent, recorder, "ext-1")
                assert external_changes(logs) == []
                assert agent.kernel_state_text == "prepared"

                cancel = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-c",
                    CANCEL_BEHIND_THE_AGENTS_BACK,
                    str(machine.root),
                    cwd=ROOT,
                    env={**os.environ, "PYTHONPATH": str(ROOT)},
                )
                assert await cancel.wait() == 0
                await recorder.until(
                    lambda: (
                        agent.phase is ph.Phase.IDLE
                        and agent.last is not None
                        and agent.last.id == "ext-1"
                        and on_bus[-1:] == ["normal"]
                    )
                )
        finally:
            client.disconnect()
            bus.disconnect()

    assert agent.last is not None
    assert agent.last.result == "cancelled"
    assert agent.last.error_name == "Cancelled"
    assert "behind the agent's back" in agent.last.message
    assert "another process cancelled the live update" in agent.last.message
    [external] = external_changes(logs)
    assert external["state"] == "normal"
    assert external["previous"] == "prepared"
    assert external["phase"] == "prepared"
    assert any(e["event"] == "kernel_state_contradicts_phase" for e in logs)
    assert recorder.kernel_states == ["normal", "prepared", "normal"]
    assert "prepared" in on_bus
    # The agent's cancel undid its own part: nothing stays preserved in the kernel.
    state = machine.inspect()
    assert state["state"] == "normal"
    assert state["files"] == []


async def test_the_agents_own_transitions_are_not_external(
    tmp_path: Path, machine: EmulatedMachine
) -> None:
    recorder = Recorder()
    async with running_agent(tmp_path, machine) as agent:
        agent.listeners.append(recorder)
        with capture_logs() as logs:
            await prepared_update(agent, recorder, "own-1")
            await agent.cancel("own-1")
            await recorder.until(
                lambda: agent.phase is ph.Phase.IDLE and agent.observed_kernel_state == "normal"
            )
    assert external_changes(logs) == []
    assert recorder.kernel_states == ["normal", "prepared", "normal"]
    assert agent.last is not None
    assert agent.last.result == "cancelled"
    assert "behind" not in agent.last.message
