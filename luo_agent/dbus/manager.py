"""org.luoagent.LiveUpdate1.Manager and .Update: thin adapters over the Agent.

Each method converts D-Bus values, authorises the caller, delegates to the Agent and translates
errors once (``dbus_errors``).  Long work never happens inside a call: Prepare returns the update's
object path at once; progress arrives as PhaseChanged/Finished signals and PropertiesChanged.
No ``from __future__ import annotations`` here: dbus-fast reads the annotations at run time.
"""

import contextlib
import os
from collections import OrderedDict
from typing import Annotated, Any, Final

import structlog
from dbus_fast import Variant
from dbus_fast import introspection as intr
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import (
    DBusBool,
    DBusDict,
    DBusObjectPath,
    DBusSignature,
    DBusStr,
    DBusUInt32,
    DBusUInt64,
    DBusUnixFd,
)
from dbus_fast.constants import PropertyAccess
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property, dbus_signal

from .. import __version__
from ..agent import UPDATE_ID_RE, Agent
from ..errors import InvalidArgument, NotAuthorized
from ..phase import Phase
from ..records import UpdateRecord
from .auth import Authorizer
from .errors import dbus_errors
from .names import IFACE_MANAGER, IFACE_UPDATE, update_path

log = structlog.get_logger(__name__)

KEEP_UPDATE_OBJECTS = 16
MAX_NAME = 63
MAX_OPTIONS = 16
# How much of a caller's string an error message repeats (the reply and the log line).
MAX_SHOWN = 64

Participants = Annotated[list[list[str]], DBusSignature("a(ssss)")]
Timings = Annotated[list[list[Any]], DBusSignature("a(sdd)")]
Sessions = Annotated[list[list[Any]], DBusSignature("a(stss)")]
HistoryList = Annotated[list[dict[str, Variant]], DBusSignature("aa{sv}")]
LastResult = Annotated[list[str], DBusSignature("(ssss)")]
Started = Annotated[tuple[str, str], DBusSignature("so")]


# dbus-fast names only in-arguments (after the Python parameters); these name the rest, so
# introspection and busctl show a self-describing API.
OUT_ARG_NAMES: Final[dict[str, tuple[str, ...]]] = {
    "Check": ("report",),
    "Prepare": ("update_id", "path"),
    "LoadKernel": ("final_cmdline",),
    "Retrieve": ("fd",),
    "ListSessions": ("sessions",),
    "GetHistory": ("updates",),
    "PhaseChanged": ("update_id", "phase"),
    "Finished": ("update_id", "result", "error_name", "message"),
}


def _name_out_args(interface: intr.Interface) -> intr.Interface:
    members: list[tuple[str, list[intr.Arg]]] = [
        *((m.name, m.out_args) for m in interface.methods),
        *((s.name, s.args) for s in interface.signals),
    ]
    for member, args in members:
        for arg, name in zip(args, OUT_ARG_NAMES.get(member, ()), strict=False):
            arg.name = name
    return interface


def _shown(text: str) -> str:
    """A caller's string as an error message repeats it: quoted, cut to MAX_SHOWN characters."""
    if len(text) <= MAX_SHOWN:
        return repr(text)
    return f"{text[:MAX_SHOWN]!r}... ({len(text)} characters)"


def _options(options: dict[str, Variant], allowed: dict[str, str]) -> dict[str, Any]:
    """Unknown keys and wrong types are refused (RAUC's rule): a typo must not be ignored.
    Parsed after authorisation: an unauthorised caller learns nothing from its options."""
    if len(options) > MAX_OPTIONS:
        raise InvalidArgument(f"too many options ({len(options)} > {MAX_OPTIONS})")
    out: dict[str, Any] = {}
    for key, value in options.items():
        signature = allowed.get(key)
        if signature is None:
            known = ", ".join(sorted(allowed)) or "none"
            raise InvalidArgument(f"unknown option {_shown(key)} (known: {known})")
        if value.signature != signature:
            raise InvalidArgument(f"option {key!r} must have type {signature}")
        out[key] = value.value
    return out


def _session_name(name: str) -> str:
    raw = name.encode()
    if not raw or len(raw) > MAX_NAME or "\0" in name:
        raise InvalidArgument(f"a session name is 1-{MAX_NAME} bytes without NUL")
    return name


def _requested_id(options: dict[str, Variant]) -> str:
    """The ``id`` option, checked, for authorisation (the whole dictionary is parsed after)."""
    value = options.get("id")
    if value is None or value.signature != "s":
        return ""
    return _update_id(value.value)


def _update_id(update_id: str) -> str:
    """Checked before anything else sees it (a 1 MB id must not reach polkit or the log)."""
    if update_id and not UPDATE_ID_RE.match(update_id):
        raise InvalidArgument("an update id is 1-64 characters of [A-Za-z0-9_-] ('' = current)")
    return update_id


