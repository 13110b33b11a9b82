"""Who is calling, and may they?  dbus-fast does not hand the sender to method handlers, so one
message filter records it in a context variable before dispatch (the handler's task inherits the
context); everything else about identity and authorisation lives here.

Policy: root is allowed; on the system bus everyone else is asked about through polkit's
``CheckAuthorization`` with the action and details; when polkit is missing or fails, non-root
callers are refused (fail closed).  On a session bus (tests, the demo) the bus itself is
private, so callers with the agent's own uid are allowed.
"""

from __future__ import annotations

import contextvars
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Final, Literal

import structlog
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from ..errors import NotAuthorized
from .names import POLKIT_VERBS, polkit_action

log = structlog.get_logger(__name__)

_sender: contextvars.ContextVar[str] = contextvars.ContextVar("luo_agent_dbus_sender", default="")

AuthMode = Literal["polkit", "same-user"]

# Callers whose credentials are kept (least recently seen dropped first).  A connection's
# credentials never change and the bus never gives its unique name to another connection, so a
# kept answer is exact for as long as the agent's own connection lives; only the round trip goes.
KNOWN_CALLERS_MAX: Final = 256


def track_senders(bus: MessageBus) -> None:
    def remember(msg: Message) -> None:
        if msg.message_type == MessageType.METHOD_CALL and msg.sender:
            _sender.set(msg.sender)
        return None  # never consume the message

    bus.add_message_handler(remember)


def current_sender() -> str:
    return _sender.get()


@dataclass(frozen=True, slots=True)
class Caller:
    bus_name: str
    uid: int
    pid: int

    def __str__(self) -> str:
        return f"uid={self.uid} pid={self.pid} ({self.bus_name})"


class Authorizer:
    def __init__(self, bus: MessageBus, mode: AuthMode) -> None:
        self.bus = bus
        self.mode = mode
        self._known: OrderedDict[str, Caller] = OrderedDict()

    async def identify(self) -> Caller:
        sender = current_sender()
        if not sender:
            raise NotAuthorized("unknown caller")
        known = self._known.get(sender)
        if known is not None:
            self._known.move_to_end(sender)
            return known
        caller = await self._credentials(sender)
        if sender.startswith(":") and caller.uid >= 0:  # unique names only: never reassigned
            self._known[sender] = caller
            if len(self._known) > KNOWN_CALLERS_MAX:
                self._known.popitem(last=False)
        return caller

    async def _credentials(self, sender: str) -> Caller:
        reply = await self.bus.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="GetConnectionCredentials",
                signature="s",
                body=[sender],
            )
        )
        if reply is None or reply.message_type == MessageType.ERROR:
            raise NotAuthorized("caller credentials unavailable")
        creds: dict[str, Variant] = reply.body[0]
        uid = int(creds["UnixUserID"].value) if "UnixUserID" in creds else -1
        pid = int(creds["ProcessID"].value) if "ProcessID" in creds else -1
        return Caller(sender, uid, pid)

    async def authorize(self, method: str, details: dict[str, str] | None = None) -> Caller:
        """The caller of ``method``, if it may call it (``POLKIT_VERBS`` says what to ask)."""
        caller = await self.identify()
        action = polkit_action(POLKIT_VERBS[method])
        if caller.uid == 0:
            return caller
        if self.mode == "same-user":
            if caller.uid == os.getuid():
                return caller
            raise NotAuthorized(action)
        if await self._polkit(caller, action, details or {}):
            return caller
        raise NotAuthorized(action)

    async def _polkit(self, caller: Caller, action: str, details: dict[str, str]) -> bool:
        subject: list[Any] = ["system-bus-name", {"name": Variant("s", caller.bus_name)}]
        try:
            reply = await self.bus.call(
                Message(
                    destination="org.freedesktop.PolicyKit1",
                    path="/org/freedesktop/PolicyKit1/Authority",
                    interface="org.freedesktop.PolicyKit1.Authority",
                    member="CheckAuthorization",
                    signature="(sa{sv})sa{ss}us",
                    body=[subject, action, details, 0, ""],
                )
            )
        except Exception as exc:  # no polkit, broken bus: fail closed
            log.warning("polkit_unavailable", action=action, error=str(exc))
            return False
        if reply is None or reply.message_type == MessageType.ERROR:
            log.warning(
                "polkit_refused_check",
                action=action,
                error=reply.error_name if reply else "no reply",
            )
            return False
        authorized, challenge, _ = reply.body[0]
        log.info(
            "polkit_checked",
            action=action,
            caller=str(caller),
            authorized=authorized,
            challenge=challenge,
        )
        return bool(authorized)
