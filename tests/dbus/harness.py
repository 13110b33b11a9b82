"""A private bus and a real agent on it, for the D-Bus and CLI tests.

``private_bus``: a ``PrivateBus`` (``tests/private_bus.py``) of our own per test module whose
configuration lets any uid connect (the CLI's NotAuthorized test runs as nobody).
``AgentHost``: the real ``Agent`` on an ``EmulatedMachine`` with a ``FakeGate``, served by
``luo_agent.dbus.server.serve(agent, "session")`` like the daemon does, including what the daemon
does after the kexec (stop the agent, leave the bus); ``reboot()`` boots the machine again and
starts a new agent over the same state directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from luo_agent.agent import Agent
from luo_agent.client import add_match, connect
from luo_agent.config import Config, KernelConfig, Timeouts
from luo_agent.daemon import make_syscalls
from luo_agent.dbus.manager import ManagerInterface
from luo_agent.dbus.names import BUS_NAME, IFACE_MANAGER, OBJECT_PATH
from luo_agent.dbus.server import serve
from luo_agent.kernel.device import Abi
from luo_agent.kernel.emulator import EmulatedMachine
from tests.fakes.agent_host import build_agent
from tests.fakes.gate import FakeGate
from tests.private_bus import PrivateBus


class AgentHost:
    """One emulated machine; one agent (and its bus connection) per boot."""

    def __init__(self, workdir: Path, abi: str, timeouts: dict[str, float] | None = None) -> None:
        self.workdir = workdir
        self.abi = abi
        self.timeouts = Timeouts(**(timeouts or {}))
        self.machine = EmulatedMachine(workdir / "machine", abi)
        self.boots = 0
        self.gate = FakeGate()
        self.agent: Agent | None = None
        self.bus: MessageBus | None = None
        self.manager: ManagerInterface | None = None
        self._runner: asyncio.Task[None] | None = None
        self._stopper: asyncio.Task[None] | None = None
        self.down = asyncio.Event()  # set once the agent stopped after a kexec

    def config(self) -> Config:
        return Config(
            bus="session",
            state_directory=self.workdir / "state",
            # /run is empty after a reboot.
            runtime_directory=self.workdir / f"run-{self.boots}",
            auto_finish=False,
            timeouts=self.timeouts,
            kernel=KernelConfig(abi=self.abi, emulate_root=self.machine.root),  # type: ignore[arg-type]
        )

    async def boot(self, gate: FakeGate | None = None) -> None:
        """Boot the machine and start an agent on it, as the daemon does."""
        await asyncio.to_thread(self.machine.boot)
        self.boots += 1
        await self.start_agent(gate)

    async def start_agent(self, gate: FakeGate | None = None) -> None:
        """An agent on the running machine (after ``stop_agent``: a restart in the same boot)."""
        self.gate = gate or FakeGate()
        self.down = asyncio.Event()
        config = self.config()
        agent = build_agent(config, make_syscalls(config), self.gate, on_rebooted=self._on_rebooted)
        self._runner = asyncio.create_task(agent.run(), name="agent")
        await agent.start()
        self.agent = agent
        self.bus, self.manager = await serve(agent, "session")

    def _on_rebooted(self) -> None:
        # The daemon stops and leaves the bus once the kexec was issued.
        self._stopper = asyncio.create_task(self._after_kexec())

    async def _after_kexec(self) -> None:
        await self.stop_agent()
        self.down.set()

    async def stop_agent(self) -> None:
        if self.agent is not None:
            await self.agent.stop()
            self.agent = None
        if self.bus is not None:
            self.bus.disconnect()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.bus.wait_for_disconnect(), 5)
            self.bus = None
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None

    async def reboot(self, gate: FakeGate | None = None) -> None:
        """After Execute: wait for the kexec to take the machine down, then boot again."""
        await asyncio.wait_for(self.down.wait(), 30)
        await asyncio.to_thread(self.machine.wait_down)
        await self.boot(gate)

    async def close(self) -> None:
        if self._stopper is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._stopper, 30)
        await self.stop_agent()
        await asyncio.to_thread(self.machine.poweroff)


class SignalLog:
    """Every signal a client connection receives for its match rules, and a way to wait for one."""

    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus
        self.messages: list[Message] = []
        self._changed = asyncio.Event()
        bus.add_message_handler(self._on_message)

    async def match(self, rule: str) -> None:
        await add_match(self.bus, rule)

    async def match_manager(self) -> None:
        await self.match(f"type='signal',sender='{BUS_NAME}',path='{OBJECT_PATH}'")

    async def match_path(self, path: str) -> None:
        await self.match(f"type='signal',sender='{BUS_NAME}',path='{path}'")

    def _on_message(self, msg: Message) -> None:
        if msg.message_type is MessageType.SIGNAL and msg.sender != "org.freedesktop.DBus":
            self.messages.append(msg)
            self._changed.set()

    def of(self, member: str, path: str = OBJECT_PATH) -> list[Message]:
        return [m for m in self.messages if m.member == member and m.path == path]

    def phases(self, update_id: str) -> list[str]:
        return [
            str(m.body[1])
            for m in self.of("PhaseChanged")
            if m.interface == IFACE_MANAGER and m.body[0] == update_id
        ]

    def ended(self, update_id: str) -> bool:
        """Finished, and the PhaseChanged to idle that follows it, have arrived."""
        finished = any(m.body[0] == update_id for m in self.of("Finished"))
        return finished and "idle" in self.phases(update_id)

    def changed_props(self, path: str, name: str) -> list[Any]:
        return [
            m.body[1][name].value for m in self.of("PropertiesChanged", path) if name in m.body[1]
        ]

    async def wait_for(self, done: Callable[[], bool], seconds: float = 15.0) -> None:
        async with asyncio.timeout(seconds):
            while not done():
                self._changed.clear()
                await self._changed.wait()


async def client_bus() -> MessageBus:
    """A client connection like the CLI's (DBUS_SESSION_BUS_ADDRESS names the private bus)."""
    return await connect("session")


async def disconnect(bus: MessageBus) -> None:
    bus.disconnect()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(bus.wait_for_disconnect(), 5)


# ------------------------------------------------------------------------------------ fixtures
# Re-exported by tests/dbus/conftest.py and tests/cli/conftest.py.


@pytest.fixture(scope="module")
def private_bus() -> Iterator[PrivateBus]:
    if shutil.which("dbus-daemon") is None:
        pytest.skip("dbus-daemon is not installed")
    # World-traversable, so a CLI running as another uid reaches the socket.
    directory = Path(tempfile.mkdtemp(prefix="luo-bus-"))
    directory.chmod(0o755)
    try:
        with PrivateBus(directory, any_uid=True) as bus:
            yield bus
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def bus_address(private_bus: PrivateBus, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", private_bus.address)
    monkeypatch.delenv("DBUS_STARTER_BUS_TYPE", raising=False)
    monkeypatch.setenv("LUO_AGENT_BUS", "session")
    return private_bus.address


@pytest.fixture
async def host(
    bus_address: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[AgentHost]:
    """The real agent on the private bus; the session ABI unless parametrised indirectly."""
    abi = getattr(request, "param", Abi.SESSION)
    agent_host = AgentHost(tmp_path, abi)
    try:
        await agent_host.boot()
        yield agent_host
    finally:
        await agent_host.close()


@pytest.fixture
async def client(host: AgentHost) -> AsyncIterator[MessageBus]:
    bus = await client_bus()
    try:
        yield bus
    finally:
        await disconnect(bus)


def plain(value: Any) -> Any:
    """D-Bus values as plain lists (dbus-fast returns structs as tuples or lists)."""
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value
