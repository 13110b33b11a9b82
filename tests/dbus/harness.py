"""A private bus and a real agent on it, for the D-Bus and CLI tests.

``private_bus``: a ``PrivateBus`` (``tests/private_bus.py``) of our own per test module whose
configuration lets any uid connect (the CLI's NotAuthorized test runs as nobody).
``host``: ``dbus_host``, the ``AgentHost`` of ``tests/agent_host.py`` serving on that bus as the
daemon does; ``reboot()`` boots the machine again and starts a new agent over the same state.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from luo_agent.client import add_match, connect
from luo_agent.dbus.names import BUS_NAME, IFACE_MANAGER, OBJECT_PATH
from luo_agent.kernel.device import Abi
from tests.agent_host import AgentHost, disconnect
from tests.private_bus import PrivateBus


def dbus_host(workdir: Path, abi: Abi, **settings: Any) -> AgentHost:
    """The agent as the daemon hosts it on the private bus; updates are finished by the test."""
    return AgentHost(workdir, abi, bus="session", auto_finish=False, **settings)


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
    agent_host = dbus_host(tmp_path, abi)
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
