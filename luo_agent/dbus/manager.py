"""org.luoagent.LiveUpdate1.Manager: the agent's one object, a thin adapter over the Agent.

Each method checks its arguments (``arguments``), authorises the caller, delegates to the Agent
and translates errors once (``dbus_errors``).  Long work never happens inside a call: Prepare
returns the update's object path at once; progress arrives as PhaseChanged/Finished signals and
PropertiesChanged: the interface is the agent's listener (``AgentListener``) and emits them on
this object and on the update's object (``update_objects``).
No ``from __future__ import annotations`` here: dbus-fast reads the annotations at run time.
"""

import contextlib
from typing import Annotated, Final

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
from ..agent import Agent
from ..errors import NotAuthorized
from ..phase import Phase
from ..records import UpdateRecord
from .arguments import (
    check_session_name,
    check_update_id,
    parse_options,
    requested_id,
    shown,
)
from .auth import Authorizer
from .errors import dbus_errors
from .fds import HandedOutFds, close_fds
from .names import IFACE_MANAGER, recorded_error, update_path
from .update_objects import UpdateInterface, UpdateObjects
from .values import (
    FleetSlotState,
    HistoryList,
    LastResult,
    Participants,
    Sessions,
    Started,
    history_entry,
    result_summary,
)

__all__ = ["ManagerInterface", "UpdateInterface"]

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


class ManagerInterface(ServiceInterface):
    def __init__(self, agent: Agent, bus: MessageBus, auth: Authorizer) -> None:
        super().__init__(IFACE_MANAGER)
        self.agent = agent
        self.bus = bus
        self.auth = auth
        self.updates = UpdateObjects(bus, agent, auth)
        self.handed_out = HandedOutFds()
        self._ended_id = ""  # the update whose end (Finished) precedes the PhaseChanged to idle
        agent.listeners.append(self)
        if agent.record is not None:
            self.updates.export(agent.record)
        if agent.last is not None:
            self.updates.export(agent.last)

    def introspect(self) -> intr.Interface:
        return _name_out_args(super().introspect())

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
        return result_summary(self.agent.last)

    @dbus_property(name="Fleet", access=PropertyAccess.READ)
    def fleet(self) -> FleetSlotState:
        slot = self.agent.fleet
        return [str(slot.slot_state), slot.host_id, slot.coordinator_text, slot.last_error]

    # ------------------------------------------------ the agent's listener (``AgentListener``)
    # Called on the loop; they only emit (and, when an update ends, close the fds ``Retrieve``
    # handed out).

    def phase_changed(self, record: UpdateRecord | None, phase: Phase) -> None:
        if record is not None:
            self.updates.export(record).update(record)
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
        self.updates.export(record).update(record)
        self.handed_out.close_all()
        self._ended_id = record.id
        self.emit_properties_changed({"LastResult": self.last_result})
        self.Finished(record.id, record.result, recorded_error(record.error_name), record.message)

    def kernel_state_changed(self, value: str) -> None:
        self.emit_properties_changed({"KernelState": value})

    def fleet_changed(self) -> None:
        self.emit_properties_changed({"Fleet": self.fleet})

    def participants_changed(self) -> None:
        self.emit_properties_changed({"Participants": self.participants})

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
            report = await self.agent.check()
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
            update_id = requested_id(options)
            caller = await self.auth.authorize("Prepare", {"update_id": update_id})
            parse_options(options, {"id": "s"})
            # The update's object is exported before this returns; its path is derived from the id,
            # so a caller that chose the id has subscribed to it before calling.
            record = await self.agent.prepare(update_id, str(caller))
            self.updates.export(record)
            return record.id, update_path(record.id)

    @dbus_method(name="Execute")
    async def execute(self, update_id: DBusStr) -> None:
        with dbus_errors("Execute"):
            check_update_id(update_id)
            await self.auth.authorize("Execute", {"update_id": update_id})
            await self.agent.execute(update_id)

    @dbus_method(name="Cancel")
    async def cancel(self, update_id: DBusStr) -> None:
        with dbus_errors("Cancel"):
            check_update_id(update_id)
            await self.auth.authorize("Cancel", {"update_id": update_id})
            await self.agent.cancel(update_id)

    @dbus_method(name="Restore")
    async def restore(self, update_id: DBusStr) -> None:
        with dbus_errors("Restore"):
            check_update_id(update_id)
            await self.auth.authorize("Restore", {"update_id": update_id})
            await self.agent.restore(update_id)

    @dbus_method(name="Finish")
    async def finish(self, update_id: DBusStr) -> None:
        with dbus_errors("Finish"):
            check_update_id(update_id)
            await self.auth.authorize("Finish", {"update_id": update_id})
            await self.agent.finish(update_id)

    @dbus_method(name="LoadKernel")
    async def load_kernel(
        self, kernel: DBusUnixFd, initrd: DBusUnixFd, cmdline: DBusStr, options: DBusDict
    ) -> DBusStr:
        try:
            with dbus_errors("LoadKernel"):
                await self.auth.authorize("LoadKernel", {"cmdline": cmdline[:256]})
                opts = parse_options(options, {"no-initrd": "b"})
                initrd_fd = -1 if opts.get("no-initrd") else initrd
                return await self.agent.load_kernel(kernel, initrd_fd, cmdline)
        finally:
            close_fds(kernel, initrd)

    @dbus_method(name="Preserve")
    async def preserve(
        self, fd: DBusUnixFd, session: DBusStr, token: DBusUInt64, options: DBusDict
    ) -> None:
        try:
            with dbus_errors("Preserve"):
                check_session_name(session)
                caller = await self.auth.authorize("Preserve", {"session": session})
                opts = parse_options(options, {"depends-on": "a(st)"})
                depends = [(check_session_name(s), int(t)) for s, t in opts.get("depends-on", [])]
                self.agent.preserve(fd, session, token, depends, owner=f"uid={caller.uid}")
        finally:
            close_fds(fd)

    @dbus_method(name="Unpreserve")
    async def unpreserve(self, session: DBusStr, token: DBusUInt64) -> None:
        with dbus_errors("Unpreserve"):
            check_session_name(session)
            caller = await self.auth.authorize("Unpreserve", {"session": session})
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
            check_session_name(session)
            caller = await self.auth.identify()
            owner = self.agent.owner_of(session, token)
            if caller.uid != 0 and owner != f"uid={caller.uid}":
                # Someone else's memory: only with the retrieve action.
                try:
                    await self.auth.authorize("Retrieve", {"session": session})
                except NotAuthorized:
                    what = f"the fd {shown(session)}/{token}"
                    why = (
                        "was preserved by another user"
                        if owner
                        else "is not carried by this update"
                    )
                    raise NotAuthorized(f"retrieve ({what} {why})") from None
            fd = await self.agent.retrieve(session, token, str(caller))
            # dbus-fast sends the reply after this returns, so the agent keeps its copy until the
            # update ends (or the same token is retrieved again).
            self.handed_out.keep(session, token, fd)
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
                    out.append(history_entry(UpdateRecord.from_json(entry)))
            return out
