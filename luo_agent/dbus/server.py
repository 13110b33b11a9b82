"""Connect to the bus (inside the running loop), export the Manager, take the name."""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from typing import Any, Final

import structlog
from dbus_fast import BusType, Message, MessageFlag, MessageType, RequestNameReply, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.service import ServiceInterface
from dbus_fast.signature import SignatureType

from ..agent import Agent
from ..config import BusKind
from ..errors import LuoError
from .auth import Authorizer, track_senders
from .bus import AgentMessageBus
from .fds import close_fds
from .manager import ManagerInterface
from .names import BUS_NAME, IFACE_MANAGER, OBJECT_PATH, error

log = structlog.get_logger(__name__)

# The Manager methods that take fds, and the argument positions their handlers own (and close).
FD_ARGUMENTS: Final[dict[tuple[str, str], tuple[int, ...]]] = {
    ("LoadKernel", "hhsa{sv}"): (0, 1),
    ("Preserve", "hsta{sv}"): (0,),
}


class NameTaken(LuoError):
    """Another process owns the agent's bus name (or the bus policy refused it)."""


async def serve(agent: Agent, bus_kind: BusKind) -> tuple[MessageBus, ManagerInterface]:
    bus_type = BusType.SYSTEM if bus_kind == "system" else BusType.SESSION
    bus = await AgentMessageBus(bus_type=bus_type, negotiate_unix_fd=True).connect()
    track_senders(bus)
    guard_fds(bus)
    auth = Authorizer(bus, "polkit" if bus_kind == "system" else "same-user")
    manager = ManagerInterface(agent, bus, auth)
    bus.export(OBJECT_PATH, manager)
    answer_property_reads(bus, manager)
    try:
        reply = await bus.request_name(BUS_NAME)
    except Exception as exc:
        bus.disconnect()
        raise NameTaken(f"cannot own {BUS_NAME}: {exc}") from None
    if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
        bus.disconnect()
        raise NameTaken(f"{BUS_NAME} is owned by another process ({reply.name})")
    return bus, manager


def guard_fds(bus: MessageBus) -> None:
    """Every fd that arrives is closed by exactly one owner.  dbus-fast leaves the fds of a message
    in the process when no handler takes them (a wrong signature, a signal, fds the body never
    mentions), and hands an ``h`` index that names no received fd to the handler as ``None`` or
    as the raw number (which would name one of the agent's own fds).  This filter runs before
    dispatch: it refuses a call whose ``h`` values are not indices of received fds, and closes
    every received fd that no method argument will own."""

    def check(msg: Message) -> Message | bool | None:
        fds = msg.unix_fds
        if msg.message_type is not MessageType.METHOD_CALL:
            close_fds(*fds)  # nothing the agent receives besides calls carries fds
            return None
        sig = msg.signature
        if "h" not in sig and "v" not in sig:
            close_fds(*fds)
            return None
        indices = list(_fd_indices(msg.signature_tree.types, msg.body))
        if any(not 0 <= i < len(fds) for i in indices):
            close_fds(*fds)
            log.info("call_refused", member=msg.member, reason="fd index out of range")
            if msg.flags & MessageFlag.NO_REPLY_EXPECTED:
                return True
            return Message.new_error(
                msg,
                error("InvalidArgument"),
                f"the call names fd indices {sorted(set(indices))} but carries {len(fds)} fds",
            )
        owned = _owned_indices(msg)
        close_fds(*[fd for i, fd in enumerate(fds) if i not in owned])
        return None

    bus.add_message_handler(check)


def answer_property_reads(bus: MessageBus, manager: ManagerInterface) -> None:
    """``Properties.Get`` of a Manager property, answered from a message filter: dbus-fast's
    generic handler (interface lookup, a scan of every property, a callback chain) made a status
    read cost twice a bus round trip (bench/RESULTS.md).  Anything else (unknown names, GetAll,
    Set, no-reply calls, a getter that raises) falls through to dbus-fast unchanged."""
    readable = {
        prop.name: prop
        for prop in ServiceInterface._get_properties(manager)
        if not prop.disabled
        and prop.access.readable()
        and not inspect.iscoroutinefunction(prop.prop_getter)
    }

    def answer(msg: Message) -> Message | None:
        if (
            msg.member != "Get"
            or msg.interface != "org.freedesktop.DBus.Properties"
            or msg.path != OBJECT_PATH
            or msg.signature != "ss"
            or msg.message_type is not MessageType.METHOD_CALL
            or msg.flags & MessageFlag.NO_REPLY_EXPECTED
            or msg.body[0] != IFACE_MANAGER
        ):
            return None
        prop = readable.get(msg.body[1])
        if prop is None:
            return None
        try:
            value = prop.prop_getter(manager)
        except Exception:
            return None  # dbus-fast calls it again and reports the error its own way
        return Message.new_method_return(msg, "v", [Variant(prop.signature, value)])

    bus.add_message_handler(answer)


def _owned_indices(msg: Message) -> set[int]:
    positions = FD_ARGUMENTS.get((msg.member or "", msg.signature))
    if positions is None or msg.path != OBJECT_PATH or msg.interface not in (None, IFACE_MANAGER):
        return set()
    return {int(msg.body[p]) for p in positions}


def _fd_indices(types: Sequence[SignatureType], values: Sequence[Any]) -> Iterator[int]:
    for st, value in zip(types, values, strict=False):
        if "h" in st.signature or "v" in st.signature:
            yield from _walk(st, value)


def _walk(st: SignatureType, value: Any) -> Iterator[int]:
    match st.token:
        case "h":
            yield int(value)
        case "v":
            yield from _fd_indices([value.type], [value.value])
        case "a" if st.children[0].token == "{":
            key_type, value_type = st.children[0].children
            for key, item in value.items():
                yield from _fd_indices([key_type, value_type], [key, item])
        case "a":
            for item in value:
                yield from _fd_indices(st.children, [item])
        case "(":
            yield from _fd_indices(st.children, value)
