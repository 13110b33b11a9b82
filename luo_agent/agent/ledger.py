"""The update's record and its publication: the runtime directory (state file, active/ marker,
current.json), the durable history and in-flight record, ``STATUS=``, the log and the listeners.

The order is the contract: a phase is saved before it is announced, the history entry is written
before current.json and in-flight.json are removed (``docs/reliability.md``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Final

import structlog

from .. import phase as ph
from ..errors import Busy, ErrorCode, InvalidArgument, UpdateEnded
from ..persist import History, PersistError, RuntimeState
from ..records import UpdateRecord
from .state import UPDATE_ID_RE, AgentListener, AgentState, new_update_id

log = structlog.get_logger("luo_agent.agent")

# How many unconfirmed fds a finished-with-losses record names (the rest are counted).
MAX_NAMED_FDS: Final = 20
# How long a held announcement waits for systemd to queue its gate's job: the request that
# entered the phase is answered after the announcement, and must not wait on a slow PID 1.
HOLD_LIMIT_SECONDS: Final = 0.1
# Where the durable in-flight record is rewritten off the caller's path (at freezing it is written
# before the freeze gate): once prepared, and once restoring in the live-update boot, so that a
# boot that lost the update can tell when (docs/reliability.md).
IN_FLIGHT_PHASES: Final = (ph.Phase.PREPARED, ph.Phase.RESTORING)
# The record's error for each failure event of the engine (any other: a kernel error).
FAILURE_CODES: Final = {
    "GateFailed": ErrorCode.PARTICIPANT_FAILED,
    "Timeout": ErrorCode.TIMED_OUT,
    "Recovered": ErrorCode.ABORTED,
    "SlotRefused": ErrorCode.COORDINATOR_ERROR,
}


class Ledger:
    def __init__(
        self,
        state: AgentState,
        runtime: RuntimeState,
        history: History,
        listeners: Sequence[AgentListener],
        status: Callable[[str], object],
        release: Callable[[], None],
    ) -> None:
        self._state = state
        self._release = release  # lets go of the fds of an update that ended
        self.runtime = runtime
        self.history = history
        self._listeners = listeners
        self._status = status
        # What the runtime directory shows, so a step that keeps the phase rewrites nothing.
        self._published_phase: ph.Phase | None = None
        self._saved_record: UpdateRecord | None = None
        # The phase before "rebooting", published only once the reboot call returns.
        self._unpublished_reboot: ph.Phase | None = None
        # A phase saved but announced only once its gate's job is queued (in the job's shadow),
        # and what waits for that announcement (the request that entered the phase is answered
        # after it).
        self._held: tuple[ph.Phase, ph.Phase] | None = None
        self._after_held: list[Callable[[], None]] = []
        self._hold_limit: asyncio.TimerHandle | None = None
        # The durable in-flight record at "prepared" is written on this thread, right after the
        # announcement; every other use of in-flight.json waits for it first.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="in-flight")
        self._in_flight_write: Future[None] | None = None

    # ------------------------------------------------------------------------------ start-up

    def load_current(self) -> UpdateRecord | None:
        try:
            return self.runtime.load_current()
        except PersistError as exc:
            log.error("current_state_corrupt", error=str(exc))
            return None

    def last_from_history(self) -> UpdateRecord | None:
        for entry in reversed(self.history.load()):
            with contextlib.suppress(ValueError):
                return UpdateRecord.from_json(entry)
        return None

    # ------------------------------------------------------------------------------ requests

    def in_hand(self, update_id: str) -> UpdateRecord | None:
        """The update in hand if ``update_id`` names it: a Prepare naming it again (a retry)
        answers with it instead of starting another."""
        current = self._state.record
        return current if update_id and current is not None and current.id == update_id else None

    def begin(self, update_id: str, caller: str, abi: str, kernel_cmdline: str) -> UpdateRecord:
        """A Prepare's record: the update in hand from now on (its event still to be applied)."""
        if update_id and not UPDATE_ID_RE.match(update_id):
            raise InvalidArgument("an update id is 1-64 characters of [A-Za-z0-9_-]")
        if update_id:
            # An id names one update for ever: an ended one is refused with what it ended with.
            ended = self.history.outcome(update_id)
            last = self._state.last
            if ended is None and last is not None and last.id == update_id:
                ended = last.to_json()  # recorded, though its history entry could not be written
            if ended is not None:
                raise UpdateEnded(
                    update_id,
                    str(ended.get("result", "")),
                    str(ended.get("error_name", "")),
                    str(ended.get("message", "")),
                )
        current, phase = self._state.record, self._state.phase
        # A record while idle is another Prepare whose event is still queued: it has won.
        if phase is not ph.Phase.IDLE or current is not None:
            raise Busy(f"update {current.id if current else '?'} is in phase {phase}")
        record = UpdateRecord(
            id=update_id or new_update_id(),
            abi=abi,
            started_by=caller,
            kernel_cmdline=kernel_cmdline,
        )
        self._state.record = record
        return record

    def require(self, update_id: str) -> None:
        """A request naming an update (``""``: whichever is in hand) names the one in hand."""
        current = self._state.record
        if update_id and (current is None or current.id != update_id):
            name = current.id if current else "none"
            raise InvalidArgument(f"no update {update_id!r} in progress (current: {name})")

    # --------------------------------------------------------------------------- a new phase

    def publish(self, new: ph.Phase, previous: ph.Phase, *, hold: bool = False) -> None:
        """Save the phase just entered, then announce it (``hold``: once ``announce_held`` is
        called).  Entering idle with an update in hand ends it (its fds let go, its record into
        the history, then current.json removed)."""
        if new is ph.Phase.REBOOTING:
            # The blackout-critical path (freeze → metadata pwrite → reboot) carries no file
            # writes, logging or signals: "rebooting" is published when the reboot call returns
            # (with a real kernel it returns only on failure).
            self._unpublished_reboot = previous
            return
        self._publish(new, previous, hold)

    def announce_held(self) -> None:
        """Announce the held phase, if any (before anything else happens to the update, so the
        phases are announced in order), then run what waited for it."""
        held, self._held = self._held, None
        if self._hold_limit is not None:
            self._hold_limit.cancel()
            self._hold_limit = None
        if held is not None:
            self._announce(*held)
        waiting, self._after_held = self._after_held, []
        for run in waiting:
            run()

    def after_announced(self, run: Callable[[], None]) -> None:
        """Run ``run`` now, or once the held phase is announced."""
        if self._held is None:
            run()
        else:
            self._after_held.append(run)

    def publish_reboot(self) -> None:
        previous, self._unpublished_reboot = self._unpublished_reboot, None
        if previous is not None and self._state.phase is ph.Phase.REBOOTING:
            self._publish(ph.Phase.REBOOTING, previous)

    def _publish(self, new: ph.Phase, previous: ph.Phase, hold: bool = False) -> None:
        ended = self._save_phase(new, previous)
        if ended is not None:
            self._release()
            # The history entry first, then current.json: a crash between the two leaves a
            # current.json whose id the history has, which start-up ignores; the other order
            # lost the update.
            self.finish_record(ended)
            self.save(None)
        if hold and new is not previous:
            self._held = (new, previous)
            self._hold_limit = asyncio.get_running_loop().call_later(
                HOLD_LIMIT_SECONDS, self.announce_held
            )
        else:
            self._announce(new, previous)
        if new in IN_FLIGHT_PHASES and new is not previous:
            self._start_in_flight_write()  # after the signals: its thread would contend for the GIL

    def _save_phase(self, new: ph.Phase, previous: ph.Phase) -> UpdateRecord | None:
        """Make ``new`` durable before anything announces it: the state file and marker, then
        current.json (and in-flight.json at freezing); the record of an update it ends."""
        marker = ph.SPECS[new].step
        if new is not self._published_phase:
            try:
                self.runtime.set_active([marker] if marker else [])
                self.runtime.publish_phase(new)
                self._published_phase = new
            except PersistError as exc:
                log.error("runtime_state_unwritable", error=str(exc))
        record = self._state.record
        if new is ph.Phase.IDLE and record is not None:
            self._state.record = None
            return self._ended(record, previous)
        self.save(record)
        if new is ph.Phase.FREEZING and new is not previous:
            self._save_in_flight()  # before the freeze gate: the kexec follows it
        return None

    def _announce(self, new: ph.Phase, previous: ph.Phase) -> None:
        if new is previous:
            return
        update_id = self._state.update_id
        # The listeners (D-Bus signals, written at once) before the log line and STATUS=.
        for listener in self._listeners:
            listener.phase_changed(self._state.record, new)
        log.info("phase_changed", phase=str(new), previous=str(previous), update_id=update_id)
        self._status(f"phase: {new}" + (f" (update {update_id})" if update_id else ""))

    def save(self, record: UpdateRecord | None) -> None:
        if record is not None and record is self._saved_record:
            return  # written already (a step that kept the phase and the record)
        try:
            self.runtime.save_current(record)
            self._saved_record = record
        except PersistError as exc:
            log.error("runtime_state_unwritable", error=str(exc))

    def _save_in_flight(self) -> None:
        """Keep the prepared update in the state directory (durable, outside the blackout): a
        boot that comes up without its handover can still record it as lost."""
        self._wait_in_flight()
        if self._state.record is not None:
            self._write_in_flight(self._state.record)

    def _start_in_flight_write(self) -> None:
        """The same at "prepared", on the writer thread, once the phase is announced: its fsyncs
        (1-2 ms, more on a busy disk) no longer delay the announcement."""
        self._wait_in_flight()
        if self._state.record is not None:
            self._in_flight_write = self._writer.submit(self._write_in_flight, self._state.record)

    def _write_in_flight(self, record: UpdateRecord) -> None:
        try:
            self.history.save_in_flight(record)
        except PersistError as exc:
            log.error("in_flight_unwritable", error=str(exc), update_id=record.id)

    def _wait_in_flight(self) -> None:
        pending, self._in_flight_write = self._in_flight_write, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """The agent stops: what is held is announced, the in-flight write finished."""
        self.announce_held()
        self._wait_in_flight()
        self._writer.shutdown(wait=True)

    # ---------------------------------------------------------------------------- outcomes

    def record_failure(self, failure: ph.ReportFailure, reason: str, recorded: str | None) -> None:
        """Log a failed phase and write it into the record, with ``recorded`` as its message
        (``None``: the failure is logged only)."""
        log.warning(
            "phase_failed",
            phase=str(failure.phase),
            cause=failure.event,
            reason=reason,
            update_id=self._state.update_id,
        )
        if self._state.record is None or recorded is None:
            return
        if self._state.shutdown_queued:
            # The machine is going down around the update: the likely cause, said once.
            recorded += f" ({self._state.shutdown_queued} was queued by someone else)"
        self._state.record = replace(
            self._state.record,
            # Found prepared at start-up: the update of an agent that died.
            result="aborted" if failure.event == "Recovered" else "failed",
            error_name=FAILURE_CODES.get(failure.event, ErrorCode.KERNEL_ERROR),
            message=recorded,
        )

    def abort(self, why: str) -> None:
        """The update in hand is over without its phases' say (the agent stops)."""
        if self._state.record is not None:
            self.finish_record(self._state.record.ended("aborted", ErrorCode.ABORTED, why))

    def _ended(self, record: UpdateRecord, previous: ph.Phase) -> UpdateRecord:
        if previous is ph.Phase.CANCELLING:
            if record.result in ("failed", "aborted"):
                return record.ended(record.result, record.error_name, record.message)
            return record.ended("cancelled", ErrorCode.CANCELLED, record.message or "cancelled")
        if previous is ph.Phase.FINISHING:
            return finished(record)
        return record.ended(record.result or "success")

    def finish_record(self, record: UpdateRecord) -> None:
        self._state.last = record
        try:
            self.history.append(record)
        except PersistError as exc:
            log.error("history_unwritable", error=str(exc), update_id=record.id)
        try:
            # After the entry: a crash between the two leaves an in-flight record whose id the
            # history has, which start-up removes.  Removed even if the entry could not be
            # written: the update is over, and a later boot must not call it lost.
            self._wait_in_flight()
            self.history.clear_in_flight()
        except PersistError as exc:
            log.error("in_flight_unremovable", error=str(exc), update_id=record.id)
        log.info(
            "update_finished",
            update_id=record.id,
            result=record.result,
            error=record.error_name,
            message=record.message,
        )
        for listener in self._listeners:
            listener.update_finished(record)


def finished(record: UpdateRecord) -> UpdateRecord:
    """The outcome of a kernel finish: success only if every participant confirmed its restore
    (the restore gate passed); otherwise the kernel discarded whatever was not retrieved, and the
    record names the failure and the unconfirmed fds."""
    if any(t.phase == ph.Phase.RESTORED for t in record.timings):
        return record.ended("success")
    why = record.message if record.result == "failed" else "the restore gate did not pass"
    fds = [f"{p.session}/{p.token} (owner {p.owner or '?'})" for p in record.preserved]
    listed = ", ".join(fds[:MAX_NAMED_FDS])
    if len(fds) > MAX_NAMED_FDS:
        listed += f" and {len(fds) - MAX_NAMED_FDS} more"
    return record.ended(
        "finished-with-losses",
        ErrorCode.FINISHED_WITH_LOSSES,
        f"finished without every participant confirming its restore ({why}); the kernel "
        f"discarded whatever was not retrieved of: {listed or 'no fds'}",
    )
