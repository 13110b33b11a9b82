"""A thin client of org.luoagent.LiveUpdate1 for the CLI and for participants: connect, call, map
error names back.  It uses only the public D-Bus API (no side doors into the agent)."""

from __future__ import annotations

import os
from typing import Any, Final

from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from .dbus.names import BUS_NAME, IFACE_MANAGER, OBJECT_PATH

BUS_ENV: Final = "LUO_AGENT_BUS"  # "system" (default) or "session"


class CallError(Exception):
    """The agent (or the bus) answered a call with a D-Bus error."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name, self.text = name, message


def bus_kind(explicit: str | None = None) -> str:
    kind = (
        explicit or os.environ.get(BUS_ENV) or os.environ.get("DBUS_STARTER_BUS_TYPE") or "system"
    )
    return "session" if kind == "session" else "system"


async def connect(kind: str | None = None) -> MessageBus:
    bus_type = BusType.SESSION if bus_kind(kind) == "session" else BusType.SYSTEM
    return await MessageBus(bus_type=bus_type, negotiate_unix_fd=True).connect()


async def call(
    bus: MessageBus,
    member: str,
    signature: str = "",
    body: list[Any] | None = None,
    *,
    interface: str = IFACE_MANAGER,
    path: str = OBJECT_PATH,
    unix_fds: list[int] | None = None,
    destination: str = BUS_NAME,
) -> list[Any]:
    """One method call; returns the reply body or raises CallError.  Replies carrying fds come back
    as fds owned by the caller."""
    reply = await bus.call(
        Message(
            destination=destination,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            body=body or [],
            unix_fds=unix_fds or [],
        )
    )
    assert reply is not None
    if reply.message_type == MessageType.ERROR:
        text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
        raise CallError(reply.error_name or "org.freedesktop.DBus.Error.Failed", text)
    if reply.unix_fds:
        body_out = list(reply.body)
        return [
            reply.unix_fds[v] if sig == "h" else v
            for v, sig in zip(body_out, _split(reply.signature), strict=False)
        ]
    return list(reply.body)


def _split(signature: str) -> list[str]:
    """Top-level complete types of a signature ('hs' -> ['h', 's']; containers kept whole)."""
    from dbus_fast import SignatureTree

    return [t.signature for t in SignatureTree(signature).types]


async def get_property(
    bus: MessageBus, name: str, *, interface: str = IFACE_MANAGER, path: str = OBJECT_PATH
) -> Any:
    body = await call(
        bus, "Get", "ss", [interface, name], interface="org.freedesktop.DBus.Properties", path=path
    )
    return body[0].value


async def get_all(
    bus: MessageBus, *, interface: str = IFACE_MANAGER, path: str = OBJECT_PATH
) -> dict[str, Any]:
    body = await call(
        bus, "GetAll", "s", [interface], interface="org.freedesktop.DBus.Properties", path=path
    )
    return {k: v.value for k, v in body[0].items()}


async def add_match(bus: MessageBus, rule: str) -> None:
    """Ask the bus for the signals that match ``rule`` (AddMatch)."""
    await call(
        bus,
        "AddMatch",
        "s",
        [rule],
        interface="org.freedesktop.DBus",
        path="/org/freedesktop/DBus",
        destination="org.freedesktop.DBus",
    )


async def subscribe(bus: MessageBus, narrower: str = "") -> None:
    """Match the agent's signals on its object (``narrower``: more of the rule, e.g.
    ``",member='PhaseChanged'"``) and the owner changes of its name: before a call whose signals
    must not be missed."""
    await add_match(bus, f"type='signal',sender='{BUS_NAME}',path='{OBJECT_PATH}'{narrower}")
    await add_match(
        bus,
        f"type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged',arg0='{BUS_NAME}'",
    )
