"""Faults that involve the systemd manager itself, on every kernel backend: a participant stopped
from outside in the middle of its phase (issue 6 item 2) and a normal reboot queued by someone
else while the update is prepared, noticed through the manager's JobNew signal (item 7).

A failing participant and one hanging past the phase timeout are covered by
tests/e2e/test_e2e_participant_failures.py (same sandbox, same checks)."""

from __future__ import annotations

import contextlib

from .conftest import needs_sandbox
from .harness import AGENT, AgentBus, FaultBed, unit_property

pytestmark = [needs_sandbox]

# The user manager has no reboot.target of its own: a stand-in with the system unit's name is
# what PID 1 would queue for `systemctl reboot` (the agent watches JobNew by unit name).
STAND_IN_REBOOT = "[Unit]\nDescription=stand-in for reboot.target\nDefaultDependencies=no\n"


async def test_participant_stopped_from_outside_mid_phase_cancels(bed: FaultBed) -> None:
    update_id = "stopped-from-outside"
    bed.mode("prepare", "hang")
    with contextlib.ExitStack() as stack:
        box = bed.boot(stack)
        async with AgentBus(box.bus_address) as ab:
            box.systemctl("start", AGENT)
            await ab.until_phase("idle")
            await ab.prepare(update_id)
            await bed.hook_waiting("prepare")
            box.systemctl("stop", "fault-prepare.service")  # an operator, or a crash
            entry = await ab.until_ended(update_id)
            assert entry["result"] == "failed", entry
            assert entry["error-name"] == "org.luoagent.LiveUpdate1.Error.ParticipantFailed"
            assert "fault-prepare.service" in entry["message"], entry
            assert "cancel ok" in bed.ran()
            assert bed.kernel_clean(), bed.machine.inspect()
            assert unit_property(box, AGENT, "NRestarts") == "0"


async def test_reboot_queued_by_someone_else_while_prepared_cancels(bed: FaultBed) -> None:
    update_id = "foreign-reboot"
    with contextlib.ExitStack() as stack:
        box = bed.boot(stack)
        box.write_units({"reboot.target": STAND_IN_REBOOT})
        async with AgentBus(box.bus_address) as ab:
            box.systemctl("start", AGENT)
            await ab.until_phase("idle")
            await ab.load_kernel(bed.bed.kernel_image)
            await ab.prepare(update_id)
            await ab.until_phase("prepared")
            assert not bed.kernel_clean()
            box.systemctl("start", "--no-block", "reboot.target")
            entry = await ab.until_ended(update_id)
            assert entry["result"] == "cancelled", entry
            assert "reboot.target was queued by someone else" in entry["message"], entry
            assert "cancel ok" in bed.ran()
            assert bed.kernel_clean(), bed.machine.inspect()
            assert bed.machine.running
