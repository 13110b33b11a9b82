"""org.luoagent.LiveUpdate1.Update: one object per update, at a path derived from its id (so a
caller subscribes before it starts the update), and ``UpdateObjects``, the ones exported (the last
``KEEP_UPDATE_OBJECTS``).  No ``from __future__ import annotations``: dbus-fast reads the
annotations at run time."""

from collections import OrderedDict
from typing import Any

from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusStr, DBusUInt32
from dbus_fast.constants import PropertyAccess
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property

from ..agent import Agent
from ..phase import SPECS, Phase
from ..records import UpdateRecord
from .auth import Authorizer
from .errors import dbus_errors
from .names import IFACE_UPDATE, recorded_error, update_path
from .values import Timings, phase_timings

KEEP_UPDATE_OBJECTS = 16


class UpdateInterface(ServiceInterface):
    """One update's record as properties, and its Cancel."""

    def __init__(self, agent: Agent, auth: Authorizer, record: UpdateRecord) -> None:
        super().__init__(IFACE_UPDATE)
        self._agent = agent
        self._auth = auth
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
        return SPECS[Phase(self.record.phase)].progress

    @dbus_property(name="StartedBy", access=PropertyAccess.READ)
    def started_by(self) -> DBusStr:
        return self.record.started_by

    @dbus_property(name="Result", access=PropertyAccess.READ)
    def result(self) -> DBusStr:
        return self.record.result

    @dbus_property(name="ErrorName", access=PropertyAccess.READ)
    def error_name(self) -> DBusStr:
        return recorded_error(self.record.error_name)

    @dbus_property(name="ErrorMessage", access=PropertyAccess.READ)
    def error_message(self) -> DBusStr:
        return self.record.message

    @dbus_property(name="Timings", access=PropertyAccess.READ)
    def timings(self) -> Timings:
        return phase_timings(self.record)

    @dbus_method(name="Cancel")
    async def cancel(self) -> None:
        with dbus_errors("Update.Cancel"):
            await self._auth.authorize("Cancel", {"update_id": self.record.id})
            await self._agent.cancel(self.record.id)

    def announce(self) -> None:
        self.emit_properties_changed(
            {
                "Id": self.record.id,
                "Phase": self.record.phase,
                "Progress": self.progress,
                "StartedBy": self.record.started_by,
                "Result": self.record.result,
                "ErrorName": recorded_error(self.record.error_name),
                "ErrorMessage": self.record.message,
                "Timings": phase_timings(self.record),
            }
        )

    def update(self, record: UpdateRecord) -> None:
        old, self.record = self.record, record
        changed: dict[str, Any] = {
            name: value
            for name, value, before in (
                ("Phase", record.phase, old.phase),
                ("Result", record.result, old.result),
                ("ErrorName", recorded_error(record.error_name), recorded_error(old.error_name)),
                ("ErrorMessage", record.message, old.message),
            )
            if value != before
        }
        if changed or record.timings != old.timings:
            changed["Timings"] = phase_timings(record)
            changed["Progress"] = self.progress
            self.emit_properties_changed(changed)


class UpdateObjects:
    """The exported Update objects, oldest first; past ``KEEP_UPDATE_OBJECTS`` the oldest goes."""

    def __init__(self, bus: MessageBus, agent: Agent, auth: Authorizer) -> None:
        self._bus = bus
        self._agent = agent
        self._auth = auth
        self._exported: OrderedDict[str, UpdateInterface] = OrderedDict()

    def export(self, record: UpdateRecord) -> UpdateInterface:
        """The record's object, exported (and announced) the first time it is asked for."""
        obj = self._exported.get(record.id)
        if obj is None:
            obj = UpdateInterface(self._agent, self._auth, record)
            self._bus.export(update_path(record.id), obj)
            self._exported[record.id] = obj
            # Whoever subscribed to the path before Prepare learns the first phase here.
            obj.announce()
            while len(self._exported) > KEEP_UPDATE_OBJECTS:
                old_id, _ = self._exported.popitem(last=False)
                self._bus.unexport(update_path(old_id))
        return obj
