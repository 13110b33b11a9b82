"""Start-up and recovery after a restart: opening the device (EBUSY retried), choosing the reboot
strategy, and deciding where this boot stands — the live update's new boot, a restart in the same
boot, a kernel left prepared by a dead agent, or an update that this boot has no handover for
(``docs/reliability.md`` has the table per backend)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar

import structlog

from .. import phase as ph
from ..config import Config
from ..errors import DeviceBusy, ErrorCode, LuoError
from ..kernel.backend import BootState, KernelBackend
from ..kernel.device import GlobalState
from ..kexec_handover import SYSTEMD_CARRIES_FD_STORES, direct_strategy_warning, systemd_major
from ..persist import PersistError
from ..records import UpdateRecord
from ..systemd.gate import Gate
from .ledger import Ledger, finished
from .state import CMDLINE_MARKER, AgentState, KernelThread, RebootStrategy, new_update_id

log = structlog.get_logger("luo_agent.agent")

T = TypeVar("T")


async def busy_backoff(
    kernel_thread: KernelThread,
    fn: Callable[[], T],
    deadline: float,
    status: Callable[[str], object],
) -> T:
    """Run ``fn`` on the kernel thread, retrying EBUSY (another owner of the exclusive device,
    e.g. systemd >= 261 at boot) with exponential back-off until ``deadline``; the service
    status says what the agent waits for meanwhile."""
    delay = 0.05
    attempt = 1
    while True:
        try:
            result = await kernel_thread.call(fn)
        except DeviceBusy as exc:
            if time.monotonic() + delay > deadline:
                status(f"gave up waiting for /dev/liveupdate after {attempt} attempts")
                raise
            status(f"waiting for /dev/liveupdate (attempt {attempt}): {exc}")
            log.info("kernel_busy_retry", delay=delay, attempt=attempt)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
            attempt += 1
            continue
        if attempt > 1:
            status(f"/dev/liveupdate opened after {attempt} attempts")
        return result


# ------------------------------------------------------------------------ the reboot strategy


def choose_reboot_strategy(config: Config, kernel: KernelBackend, version: str) -> RebootStrategy:
    """Resolve ``reboot_strategy`` (config.py): "auto" takes "systemd" only where it works; an
    explicit "systemd" that cannot work is reported, never replaced by "direct"."""
    wanted = config.reboot_strategy
    chosen, blocker = "direct", ""
    if wanted != "direct":
        missing = _systemd_kexec_missing(config, kernel, version)
        if wanted == "auto":
            chosen = "direct" if missing else "systemd"
        else:
            chosen, blocker = "systemd", missing
        log.info("reboot_strategy", configured=wanted, chosen=chosen, unmet=missing)
    warning = direct_strategy_warning(version, chosen, config.systemd_user_mode)
    return RebootStrategy(chosen, blocker, warning)


def _systemd_kexec_missing(config: Config, kernel: KernelBackend, version: str) -> str:
    """Why PID 1 cannot carry this agent's update through an orderly kexec ("" if it can)."""
    if not kernel.capabilities.pid1_can_carry:
        return (
            f"reboot_strategy=systemd needs the session ABI: on {kernel.abi} the update lives in "
            "the device fd, which must stay open through the reboot while PID 1 needs the device "
            "at shutdown"
        )
    if config.systemd_user_mode:
        return "reboot_strategy=systemd needs the system manager, not a user manager"
    major = systemd_major(version)
    if major is None:
        return "reboot_strategy=systemd: the systemd version is unknown"
    if major < SYSTEMD_CARRIES_FD_STORES:
        return (
            f"reboot_strategy=systemd needs systemd >= {SYSTEMD_CARRIES_FD_STORES} (fd stores "
            f"carried through kexec); PID 1 is systemd {version}"
        )
    return ""


async def _manager_version(gate: Gate) -> str:
    """PID 1's version, asked once at start-up ("" if it cannot be read)."""
    try:
        return await gate.manager_version()
    except (LuoError, OSError) as exc:
        log.warning("systemd_version_unknown", error=str(exc))
        return ""


# ---------------------------------------------------------------------------------- recovery


@dataclass(frozen=True, slots=True)
class Recovery:
    """Where this boot stands, for the engine's ``Recovered`` event and what follows it."""

    kernel_state: ph.KernelState
    # A restarted agent goes on with Finish (the restore gate had passed) instead of Restore.
    resume_with_finish: bool = False
    # The dead agent was cancelling: the restart finishes that cancel, which ends as the dead
    # agent would have ended it, not as an abort.
    finishes_a_cancel: bool = False
    # Why the update of a dead agent is aborted (the failure's message).
    abort_reason: str = ""
    # What the kernel said of this boot (``BootState.notes``).
    boot_notes: tuple[str, ...] = ()