def _timings(record: UpdateRecord) -> list[list[Any]]:
    return [
        [t.phase, t.started, -1.0 if t.duration is None else t.duration] for t in record.timings
    ]


class UpdateInterface(ServiceInterface):
    """One object per update, at a path derived from its id (so callers subscribe before they
    start it)."""

    def __init__(self, manager: "ManagerInterface", record: UpdateRecord) -> None:
        super().__init__(IFACE_UPDATE)
        self._manager = manager
        self.record = record

    @dbus_property(name="Id", access=PropertyAccess.READ)
    def id(self) -> DBusStr:
        return self.record.id

    @dbus_property(name="Phase", access=PropertyAccess.READ)
    def phase(self) -> DBusStr:
        return self.record.phase

    @dbus_property(name="Progress", access=PropertyAccess.READ)
    def progress(self) -> DBusUInt32:
        if self.record.result:
            return 100
        from ..agent import PROGRESS

        return PROGRESS.get(Phase(self.record.phase), 0)

    @dbus_property(name="StartedBy", access=PropertyAccess.READ)
    def started_by(self) -> DBusStr:
        return self.record.started_by

    @dbus_property(name="Result", access=PropertyAccess.READ)
    def result(self) -> DBusStr:
        return self.record.result

    @dbus_property(name="ErrorName", access=PropertyAccess.READ)
    def error_name(self) -> DBusStr:
        return self.record.error_name

    @dbus_property(name="ErrorMessage", access=PropertyAccess.READ)
    def error_message(self) -> DBusStr:
        return self.record.message

    @dbus_property(name="Timings", access=PropertyAccess.READ)
    def timings(self) -> Timings:
        return _timings(self.record)

    @dbus_method(name="Cancel")
    async def cancel(self) -> None:
        with dbus_errors("Update.Cancel"):
            await self._manager.auth.authorize("cancel", {"update_id": self.record.id})
            await self._manager.agent.cancel(self.record.id)

    def announce(self) -> None:
        self.emit_properties_changed(
            {
                "Id": self.record.id,
                "Phase": self.record.phase,
                "Progress": self.progress,
                "StartedBy": self.record.started_by,
                "Result": self.record.result,
                "ErrorName": self.record.error_name,
                "ErrorMessage": self.record.message,
                "Timings": _timings(self.record),
            }
        )

    def update(self, record: UpdateRecord) -> None:
        old, self.record = self.record, record
        changed: dict[str, Any] = {
            name: value
            for name, value, before in (
                ("Phase", record.phase, old.phase),
                ("Result", record.result, old.result),
                ("ErrorName", record.error_name, old.error_name),
                ("ErrorMessage", record.message, old.message),
            )
            if value != before
        }
        if changed or record.timings != old.timings:
            changed["Timings"] = _timings(record)
            changed["Progress"] = self.progress
            self.emit_properties_changed(changed)


