"""SIGKILL of the agent in every phase, on every kernel backend, under a real systemd manager that
restarts it (Restart=on-failure, as in units/luo-agent.service).  After each kill: the kernel's
state (EmulatedMachine.inspect), the agent's (D-Bus), the history and the participant's bytes.

Before the reboot the update is aborted (the kernel drops it with the agent's handles, or the
restarted agent cancels what rfc-v2/v3 left prepared), the cancel hooks run, the history says
"aborted".  After the kexec the update goes on to success: the incoming session fds survive in
the fd store (session ABI) or the kernel tokens come from current.json (rfc-v2, v3).
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from .conftest import needs_sandbox
from .harness import AGENT, AgentBus, FaultBed, unit_property

pytestmark = [needs_sandbox]


async def _kill_and_wait_back(fb: FaultBed, box: object, ab: AgentBus) -> None:
    from luo_agent.sandbox import Sandbox

    assert isinstance(box, Sandbox)
    before = ab.owner
    fb.kill_agent(box)
    await ab.until_restarted(before)


@pytest.mark.parametrize("phase", ["preparing", "prepared", "freezing"])
async def test_sigkill_before_the_reboot_aborts_the_update(bed: FaultBed, phase: str) -> None:
    update_id = f"kill-{phase}"
    if phase == "preparing":
        bed.mode("prepare", "hang")
    if phase == "freezing":
        bed.mode("freeze", "hang")
    with contextlib.ExitStack() as stack:
        box = bed.boot(stack)
        async with AgentBus(box.bus_address) as ab:
            box.systemctl("start", AGENT)
            await ab.until_phase("idle")
            await ab.load_kernel(bed.bed.kernel_image)
            await ab.prepare(update_id)
            if phase == "freezing":
                await ab.until_phase("prepared")
                await ab.execute(update_id)
            await ab.until_phase(phase)
            await _kill_and_wait_back(bed, box, ab)
            entry = await ab.until_ended(update_id)
            # A hook left hanging by the dead agent's gate is not waited for.
            for hook in ("prepare", "freeze"):
                box.systemctl("stop", f"fault-{hook}.service")

            assert entry["result"] == "aborted", entry
            assert entry["error-name"] == "org.luoagent.LiveUpdate1.Error.Aborted", entry
            assert f"stopped in phase {phase}" in entry["message"], entry
            assert "cancel ok" in bed.ran(), bed.ran()  # the cancel hooks ran
            assert bed.kernel_clean(), bed.machine.inspect()
            assert await ab.prop("CurrentUpdate") == ""
            assert bed.machine.running  # and nothing rebooted
            assert unit_property(box, AGENT, "NRestarts") == "1"


async def _first_boot_until_kexec(bed: FaultBed, update_id: str) -> None:
    with contextlib.ExitStack() as stack:
        box = bed.boot(stack)
        async with AgentBus(box.bus_address) as ab:
            box.systemctl("start", AGENT)
            await ab.until_phase("idle")
            await ab.load_kernel(bed.bed.kernel_image)
            await ab.prepare(update_id)
            await ab.until_phase("prepared")
            await ab.execute(update_id)
            await asyncio.to_thread(bed.machine.wait_down, 30)


def _assert_carried_and_finished(bed: FaultBed, entry: dict[str, object]) -> None:
    assert entry["result"] == "success", entry
    assert entry["boots"] == 1, entry
    assert bed.restored() == bed.expected()  # size, file position and sha256 of every byte
    assert bed.kernel_clean(), bed.machine.inspect()


async def test_sigkill_during_the_emulated_reboot_completes_in_the_next_boot(
    bed: FaultBed,
) -> None:
    update_id = "kill-rebooting"
    with contextlib.ExitStack() as stack:
        box = bed.boot(stack)
        async with AgentBus(box.bus_address) as ab:
            box.systemctl("start", AGENT)
            await ab.until_phase("idle")
            await ab.load_kernel(bed.bed.kernel_image)
            await ab.prepare(update_id)
            await ab.until_phase("prepared")
            await ab.execute(update_id)
            await ab.until_saw(update_id, ["rebooting"])
            # The kexec was issued: whatever happens to the agent now, the handover is the
            # kernel's.  Kill it if it has not exited on its own yet.
            with contextlib.suppress(AssertionError, ProcessLookupError):
                bed.kill_agent(box)
            await asyncio.to_thread(bed.machine.wait_down, 30)
    bed.machine.boot()
    with contextlib.ExitStack() as stack:
        box = bed.boot(stack)
        async with AgentBus(box.bus_address) as ab:
            box.systemctl("start", AGENT)
            entry = await ab.until_ended(update_id)
    _assert_carried_and_finished(bed, entry)


@pytest.mark.parametrize("phase", ["updated", "restoring", "finishing"])
async def test_sigkill_after_the_reboot_resumes_the_update(bed: FaultBed, phase: str) -> None:
    update_id = f"kill-{phase}"
    await _first_boot_until_kexec(bed, update_id)
    match phase:
        case "updated":  # the agent waits in updated after a failed restore gate
            bed.mode("restore", "fail")
        case "restoring":
            bed.mode("restore", "hang")
        case "finishing":
            bed.mode("finish", "hang")
    bed.machine.boot()
    with contextlib.ExitStack() as stack:
        box = bed.boot(stack)
        async with AgentBus(box.bus_address) as ab:
            box.systemctl("start", AGENT)
            if phase == "updated":
                await ab.until_saw(update_id, ["restoring", "updated"])
                bed.mode("restore", "ok")
            else:
                await ab.until_phase(phase)
            await _kill_and_wait_back(bed, box, ab)
            if phase != "updated":
                bed.release(phase.removesuffix("ing").replace("restor", "restore"))
            entry = await ab.until_ended(update_id)
            assert unit_property(box, AGENT, "NRestarts") == "1"
    _assert_carried_and_finished(bed, entry)
    phases = [t[0] for t in entry["timings"]]
    assert phases.count("finishing") >= 1 and phases[-1] in ("finishing", "idle"), phases
