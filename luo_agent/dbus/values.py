"""What the API answers with: the signatures of its compound values, and the agent's records as
those values.  No ``from __future__ import annotations``: the aliases are read at run time by
dbus-fast where the interfaces use them."""

from typing import Annotated, Any

from dbus_fast import Variant
from dbus_fast.annotations import DBusSignature

from ..records import UpdateRecord
from .names import recorded_error

Participants = Annotated[list[list[str]], DBusSignature("a(ssss)")]
Timings = Annotated[list[list[Any]], DBusSignature("a(sdd)")]
Sessions = Annotated[list[list[Any]], DBusSignature("a(stss)")]
HistoryList = Annotated[list[dict[str, Variant]], DBusSignature("aa{sv}")]
LastResult = Annotated[list[str], DBusSignature("(ssss)")]
FleetSlotState = Annotated[list[str], DBusSignature("(ssss)")]
Started = Annotated[tuple[str, str], DBusSignature("so")]


def phase_timings(record: UpdateRecord) -> list[list[Any]]:
    """``a(sdd)``: each phase, when it started and how long it took (-1 while it lasts)."""
    return [
        [t.phase, t.started, -1.0 if t.duration is None else t.duration] for t in record.timings
    ]


def result_summary(record: UpdateRecord | None) -> list[str]:
    """``(ssss)``: id, result, error name and message of the last update ended ('' for none)."""
    if record is None:
        return ["", "", "", ""]
    return [record.id, record.result, recorded_error(record.error_name), record.message]


def history_entry(record: UpdateRecord) -> dict[str, Variant]:
    """One ``a{sv}`` of ``GetHistory``."""
    return {
        "id": Variant("s", record.id),
        "result": Variant("s", record.result),
        "error-name": Variant("s", recorded_error(record.error_name)),
        "message": Variant("s", record.message),
        "started-by": Variant("s", record.started_by),
        "started-at": Variant("d", record.started_at),
        "abi": Variant("s", record.abi),
        "boots": Variant("u", record.boot_count),
        "blackout-critical": Variant("d", record.blackout_critical),
        "fleet-slot": Variant("s", record.fleet_slot),
        "slot-released-at": Variant("d", record.slot_released_at),
        "timings": Variant("a(sdd)", phase_timings(record)),
    }
