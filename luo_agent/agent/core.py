"""The Agent: the one owner of the current phase.

Requests (from D-Bus) and outcomes (of gates, kernel work and timers) are events on one queue,
consumed by one task (``run``).  Each event goes through the pure engine (``phase.step``); the agent
then saves and announces the new phase (``Ledger``) and starts the step's effects as one *work*
task that feeds its outcome back as an event.  So the phase changes in one place only, and no lock
is needed.  The effects are the rooms' work: ``Gates`` (systemd targets), ``Custody`` (the kernel
and the fds), ``Watchers`` (others' changes), ``Startup`` (opening the kernel, recovery).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import assert_never

import structlog

from .. import phase as ph
from ..config import Config
from ..errors import Busy, LuoError, PhaseError
from ..fdkind import check_preservable
from ..fleet.port import Coordinator
from ..kernel.backend import KernelBackend
from ..persist import History, RuntimeState
from ..records import UpdateRecord
from ..registry import FdRegistry
from ..systemd.gate import Gate, UnitStatus
from .custody import CheckReport, Custody
from .fleet import FleetSlot
from .gates import Gates
from .ledger import Ledger
from .startup import Recovery, Startup
from .state import (
    AgentListener,
    AgentState,
    KernelThread,
    RoomView,
)
from .watchers import Watchers

log = structlog.get_logger("luo_agent.agent")
INHIBITED = "a shutdown is inhibited (logind block lock) by "


class Agent:
    def __init__(
        self,
        *,
        config: Config,
        open_kernel: Callable[[], KernelBackend],
        gate: Gate,
        runtime: RuntimeState,
        history: History,
        status: Callable[[str], object] = lambda text: None,
        on_rebooted: Callable[[], None] = lambda: None,
        coordinator: Coordinator | None = None,
    ) -> None:
        self.config = config
        self._open_kernel = open_kernel
        self._status = status
        self._on_rebooted = on_rebooted
        self.state = AgentState()
        self.listeners: list[AgentListener] = []
        self._kernel_thread = KernelThread()
        self.registry = FdRegistry(
            check_fd=check_preservable,
            max_per_session=config.limits.max_fds_per_session,
            max_total=config.limits.max_fds_total,
        )
        self.custody = Custody(self.state, self._kernel_thread, self.registry, config)
        self.ledger = Ledger(
            self.state, runtime, history, self.listeners, status, self.custody.release_all
        )
        self.gates = Gates(gate, self.listeners)
        self.watchers = Watchers(
            self.state, self._kernel_thread, self.listeners, self._post, self.submit
        )
        self.fleet = FleetSlot(
            self.state,
            coordinator,
            config.fleet,
            state_directory=config.state_directory,
            runtime_directory=config.runtime_directory,
            history=history,
            gate=lambda: self.gates.gate,
            changed=self._fleet_changed,
        )
        self.listeners.append(self.fleet)
        # Requests that are one room's alone.
        self.preserve = self.custody.preserve
        self.unpreserve = self.custody.unpreserve
        self.retrieve = self.custody.retrieve
        self.sessions = self.custody.sessions
        self.owner_of = self.custody.owner_of
        self.observe_kernel_state = self.watchers.observe_kernel_state
        self._queue: asyncio.Queue[tuple[ph.Event, asyncio.Future[ph.Step] | None]] = (
            asyncio.Queue()
        )
        self._work: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timeout_probe: asyncio.Task[None] | None = None
        self._recovery = Recovery(ph.KernelState.NORMAL)

    # What the D-Bus layer and tests read: the rooms' state, under the names the API uses.
    phase = RoomView[ph.Phase]("state.phase")
    record = RoomView[UpdateRecord | None]("state.record")
    last = RoomView[UpdateRecord | None]("state.last")
    kernel = RoomView[KernelBackend | None]("state.kernel")
    abi = RoomView[str]("custody.abi")
    progress = RoomView[int]("state.progress")
    history = RoomView[History]("ledger.history")
    boot_notes = RoomView[tuple[str, ...]]("_recovery.boot_notes")
    participants = RoomView[tuple[UnitStatus, ...]]("gates.participants")
    kernel_loaded = RoomView[bool]("custody.kernel_loaded")
    kernel_cmdline = RoomView[str]("custody.kernel_cmdline")
    reboot_strategy = RoomView[str]("custody.strategy.chosen")
    reboot_strategy_blocker = RoomView[str]("custody.strategy.blocker")
    observed_kernel_state = RoomView[str | None]("watchers.observed_kernel_state")
    kernel_state_text = RoomView[str]("watchers.kernel_state_text")

    @property
    def gate(self) -> Gate:
        return self.gates.gate

    # ------------------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        """Open the kernel, recover this boot's state and pick the starting phase.  Returns when
        the agent is ready to serve."""
        startup = Startup(self.state, self._kernel_thread, self.ledger, self._status)
        strategy, recovery = await startup.open_and_recover(
            self.config, self._open_kernel, self.gate
        )
        self.custody.strategy, self._recovery = strategy, recovery
        await self.submit(ph.Recovered(recovery.kernel_state, "; ".join(recovery.boot_notes)))
        self.fleet.resume()
        await self.watchers.watch_shutdown(self.gate)

    async def resume(self) -> None:
        """After a live-update boot, start restoring (once the D-Bus API is up: participants
        retrieve through it); a restarted agent whose restore gate had passed finishes."""
        if self.phase is ph.Phase.UPDATED and self.record is not None:
            log.info(
                "live_update_boot", update_id=self.record.id, boot_count=self.record.boot_count
            )
            finish = self._recovery.resume_with_finish
            self._recovery = replace(self._recovery, resume_with_finish=False)
            await self.submit(ph.Finish() if finish else ph.Restore())

    async def run(self) -> None:
        """Consume events until cancelled."""
        while True:
            event, ack = await self._queue.get()
            try:
                self._apply(event)
            except PhaseError as exc:
                if ack is None:
                    log.debug("stale_event_dropped", kind=type(event).__name__, phase=self.phase)
                elif not ack.done():
                    ack.set_exception(exc)
                continue
            except Exception as exc:  # a bug: never leave a caller hanging
                log.exception("event_failed", kind=type(event).__name__)
                if ack is not None and not ack.done():
                    ack.set_exception(exc)
                continue
            if ack is not None and not ack.done():
                # Answered after the phase's announcement (a D-Bus reply follows its signals).
                self.ledger.after_announced(functools.partial(_resolve, ack, ph.Step(self.phase)))

    async def stop(self) -> None:
        """Stopping the agent before the reboot aborts the update: closing the handle does it on
        v3 and session kernels; rfc-v2 keeps preserved files on close, so cancel explicitly."""
        self.ledger.announce_held()
        self._disarm()
        await self.gates.close()
        await self.watchers.close()
        await self.fleet.close()
        if self._work is not None:
            self._work.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._work
        with contextlib.suppress(Exception):
            await self.gates.settle()
        kernel, phase = self.state.kernel, self.phase
        if kernel is not None:
            if ph.is_pre_reboot(phase) and phase is not ph.Phase.REBOOTING:
                with contextlib.suppress(LuoError, OSError):
                    await self._kernel_thread.call(kernel.cancel)
                why = f"the agent was stopped in phase {phase}"
                if self.state.shutdown_queued:
                    why += f" ({self.state.shutdown_queued} was queued by someone else)"
                self.ledger.abort(why)
            with contextlib.suppress(LuoError, OSError):
                await self._kernel_thread.call(kernel.close)
        self.custody.close()
        self.ledger.close()
        self._kernel_thread.shutdown()

    # ----------------------------------------------------------------------------- requests

    async def submit(self, event: ph.Event) -> ph.Step:
        ack: asyncio.Future[ph.Step] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((event, ack))
        return await ack

    def _post(self, event: ph.Event) -> None:
        self._queue.put_nowait((event, None))

    async def prepare(self, update_id: str = "", caller: str = "") -> UpdateRecord:
        in_hand = self.ledger.in_hand(update_id)
        if in_hand is not None:
            return in_hand  # a retry of the Prepare that started it: the same answer
        record = self.ledger.begin(update_id, caller, self.abi, self.kernel_cmdline)
        try:
            await self.submit(ph.Prepare())
        except PhaseError:
            if self.state.record is record:
                self.state.record = None
            raise Busy(f"an update is in phase {self.phase}") from None
        # The update may have moved on (or ended) already; the caller needs its id.
        current = self.state.record
        return current if current is not None and current.id == record.id else record

    async def check(self) -> CheckReport:
        """Whether an update could start now, and what stands in the way."""
        blockers = [INHIBITED + who for who in await self._shutdown_inhibitors()]
        fd_store = None
        if self.custody.strategy.chosen == "systemd":
            try:
                fd_store = await self.gate.fd_store_fill()
            except (LuoError, OSError) as exc:
                log.warning("fd_store_unreadable", error=str(exc))
        report = self.custody.check(fd_store)
        if self.custody.strategy.chosen == "systemd" and fd_store is None:
            blockers.append("the agent's fd store could not be read: PID 1 may drop the sessions")
        if blockers:
            report = replace(report, ready=False, blockers=(*report.blockers, *blockers))
        return report

    async def _shutdown_inhibitors(self) -> list[str]:
        """Who holds a logind block inhibitor of shutdown (an fwupd-style update in flight).
        The agent's kexec does not go through logind, which lets root past them, and a refusal
        there would come after the freeze: the agent asks before it."""
        try:
            return await self.gate.shutdown_inhibitors()
        except (LuoError, OSError) as exc:
            log.warning("inhibitors_unreadable", error=str(exc))
            return []

    async def execute(self, update_id: str = "") -> None:
        self.ledger.require(update_id)
        self.custody.refuse_execute()
        inhibited = await self._shutdown_inhibitors()
        if inhibited:
            raise PhaseError(self.phase, "Execute while " + INHIBITED + "; ".join(inhibited))
        await self.submit(ph.Coordinate() if self.fleet.enabled else ph.Execute())

    async def cancel(self, update_id: str = "") -> None:
        self.ledger.require(update_id)
        await self.submit(ph.Cancel())

    async def finish(self, update_id: str = "") -> None:
        self.ledger.require(update_id)
        await self.submit(ph.Finish())

    async def restore(self, update_id: str = "") -> None:
        self.ledger.require(update_id)
        await self.submit(ph.Restore())

    async def load_kernel(self, kernel_fd: int, initrd_fd: int, cmdline: str) -> str:
        full = await self.custody.load_kernel(kernel_fd, initrd_fd, cmdline)
        if self.record is not None:
            self.state.record = replace(self.record, kernel_cmdline=full)
            self.ledger.save(self.state.record)
        return full

    # ---------------------------------------------------------------------------- the engine

    def _apply(self, event: ph.Event) -> None:
        self.ledger.announce_held()  # whatever happens next is announced after it
        step = ph.step(self.phase, event)
        previous = self.phase
        self._disarm()  # a timeout overtaken by this event is stale
        for effect in step.effects:
            if isinstance(effect, ph.ReportFailure):
                self._report_failure(effect)
        work = [e for e in step.effects if not isinstance(e, ph.ReportFailure)]
        # "preparing" is announced in the shadow of its gate's job, once systemd has queued it.
        hold = step.next is ph.Phase.PREPARING and any(isinstance(e, ph.StartTarget) for e in work)
        self._enter(step.next, previous, hold)
        if work:
            if self._work is not None and not self._work.done():
                self._work.cancel()
            self._work = asyncio.create_task(self._run_effects(work), name=f"effects-{step.next}")
        else:
            self.gates.at_rest()
        if step.arms_timer and (timed := ph.SPECS[step.next].step):
            self._timer = asyncio.get_running_loop().call_later(
                self.config.timeouts.seconds(timed), self._timer_expired, step.next
            )

    def _disarm(self) -> None:
        for pending in (self._timer, self._timeout_probe):
            if pending is not None:
                pending.cancel()
        self._timer = self._timeout_probe = None

    def _timer_expired(self, phase: ph.Phase) -> None:
        self._timer = None
        self._timeout_probe = asyncio.create_task(self._time_out(phase), name=f"timeout-{phase}")

    async def _time_out(self, phase: ph.Phase) -> None:
        await self.gates.probe_stuck(phase)
        self._post(ph.Timeout(phase))

    def _report_failure(self, failure: ph.ReportFailure) -> None:
        reason = failure.reason
        if failure.event == "Timeout":
            reason += self.gates.still_running()
        recorded: str | None = reason
        if failure.event == "Recovered":
            recovery = self._recovery
            self._recovery = replace(recovery, finishes_a_cancel=False, abort_reason="")
            if recovery.finishes_a_cancel:
                recorded = None  # ends as the dead agent's cancel would have ended it
            elif recovery.abort_reason:
                recorded = recovery.abort_reason
        self.ledger.record_failure(failure, reason, recorded)

    def _enter(self, new: ph.Phase, previous: ph.Phase, hold: bool) -> None:
        self.state.phase = new
        if self.record is not None and new is not previous:
            self.state.record = self.record.with_phase(new)
        self.ledger.publish(new, previous, hold=hold)
        if new is ph.Phase.RESTORED and self.config.auto_finish:
            self._post(ph.Finish())
        if new is ph.Phase.PREPARED:
            # A cancel by someone else during preparing may have coalesced into no change at all.
            self.watchers.check_kernel_state()

    # ------------------------------------------------------------------------------ effects

    async def _run_effects(self, effects: Sequence[ph.Effect]) -> None:
        outcome = await self._effects_outcome(effects)
        if outcome is not None:
            self._post(outcome)

    async def _effects_outcome(self, effects: Sequence[ph.Effect]) -> ph.Event | None:
        """Run ``effects`` in order until one ends the work with an event, its outcome.  After a
        KernelCancel the cancel target runs whatever the kernel said: both fold into one
        CancelDone or CancelFailed."""
        problems: list[str] | None = None  # the cancel's, once KernelCancel ran
        for effect in effects:
            outcome: ph.Event | None = None
            match effect:
                case ph.StartTarget(target_name=target):
                    outcome = await self.gates.run(target, queued=self.ledger.announce_held)
                case ph.KernelCancel():
                    problems = [await self.custody.cancel()]
                case ph.PreserveRegistered():
                    outcome = await self.custody.preserve_registered()
                case ph.PreserveMetadata():
                    outcome = await self.custody.preserve_metadata()
                case ph.KernelPrepare():
                    outcome = await self.custody.prepare()
                case ph.TakeSlot():
                    outcome = await self.fleet.take()
                case ph.KernelFreeze():
                    outcome = await self.custody.freeze()
                case ph.KernelReboot():
                    outcome = await self._reboot()
                case ph.KernelFinish():
                    outcome = await self.custody.finish()
                case ph.ReportFailure():
                    pass  # done when the step was applied (_report_failure)
                case _:
                    assert_never(effect)
            if problems is None:
                if outcome is not None:
                    return outcome
            elif isinstance(outcome, ph.GateFailed):
                problems.append(outcome.reason)
        if problems is None:
            return None
        if any(problems):
            return ph.CancelFailed("; ".join(p for p in problems if p))
        return ph.CancelDone()

    def _fleet_changed(self) -> None:
        for listener in self.listeners:
            notify = getattr(listener, "fleet_changed", None)  # optional in listeners
            if notify is not None:
                notify()

    async def _reboot(self) -> ph.Event | None:
        """The kexec; an outcome only if it failed."""
        blackout_started = self.gates.freeze_passed_at
        failed = await self.custody.reboot(self.gate, blackout_started, self.ledger.publish_reboot)
        if failed is None:
            self._on_rebooted()
        return failed


def _resolve(ack: asyncio.Future[ph.Step], step: ph.Step) -> None:
    if not ack.done():
        ack.set_result(step)