class Startup:
    """Opens the kernel and picks up where this boot stands: sets the kernel and the update in
    hand (``AgentState``) and records the updates that ended while no agent was there."""

    def __init__(
        self,
        state: AgentState,
        kernel_thread: KernelThread,
        ledger: Ledger,
        status: Callable[[str], object],
    ) -> None:
        self._state = state
        self._kernel_thread = kernel_thread
        self._ledger = ledger
        self._history = ledger.history
        self._status = status

    async def open_and_recover(
        self, config: Config, open_kernel: Callable[[], KernelBackend], gate: Gate
    ) -> tuple[RebootStrategy, Recovery]:
        """Open the kernel (retrying EBUSY with back-off), choose the reboot strategy and find
        where this boot stands."""
        self._ledger.runtime.setup()
        self._ledger.runtime.set_active(())
        self._state.last = self._ledger.last_from_history()
        deadline = time.monotonic() + config.kernel.busy_retry_seconds
        thread, status = self._kernel_thread, self._status
        kernel = self._state.kernel = await busy_backoff(thread, open_kernel, deadline, status)
        # The session ABI opens the device only here: EBUSY is retried on the same backend (it
        # may already hold sessions adopted from the fd store).
        boot = await busy_backoff(thread, kernel.start, deadline, status)
        for note in boot.notes:
            log.warning("kernel_boot_note", note=note)
        version = "" if config.systemd_user_mode else await _manager_version(gate)
        strategy = choose_reboot_strategy(config, kernel, version)
        return strategy, await self.recover(boot, self._ledger.load_current(), gate)

    async def recover(self, boot: BootState, previous: UpdateRecord | None, gate: Gate) -> Recovery:
        """* a live-update boot: the update continues (restore; a restarted agent that finds
          the restore gate passed goes on with finish);
        * the kernel still prepared (rfc-v2/v3 after a crash), or a pre-reboot update of a dead
          agent that the kernel already dropped: cancel, so the cancel hooks run, and record the
          update as aborted;
        * a post-reboot update whose carried files the kernel already finished: aborted, unless
          the dead agent was finishing (then what its finish reached: ``ledger.finished``);
        * the kernel updated but its metadata already restored by a dead agent (rfc-v2/v3
          restore it once): the update is taken from ``in-flight.json``;
        * an update in ``in-flight.json`` that this boot has no handover for: recorded as lost.
        """
        kernel = self._state.opened_kernel()
        last = self._state.last
        taken_over = self._record_lost_update(kernel, boot, previous)
        if previous is not None and last is not None and previous.id == last.id:
            # current.json could not be removed when the update ended (read-only /run): the
            # history already has the outcome.
            log.warning("stale_current_state_ignored", update_id=previous.id)
            previous = None
        was = ph.Phase(previous.phase) if previous is not None else ph.Phase.IDLE
        # A restart in the same boot (SIGKILL, watchdog): current.json has the same update.
        same_boot = (
            previous is not None
            and ph.is_post_reboot(was)
            and (boot.incoming is None or boot.incoming.id == previous.id)
        )
        updated = boot.kernel_state is GlobalState.UPDATED
        incoming = boot.incoming or taken_over
        if incoming is None and updated and not same_boot:
            # rfc-v2/v3 restore the metadata only once: an agent that died after restoring it
            # and before saving this boot's record took it along.  The update as prepared, with
            # its kernel tokens, is in the state directory.
            incoming = self._history.load_in_flight()
            if incoming is not None:
                kernel.adopt(incoming)
                log.warning("update_taken_from_in_flight_record", update_id=incoming.id)
        recovery = Recovery(ph.KernelState.NORMAL)
        if incoming is not None or (updated and same_boot):
            recovery = Recovery(ph.KernelState.UPDATED)
            if same_boot:
                # rfc-v2/v3 restore the metadata only once (the dead agent did): the kernel
                # tokens come from current.json.  The session ABI could read it again.
                assert previous is not None
                kernel.adopt(previous)
                self._state.record = previous
                finish = was in (ph.Phase.RESTORED, ph.Phase.FINISHING)
                recovery = replace(recovery, resume_with_finish=finish)
                log.warning("agent_restarted", update_id=previous.id, phase=str(was))
            else:
                assert incoming is not None
                record = incoming.with_phase(ph.Phase.UPDATED, new_boot=True)
                self._state.record = replace(
                    record, boot_count=record.boot_count + 1, kernel_cmdline=kernel.command_line()
                )
        elif boot.stale_prepared:
            if previous is not None:
                kernel.adopt(previous)
            self._state.record = previous or UpdateRecord(
                id=new_update_id(), abi=str(kernel.abi), started_by="unknown"
            )
            recovery = Recovery(
                ph.KernelState(str(boot.kernel_state)),
                finishes_a_cancel=was is ph.Phase.CANCELLING,
                abort_reason=f"the agent stopped in phase {was}; the kernel was left "
                f"{boot.kernel_state} and is cancelled",
            )
        elif previous is not None and ph.is_pre_reboot(was):
            # The kernel already dropped the update (its handles closed with the dead agent), or
            # the dead agent's cancel got as far as EVENT_CANCEL (rfc-v2 then still holds the
            # files): cancel anyway, with the recorded tokens, so the cancel hooks run and
            # nothing stays preserved.
            kernel.adopt(previous)
            self._state.record = previous
            recovery = Recovery(
                ph.KernelState.PREPARED,
                finishes_a_cancel=was is ph.Phase.CANCELLING,
                abort_reason=f"the agent stopped in phase {was}; the kernel discarded the update",
            )
        else:
            await self._after_dead_agent(previous, was)
            if updated:
                recovery = Recovery(ph.KernelState.UPDATED)
        stale_gate = ph.SPECS[was].target
        if stale_gate is not None and ph.is_pre_reboot(was):
            # The dead agent's gate may still have a start job queued (a hook that hangs): the
            # cancel target conflicts with it, and starting it would be refused as destructive.
            with contextlib.suppress(LuoError):
                await gate.stop_unit(stale_gate)
        return replace(recovery, boot_notes=boot.notes)

    async def _after_dead_agent(self, previous: UpdateRecord | None, was: ph.Phase) -> None:
        """Nothing to continue in the kernel: record how the dead agent's update ended."""
        if previous is None or was is ph.Phase.IDLE:
            return
        if was is ph.Phase.FINISHING:
            # The dead agent's kernel finish went through (rfc-v2/v3 keep the carried files
            # until FINISH, the session ABI's come back from the fd store): record what it
            # reached, as the agent would have.
            log.warning("finish_completed_by_the_kernel", update_id=previous.id)
            # Sessions the dead agent finished but had not yet let go of come back from the
            # fd store: FINISH again is a no-op that releases them (elsewhere it only fails).
            with contextlib.suppress(LuoError, OSError):
                await self._kernel_thread.call(self._state.opened_kernel().finish)
            self._ledger.finish_record(finished(previous))
            return
        # After the reboot with the carried files gone (incoming sessions closed with the dead
        # agent and finished by the kernel): nothing left to restore.
        self._ledger.finish_record(
            previous.ended(
                "aborted",
                ErrorCode.ABORTED,
                f"the agent stopped in phase {was}; the kernel finished the carried files"
                " and unretrieved data is lost",
            )
        )

    def _record_lost_update(
        self, kernel: KernelBackend, boot: BootState, previous: UpdateRecord | None
    ) -> UpdateRecord | None:
        """An update that was prepared (perhaps already kexec'd into) and that this boot knows
        nothing of: no handover came in, and /run (current.json) is empty, so the machine went
        through a reboot that was not the live update's (a crash of the new kernel, a power
        cycle).  Recorded as lost, with what the agent last knew.  Returned instead when this is
        the update's own live-update boot and the kernel still carries its files: the update
        goes on from the in-flight record."""
        pending = self._history.load_in_flight()
        if pending is None:
            return None
        if self._history.outcome(pending.id) is not None:
            with contextlib.suppress(PersistError):
                self._history.clear_in_flight()  # recorded already; only the removal was lost
            return None
        if previous is not None or boot.kernel_state is GlobalState.UPDATED:
            return None  # a restart in the same boot, or the kernel carries it: recovery has it
        if boot.incoming is not None and boot.incoming.id == pending.id:
            return None  # the live-update boot of that very update
        if f"{CMDLINE_MARKER}{pending.id}" in kernel.command_line().split():
            # This is the update's own kexec'd kernel, yet its handover is gone: an agent that
            # started earlier in this boot took it and died before keeping it (session ABI:
            # between RETRIEVE_SESSION of the agent's session and the fd store), or a kexec
            # someone else asked for while the image was loaded (logind's auto-kexec of a plain
            # reboot).  In the first case the participants' sessions are still carried: take
            # them by the names in-flight.json gives, and go on with the update.
            if kernel.take_over_carried(pending):
                log.warning("update_taken_from_in_flight_record", update_id=pending.id)
                return pending
            lost = pending.ended(
                "aborted",
                ErrorCode.ABORTED,
                "this boot runs the update's kernel, but the agent's handover was not found: "
                "either someone else's kexec (a reboot or kexec asked for while the update was "
                f"{pending.phase}: the agent's handles closed as it stopped, nothing was carried) "
                "or an agent earlier in this boot took the handover and died; the agent cannot "
                "restore what was carried",
            )
        else:
            if ph.is_post_reboot(ph.Phase(pending.phase)):
                when = "in its live-update boot, before the update finished"
            elif pending.phase in (ph.Phase.FREEZING, ph.Phase.REBOOTING):
                when = "after the kexec was issued (or on the way to it)"
            else:
                when = "while the update was prepared"
            lost = pending.ended(
                "lost-in-reboot",
                ErrorCode.HANDOVER_LOST,
                f"the machine booted without this update's live-update handover: it went down "
                f"{when}, last seen in phase {pending.phase} (a kernel crash or a power cycle); "
                "the carried data is lost",
            )
        log.error("update_lost", update_id=pending.id, phase=pending.phase, result=lost.result)
        self._ledger.finish_record(lost)
        return None
