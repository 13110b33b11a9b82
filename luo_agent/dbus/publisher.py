"""The agent's listener on the bus: each change the agent reports (``AgentListener``) becomes the
Manager's PropertiesChanged and its PhaseChanged/Finished signals, and the Update object's
PropertiesChanged.  Called on the loop; it only emits (and, when an update ends, closes the fds
``Retrieve`` handed out)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..phase import Phase
from ..records import UpdateRecord
from .names import update_path

if TYPE_CHECKING:
    from .manager import ManagerInterface


class Publisher:
    def __init__(self, manager: ManagerInterface) -> None:
        self._manager = manager
        self._ended_id = ""  # the update whose end (Finished) precedes the PhaseChanged to idle

    def phase_changed(self, record: UpdateRecord | None, phase: Phase) -> None:
        manager = self._manager
        if record is not None:
            manager.updates.export(record).update(record)
        manager.emit_properties_changed(
            {
                "Phase": str(phase),
                "Progress": manager.agent.progress,
                "CurrentUpdate": record.id if record else "",
                "CurrentUpdatePath": update_path(record.id) if record else "/",
                "Participants": manager.participants,
                "KernelState": manager.kernel_state,
            }
        )
        # An ended update is no longer the agent's record, but idle is still its phase change.
        ended, self._ended_id = self._ended_id, ""
        manager.PhaseChanged(
            record.id if record else ended if phase is Phase.IDLE else "", str(phase)
        )

    def update_finished(self, record: UpdateRecord) -> None:
        manager = self._manager
        manager.updates.export(record).update(record)
        manager.handed_out.close_all()
        self._ended_id = record.id
        manager.emit_properties_changed({"LastResult": manager.last_result})
        manager.Finished(record.id, record.result, record.error_name, record.message)

    def kernel_state_changed(self, value: str) -> None:
        self._manager.emit_properties_changed({"KernelState": value})

    def fleet_changed(self) -> None:
        self._manager.emit_properties_changed({"Fleet": self._manager.fleet})

    def participants_changed(self) -> None:
        self._manager.emit_properties_changed({"Participants": self._manager.participants})
