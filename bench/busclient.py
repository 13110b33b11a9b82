"""A small dbus-fast client for the benchmarks: calls, signal waits and a systemd job runner."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from luo_agent.client import call
from luo_agent.dbus.names import BUS_NAME, IFACE_MANAGER

DBUS: dict[str, Any] = {
    "destination": "org.freedesktop.DBus",
    "path": "/org/freedesktop/DBus",
    "interface": "org.freedesktop.DBus",
}
SYSTEMD: dict[str, Any] = {
    "destination": "org.freedesktop.systemd1",
    "path": "/org/freedesktop/systemd1",
    "interface": "org.freedesktop.systemd1.Manager",
}


class Client:
    """One connection; ``wait_signal`` resolves on the first matching signal after it is armed."""

    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus
        self._waiters: list[tuple[Callable[[Message], bool], asyncio.Future[Message]]] = []
        self._jobs: dict[str, asyncio.Future[str]] = {}
        bus.add_message_handler(self._on_message)

    @classmethod
    async def connect(cls, address: str) -> Client:
        bus = await MessageBus(bus_address=address, negotiate_unix_fd=True).connect()
        client = cls(bus)
        for rule in (
            f"type='signal',sender='{BUS_NAME}',interface='{IFACE_MANAGER}'",
            "type='signal',sender='org.freedesktop.systemd1',member='JobRemoved'",
        ):
            await call(bus, "AddMatch", "s", [rule], **DBUS)
        return client

    def _on_message(self, msg: Message) -> None:
        if msg.message_type is not MessageType.SIGNAL:
            return
        if msg.member == "JobRemoved":
            job = self._jobs.setdefault(
                str(msg.body[1]), asyncio.get_running_loop().create_future()
            )
            if not job.done():
                job.set_result(str(msg.body[3]))
            return
        for entry in list(self._waiters):
            match, fut = entry
            if not fut.done() and match(msg):
                fut.set_result(msg)
                self._waiters.remove(entry)

    def arm(self, match: Callable[[Message], bool]) -> asyncio.Future[Message]:
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._waiters.append((match, fut))
        return fut

    def arm_phase(self, phase: str) -> asyncio.Future[Message]:
        return self.arm(
            lambda m: (
                m.interface == IFACE_MANAGER and m.member == "PhaseChanged" and m.body[1] == phase
            )
        )

    async def agent(
        self, member: str, signature: str = "", body: list[Any] | None = None, **kw: Any
    ) -> list[Any]:
        return await call(self.bus, member, signature, body, **kw)

    async def get_id(self) -> None:
        await call(self.bus, "GetId", **DBUS)

    async def run_job(self, method: str, unit: str, mode: str) -> str:
        """Start/stop ``unit`` and wait for its job (JobRemoved): what a plain client does.
        JobRemoved may be read before the call's continuation runs, so every one is kept."""
        (path,) = await call(self.bus, method, "ss", [unit, mode], **SYSTEMD)
        fut = self._jobs.setdefault(str(path), asyncio.get_running_loop().create_future())
        result = await asyncio.wait_for(fut, 60)
        del self._jobs[str(path)]
        return result

    async def settled(self, unit: str, limit: float = 5.0) -> None:
        """Until systemd has no job left and ``unit`` is inactive again (the tail of the previous
        round), polling without sleeping: an idle pause would let this VM's vCPUs go cold and
        slow the next timed part down several-fold."""
        (path,) = await call(self.bus, "GetUnit", "s", [unit], **SYSTEMD)
        active_state = {
            **SYSTEMD,
            "path": path,
            "interface": "org.freedesktop.DBus.Properties",
        }
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            (jobs,) = await call(self.bus, "ListJobs", **SYSTEMD)
            (state,) = await call(
                self.bus, "Get", "ss", ["org.freedesktop.systemd1.Unit", "ActiveState"],
                **active_state,
            )  # fmt: skip
            if not jobs and state.value == "inactive":
                return
        raise TimeoutError(f"systemd still busy with {unit} after {limit} s")

    async def subscribe_systemd(self) -> None:
        await call(self.bus, "Subscribe", **SYSTEMD)

    def close(self) -> None:
        self.bus.disconnect()
