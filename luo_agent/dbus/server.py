"""Connect to the bus (inside the running loop), export the Manager, take the name."""

from __future__ import annotations

from dbus_fast import BusType, RequestNameReply
from dbus_fast.aio import MessageBus

from ..agent import Agent
from ..config import BusKind
from ..errors import LuoError
from .auth import Authorizer, track_senders
from .manager import ManagerInterface
from .names import BUS_NAME, OBJECT_PATH


class NameTaken(LuoError):
    """Another process owns the agent's bus name (or the bus policy refused it)."""


async def serve(agent: Agent, bus_kind: BusKind) -> tuple[MessageBus, ManagerInterface]:
    bus_type = BusType.SYSTEM if bus_kind == "system" else BusType.SESSION
    bus = await MessageBus(bus_type=bus_type, negotiate_unix_fd=True).connect()
    track_senders(bus)
    auth = Authorizer(bus, "polkit" if bus_kind == "system" else "same-user")
    manager = ManagerInterface(agent, bus, auth)
    bus.export(OBJECT_PATH, manager)
    try:
        reply = await bus.request_name(BUS_NAME)
    except Exception as exc:
        bus.disconnect()
        raise NameTaken(f"cannot own {BUS_NAME}: {exc}") from None
    if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
        bus.disconnect()
        raise NameTaken(f"{BUS_NAME} is owned by another process ({reply.name})")
    return bus, manager