class ManagerInterface(ServiceInterface):
    def __init__(self, agent: Agent, bus: MessageBus, auth: Authorizer) -> None:
        super().__init__(IFACE_MANAGER)
        self.agent = agent
        self.bus = bus
        self.auth = auth
        self._updates: OrderedDict[str, UpdateInterface] = OrderedDict()
        self._handed_out: dict[tuple[str, int], int] = {}
        self._ended_id = ""  # the update whose end (Finished) precedes the PhaseChanged to idle
        agent.listeners.append(self)
        if agent.record is not None:
            self._export(agent.record)
        if agent.last is not None:
            self._export(agent.last)

    def introspect(self) -> intr.Interface:
        return _name_out_args(super().introspect())

    # ------------------------------------------------------------------ agent listener

    def phase_changed(self, record: UpdateRecord | None, phase: Phase) -> None:
        if record is not None:
            self._export(record).update(record)
        self.emit_properties_changed(
            {
                "Phase": str(phase),
                "Progress": self.agent.progress,
                "CurrentUpdate": record.id if record else "",
                "CurrentUpdatePath": update_path(record.id) if record else "/",
                "Participants": self.participants,
                "KernelState": self.kernel_state,
            }
        )
        # An ended update is no longer the agent's record, but idle is still its phase change.
        ended, self._ended_id = self._ended_id, ""
        self.PhaseChanged(record.id if record else ended if phase is Phase.IDLE else "", str(phase))

    def update_finished(self, record: UpdateRecord) -> None:
        self._export(record).update(record)
        for fd in self._handed_out.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._handed_out.clear()
        self._ended_id = record.id
        self.emit_properties_changed({"LastResult": self.last_result})
        self.Finished(record.id, record.result, record.error_name, record.message)

    def kernel_state_changed(self, value: str) -> None:
        self.emit_properties_changed({"KernelState": value})

    def participants_changed(self) -> None:
        self.emit_properties_changed({"Participants": self.participants})

    def _export(self, record: UpdateRecord) -> UpdateInterface:
        obj = self._updates.get(record.id)
        if obj is None:
            obj = UpdateInterface(self, record)
            self.bus.export(update_path(record.id), obj)
            self._updates[record.id] = obj
            # Whoever subscribed to the path before Prepare learns the first phase here.
            obj.announce()
            while len(self._updates) > KEEP_UPDATE_OBJECTS:
                old_id, _ = self._updates.popitem(last=False)
                self.bus.unexport(update_path(old_id))
        return obj

    # ------------------------------------------------------------------ properties

    @dbus_property(name="Version", access=PropertyAccess.READ)
    def version(self) -> DBusStr:
        return __version__

    @dbus_property(name="Phase", access=PropertyAccess.READ)
    def phase(self) -> DBusStr:
        return str(self.agent.phase)

    @dbus_property(name="KernelAbi", access=PropertyAccess.READ)
    def kernel_abi(self) -> DBusStr:
        return self.agent.abi

    @dbus_property(name="KernelState", access=PropertyAccess.READ)
    def kernel_state(self) -> DBusStr:
        return self.agent.kernel_state_text

    @dbus_property(name="KernelLoaded", access=PropertyAccess.READ)
    def kernel_loaded(self) -> DBusBool:
        return self.agent.kernel_loaded

    @dbus_property(name="CurrentUpdate", access=PropertyAccess.READ)
    def current_update(self) -> DBusStr:
        return self.agent.record.id if self.agent.record else ""

    @dbus_property(name="CurrentUpdatePath", access=PropertyAccess.READ)
    def current_update_path(self) -> DBusObjectPath:
        return update_path(self.agent.record.id) if self.agent.record else "/"

    @dbus_property(name="Progress", access=PropertyAccess.READ)
    def progress(self) -> DBusUInt32:
        return self.agent.progress

    @dbus_property(name="Participants", access=PropertyAccess.READ)
    def participants(self) -> Participants:
        return [[u.unit, u.active_state, u.sub_state, u.result] for u in self.agent.participants]

    @dbus_property(name="LastResult", access=PropertyAccess.READ)
    def last_result(self) -> LastResult:
        last = self.agent.last
        if last is None:
            return ["", "", "", ""]
        return [last.id, last.result, last.error_name, last.message]

    # ------------------------------------------------------------------ signals

    @dbus_signal(name="PhaseChanged")
    def PhaseChanged(
        self, update_id: str, phase: str
    ) -> Annotated[tuple[str, str], DBusSignature("ss")]:
        return update_id, phase

    @dbus_signal(name="Finished")
    def Finished(
        self, update_id: str, result: str, error_name: str, message: str
    ) -> Annotated[tuple[str, str, str, str], DBusSignature("ssss")]:
        return update_id, result, error_name, message

    # ------------------------------------------------------------------ methods

    @dbus_method(name="Check")
    async def check(self) -> DBusDict:
        with dbus_errors("Check"):
            report = self.agent.check()
            return {
                "ready": Variant("b", report.ready),
                "blockers": Variant("as", list(report.blockers)),
                "warnings": Variant("as", list(report.warnings)),
                "abi": Variant("s", report.abi),
                "phase": Variant("s", report.phase),
                "kernel-loaded": Variant("b", report.kernel_loaded),
                "preserved": Variant("u", report.preserved),
            }

    @dbus_method(name="Prepare")
    async def prepare(self, options: DBusDict) -> Started:
        with dbus_errors("Prepare"):
            update_id = _requested_id(options)
            caller = await self.auth.authorize("prepare", {"update_id": update_id})
            _options(options, {"id": "s"})
            # The update's object is exported before this returns; its path is derived from the id,
            # so a caller that chose the id has subscribed to it before calling.
            record = await self.agent.prepare(update_id, str(caller))
            self._export(record)
            return record.id, update_path(record.id)

    @dbus_method(name="Execute")
    async def execute(self, update_id: DBusStr) -> None:
        with dbus_errors("Execute"):
            _update_id(update_id)
            await self.auth.authorize("execute", {"update_id": update_id})
            await self.agent.execute(update_id)

    @dbus_method(name="Cancel")
    async def cancel(self, update_id: DBusStr) -> None:
        with dbus_errors("Cancel"):
            _update_id(update_id)
            await self.auth.authorize("cancel", {"update_id": update_id})
            await self.agent.cancel(update_id)

    @dbus_method(name="Restore")
    async def restore(self, update_id: DBusStr) -> None:
        with dbus_errors("Restore"):
            _update_id(update_id)
            await self.auth.authorize("finish", {"update_id": update_id})
            await self.agent.restore(update_id)

    @dbus_method(name="Finish")
    async def finish(self, update_id: DBusStr) -> None:
        with dbus_errors("Finish"):
            _update_id(update_id)
            await self.auth.authorize("finish", {"update_id": update_id})
            await self.agent.finish(update_id)

    @dbus_method(name="LoadKernel")
    async def load_kernel(
        self, kernel: DBusUnixFd, initrd: DBusUnixFd, cmdline: DBusStr, options: DBusDict
    ) -> DBusStr:
        try:
            with dbus_errors("LoadKernel"):
                await self.auth.authorize("load-kernel", {"cmdline": cmdline[:256]})
                opts = _options(options, {"no-initrd": "b"})
                initrd_fd = -1 if opts.get("no-initrd") else initrd
                return await self.agent.load_kernel(kernel, initrd_fd, cmdline)
        finally:
            _close(kernel, initrd)

    @dbus_method(name="Preserve")
    async def preserve(
        self, fd: DBusUnixFd, session: DBusStr, token: DBusUInt64, options: DBusDict
    ) -> None:
        try:
            with dbus_errors("Preserve"):
                _session_name(session)
                caller = await self.auth.authorize("preserve", {"session": session})
                opts = _options(options, {"depends-on": "a(st)"})
                depends = [(_session_name(s), int(t)) for s, t in opts.get("depends-on", [])]
                self.agent.preserve(fd, session, token, depends, owner=f"uid={caller.uid}")
        finally:
            _close(fd)

    @dbus_method(name="Unpreserve")
    async def unpreserve(self, session: DBusStr, token: DBusUInt64) -> None:
        with dbus_errors("Unpreserve"):
            _session_name(session)
            caller = await self.auth.authorize("preserve", {"session": session})
            registry = self.agent.registry
            if (
                caller.uid != 0
                and (session, token) in registry
                and registry.get(session, token).owner != f"uid={caller.uid}"
            ):
                # One participant must not take back (and so drop) another's fd.
                raise NotAuthorized("unpreserve (the fd was handed in by another user)")
            self.agent.unpreserve(session, token)

    @dbus_method(name="Retrieve")
    async def retrieve(self, session: DBusStr, token: DBusUInt64) -> DBusUnixFd:
        with dbus_errors("Retrieve"):
            _session_name(session)
            caller = await self.auth.identify()
            owner = self.agent.owner_of(session, token)
            if caller.uid != 0 and owner != f"uid={caller.uid}":
                # Someone else's memory: only with the retrieve action.
                try:
                    await self.auth.authorize("retrieve", {"session": session})
                except NotAuthorized:
                    what = f"the fd {_shown(session)}/{token}"
                    why = (
                        "was preserved by another user"
                        if owner
                        else "is not carried by this update"
                    )
                    raise NotAuthorized(f"retrieve ({what} {why})") from None
            fd = await self.agent.retrieve(session, token, str(caller))
            # dbus-fast sends the reply after this returns, so the agent keeps its copy until the
            # update ends (or the same token is retrieved again).
            previous = self._handed_out.pop((session, token), None)
            if previous is not None:
                _close(previous)
            self._handed_out[(session, token)] = fd
            return fd

    @dbus_method(name="ListSessions")
    async def list_sessions(self) -> Sessions:
        with dbus_errors("ListSessions"):
            return [[s, t, owner, state] for s, t, owner, state in self.agent.sessions()]

    @dbus_method(name="GetHistory")
    async def get_history(self, limit: DBusUInt32) -> HistoryList:
        with dbus_errors("GetHistory"):
            entries = self.agent.history.load()[-max(1, min(limit or 50, 200)) :]
            out = []
            for entry in entries:
                with contextlib.suppress(ValueError):
                    record = UpdateRecord.from_json(entry)
                    out.append(
                        {
                            "id": Variant("s", record.id),
                            "result": Variant("s", record.result),
                            "error-name": Variant("s", record.error_name),
                            "message": Variant("s", record.message),
                            "started-by": Variant("s", record.started_by),
                            "started-at": Variant("d", record.started_at),
                            "abi": Variant("s", record.abi),
                            "boots": Variant("u", record.boot_count),
                            "blackout-critical": Variant("d", record.blackout_critical),
                            "timings": Variant("a(sdd)", _timings(record)),
                        }
                    )
            return out


def _close(*fds: int) -> None:
    # Once each: LoadKernel(0, 0) names one fd twice, and a second close could hit a reused number.
    for fd in dict.fromkeys(fds):
        with contextlib.suppress(OSError):
            os.close(fd)
