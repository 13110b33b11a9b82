"""Who is calling: the agent asks the bus for a connection's credentials once, and never confuses
two connections.  A real dbus-daemon, watched by a real monitor (``BecomeMonitor``)."""

from __future__ import annotations

import asyncio
import os
from collections import Counter

import pytest
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from luo_agent.client import CallError, call, get_all
from luo_agent.dbus import auth as auth_module
from luo_agent.dbus.names import IFACE_UPDATE, error, update_path
from tests.dbus.harness import AgentHost, client_bus, disconnect


class CredentialsQueries:
    """Counts, per named connection, the GetConnectionCredentials calls that cross the bus."""

    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus
        self.asked: Counter[str] = Counter()
        self.arrived = asyncio.Event()

    @classmethod
    async def watch(cls, address: str) -> CredentialsQueries:
        bus = await MessageBus(bus_address=address).connect()
        watch = cls(bus)
        reply = await bus.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus.Monitoring",
                member="BecomeMonitor",
                signature="asu",
                body=[["type='method_call',member='GetConnectionCredentials'"], 0],
            )
        )
        assert reply is not None and reply.message_type is MessageType.METHOD_RETURN, reply
        bus.add_message_handler(watch._seen)
        return watch

    def _seen(self, msg: Message) -> bool:
        if msg.member == "GetConnectionCredentials" and msg.body:
            self.asked[msg.body[0]] += 1
            self.arrived.set()
        return True  # a monitor never answers (the bus would disconnect it)

    async def seen(self, name: str) -> None:
        """Until a query about ``name`` has arrived (and so, the bus delivering in order, every
        query sent before it)."""
        async with asyncio.timeout(10):
            while not self.asked[name]:
                self.arrived.clear()
                await self.arrived.wait()


async def test_a_connections_credentials_are_asked_once_and_never_lent(
    host: AgentHost, bus_address: str
) -> None:
    queries = await CredentialsQueries.watch(bus_address)
    first, second, last = await client_bus(), await client_bus(), await client_bus()
    update_id = "asked-once"
    fd = os.memfd_create("luo-test", os.MFD_CLOEXEC)
    try:
        for token in (1, 2):
            await call(first, "Preserve", "hsta{sv}", [0, "vm-1", token, {}], unix_fds=[fd])
        await call(first, "Unpreserve", "st", ["vm-1", 2])
        (started_id, _) = await call(second, "Prepare", "a{sv}", [{"id": Variant("s", update_id)}])
        assert started_id == update_id
        update = await get_all(second, interface=IFACE_UPDATE, path=update_path(update_id))
        # The update names the connection that asked for it, not the one seen before it.
        assert update["StartedBy"] == f"uid=0 pid={os.getpid()} ({second.unique_name})"
        await call(second, "Cancel", "s", [update_id])
        with pytest.raises(CallError):  # authorised first, refused after: no matter which way
            await call(last, "Unpreserve", "st", ["vm-2", 1])
        await queries.seen(last.unique_name)
        assert queries.asked[first.unique_name] == 1, queries.asked
        assert queries.asked[second.unique_name] == 1, queries.asked
    finally:
        os.close(fd)
        for bus in (first, second, last, queries.bus):
            await disconnect(bus)


async def test_the_least_recently_seen_caller_is_forgotten_first(
    host: AgentHost, bus_address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auth_module, "KNOWN_CALLERS_MAX", 2)
    queries = await CredentialsQueries.watch(bus_address)
    buses = [await client_bus() for _ in range(4)]
    oldest, middle, newest, last = buses
    try:
        for bus in (oldest, middle, newest, oldest, newest, last):
            with pytest.raises(CallError) as refused:  # authorised, then nothing to take back
                await call(bus, "Unpreserve", "st", ["vm-1", 1])
            assert refused.value.name == error("InvalidArgument")
        await queries.seen(last.unique_name)
        # Three callers for two places: the oldest was forgotten, asked again, kept; newest stayed.
        asked = [queries.asked[bus.unique_name] for bus in (oldest, middle, newest)]
        assert asked == [2, 1, 1], queries.asked
    finally:
        for bus in (*buses, queries.bus):
            await disconnect(bus)
