"""The Agent: the one owner of the current phase.

Requests (from D-Bus) and outcomes (of gates, kernel work and timers) are events on one queue,
consumed by one task (``run``).  Each event goes through the pure engine (``phase.step``); the agent
then publishes the new phase and starts the step's effects as one *work* task that feeds its outcome
back as an event.  So the phase changes in one place only, and no lock is needed.

Kernel calls are synchronous ioctls: they run on one dedicated thread (``_kernel``), never on the
loop.  Gates are awaited through the ``Gate`` port (pystemd lives behind it on its own thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Final, Protocol, TypeVar

import structlog

from . import phase as ph
from .config import Config
from .errors import (
    Busy,
    DeviceBusy,
    InvalidArgument,
    KernelError,
    LuoError,
    PhaseError,
)
from .fdkind import check_preservable
from .kernel.backend import BootState, KernelBackend, PreserveItem
from .kernel.device import KernelState as KernelStateValue
from .persist import History, PersistError, RuntimeState
from .records import PreservedFd, UpdateRecord
from .registry import FdRegistry
from .systemd.gate import Gate, GateOutcome, UnitStatus

log = structlog.get_logger(__name__)

T = TypeVar("T")

UPDATE_ID_RE: Final = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
CMDLINE_MARKER: Final = "luo_agent.update="
# How long an expired phase timer may wait to learn which participants are stuck.
TIMEOUT_PROBE_SECONDS: Final = 5.0

# Rough progress of an update per phase, for the Progress property.
PROGRESS: Final[dict[ph.Phase, int]] = {
    ph.Phase.IDLE: 0,
    ph.Phase.PREPARING: 10,
    ph.Phase.PREPARED: 40,
    ph.Phase.FREEZING: 60,
    ph.Phase.REBOOTING: 80,
    ph.Phase.CANCELLING: 50,
    ph.Phase.UPDATED: 85,
    ph.Phase.RESTORING: 90,
    ph.Phase.RESTORED: 95,
    ph.Phase.FINISHING: 98,
}

# What a gate step is called in the runtime directory's active/ markers (the targets assert them).
MARKERS: Final[dict[ph.Phase, str]] = {
    ph.Phase.PREPARING: "prepare",
    ph.Phase.FREEZING: "freeze",
    ph.Phase.CANCELLING: "cancel",
    ph.Phase.RESTORING: "restore",
    ph.Phase.FINISHING: "finish",
}


class AgentListener(Protocol):
    """What the D-Bus layer (or a test) hears.  Called on the loop, must not block."""

    def phase_changed(self, record: UpdateRecord | None, phase: ph.Phase) -> None: ...

    def update_finished(self, record: UpdateRecord) -> None: ...


@dataclass(frozen=True, slots=True)
class LoadedKernel:
    """The agent's duplicates of the kexec image fds, and the command line without our marker."""

    kernel_fd: int
    initrd_fd: int
    base_cmdline: str


@dataclass(frozen=True, slots=True)
class CheckReport:
    ready: bool
    blockers: tuple[str, ...]
    warnings: tuple[str, ...]
    abi: str
    phase: str
    kernel_loaded: bool
    preserved: int


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
    ) -> None:
        self.config = config
        self._open_kernel = open_kernel
        self.gate = gate
        self.runtime = runtime
        self.history = history
        self._status = status
        self._on_rebooted = on_rebooted
        self.kernel: KernelBackend | None = None
        self.phase = ph.Phase.IDLE
        self.record: UpdateRecord | None = None
        self.last: UpdateRecord | None = None
        self.participants: tuple[UnitStatus, ...] = ()
        self.kernel_loaded = False
        self.kernel_cmdline = ""
        self._kexec: LoadedKernel | None = None
        self.listeners: list[AgentListener] = []
        self.registry = FdRegistry(
            check_fd=check_preservable,
            max_per_session=config.limits.max_fds_per_session,
            max_total=config.limits.max_fds_total,
        )
        self._timeouts = config.timeouts
        self._queue: asyncio.Queue[tuple[ph.Event, asyncio.Future[ph.Step] | None]] = (
            asyncio.Queue()
        )
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kernel")
        self._work: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        # Between a phase timer's expiry and its Timeout event: which participants still run.
        self._timeout_probe: asyncio.Task[None] | None = None
        self._stuck: tuple[UnitStatus, ...] = ()
        self._retrieved: dict[tuple[str, int], str] = {}
        self._freeze_gate_done = 0.0
        self.boot_notes: tuple[str, ...] = ()

    # ------------------------------------------------------------------------------ life cycle

    @property
    def abi(self) -> str:
        return str(self.kernel.abi) if self.kernel is not None else "none"

    async def start(self) -> None:
        """Open the kernel (retrying EBUSY with back-off), recover this boot's state and pick the
        starting phase.  Returns when the agent is ready to serve."""
        self.runtime.setup()
        self.runtime.set_active(())
        self.last = self._last_from_history()
        self.kernel = await self._open_with_backoff()
        boot = await self._in_kernel(self.kernel.start)
        self.boot_notes = boot.notes
        for note in boot.notes:
            log.warning("kernel_boot_note", note=note)
        previous = self._load_current()
        await self._recover(boot, previous)

    async def _open_with_backoff(self) -> KernelBackend:
        deadline = time.monotonic() + self.config.kernel.busy_retry_seconds
        delay = 0.05
        while True:
            try:
                return await self._in_kernel(self._open_kernel)
            except DeviceBusy as exc:
                if time.monotonic() + delay > deadline:
                    raise
                self._status(f"waiting for /dev/liveupdate: {exc}")
                log.info("kernel_busy_retry", delay=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _load_current(self) -> UpdateRecord | None:
        try:
            return self.runtime.load_current()
        except PersistError as exc:
            log.error("current_state_corrupt", error=str(exc))
            return None

    def _last_from_history(self) -> UpdateRecord | None:
        entries = self.history.load()
        for entry in reversed(entries):
            with contextlib.suppress(ValueError):
                return UpdateRecord.from_json(entry)
        return None

    async def _recover(self, boot: BootState, previous: UpdateRecord | None) -> None:
        assert self.kernel is not None
        if boot.incoming is not None:
            record = boot.incoming.with_phase(ph.Phase.UPDATED)
            self.record = replace(
                record, boot_count=record.boot_count + 1, kernel_cmdline=self._read_cmdline()
            )
            kernel_state = ph.KernelState.UPDATED
        elif boot.stale_prepared:
            kernel_state = ph.KernelState(str(boot.kernel_state))
            if previous is not None:
                self.kernel.adopt(previous)
            self.record = previous or UpdateRecord(id=_new_id(), abi=self.abi, started_by="unknown")
        else:
            kernel_state = ph.KernelState.NORMAL
            if previous is not None and previous.phase != ph.Phase.IDLE:
                # The update of a dead agent: the kernel dropped it when the handle closed.
                aborted = previous.ended(
                    "aborted",
                    "org.luoagent.LiveUpdate1.Error.Aborted",
                    f"the agent stopped in phase {previous.phase}; the kernel discarded the update",
                )
                self._finish_record(aborted)
            if boot.kernel_state is KernelStateValue.UPDATED:
                kernel_state = ph.KernelState.UPDATED
        await self.submit(ph.Recovered(kernel_state, "; ".join(boot.notes)))

    async def resume(self) -> None:
        """After a live-update boot, start restoring (once the D-Bus API is up: participants
        retrieve through it)."""
        if self.phase is ph.Phase.UPDATED and self.record is not None:
            log.info(
                "live_update_boot", update_id=self.record.id, boot_count=self.record.boot_count
            )
            await self.submit(ph.Restore())

    def _read_cmdline(self) -> str:
        assert self.kernel is not None
        path = getattr(self.kernel, "syscalls", None)
        target = path.path("/proc/cmdline") if path is not None else "/proc/cmdline"
        try:
            with open(target) as f:
                return f.read().strip()
        except OSError:
            return ""

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
                ack.set_result(ph.Step(self.phase))

    async def stop(self) -> None:
        """Stopping the agent before the reboot aborts the update: closing the handle does it on
        v3 and session kernels; rfc-v2 keeps preserved files on close, so cancel explicitly."""
        if self._timer is not None:
            self._timer.cancel()
        if self._timeout_probe is not None:
            self._timeout_probe.cancel()
        if self._work is not None:
            self._work.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._work
        if self.kernel is not None:
            if ph.is_pre_reboot(self.phase) and self.phase is not ph.Phase.REBOOTING:
                with contextlib.suppress(LuoError, OSError):
                    await self._in_kernel(self.kernel.cancel)
                if self.record is not None:
                    self._finish_record(
                        self.record.ended(
                            "aborted",
                            "org.luoagent.LiveUpdate1.Error.Aborted",
                            f"the agent was stopped in phase {self.phase}",
                        )
                    )
            with contextlib.suppress(LuoError, OSError):
                await self._in_kernel(self.kernel.close)
        self.registry.close_all()
        if self._kexec is not None:
            _close_fds(self._kexec.kernel_fd, self._kexec.initrd_fd)
        self._pool.shutdown(wait=True)

    # ----------------------------------------------------------------------------------- requests

    async def submit(self, event: ph.Event) -> ph.Step:
        ack: asyncio.Future[ph.Step] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((event, ack))
        return await ack

    def _post(self, event: ph.Event) -> None:
        self._queue.put_nowait((event, None))

    async def prepare(self, update_id: str = "", caller: str = "") -> UpdateRecord:
        if update_id and not UPDATE_ID_RE.match(update_id):
            raise InvalidArgument("an update id is 1-64 characters of [A-Za-z0-9_-]")
        if self.phase is not ph.Phase.IDLE:
            raise Busy(f"update {self.record.id if self.record else '?'} is in phase {self.phase}")
        if update_id and self.last is not None and self.last.id == update_id:
            raise InvalidArgument(f"update id {update_id!r} was already used")
        self.record = UpdateRecord(
            id=update_id or _new_id(),
            abi=self.abi,
            started_by=caller,
            kernel_cmdline=self.kernel_cmdline,
        )
        try:
            await self.submit(ph.Prepare())
        except PhaseError:
            raise Busy(f"an update is in phase {self.phase}") from None
        return self.record

    def _require_update(self, update_id: str) -> None:
        if update_id and (self.record is None or self.record.id != update_id):
            current = self.record.id if self.record else "none"
            raise InvalidArgument(f"no update {update_id!r} in progress (current: {current})")

    async def execute(self, update_id: str = "") -> None:
        self._require_update(update_id)
        if not self.kernel_loaded and self.phase is ph.Phase.PREPARED:
            raise PhaseError(self.phase, "Execute without a loaded kernel (LoadKernel first)")
        await self.submit(ph.Execute())

    async def cancel(self, update_id: str = "") -> None:
        self._require_update(update_id)
        await self.submit(ph.Cancel())

    async def finish(self, update_id: str = "") -> None:
        self._require_update(update_id)
        await self.submit(ph.Finish())

    async def restore(self, update_id: str = "") -> None:
        self._require_update(update_id)
        await self.submit(ph.Restore())

    async def load_kernel(self, kernel_fd: int, initrd_fd: int, cmdline: str) -> str:
        """kexec_file_load with the agent's command-line marker (``luo_agent.update=<id>``)
        appended.  Returns the command line the new kernel will see.  The agent keeps its own
        duplicates of the fds: if the kernel was loaded before the update had an id, prepare
        reloads it with the right marker (outside the blackout)."""
        if self.phase in (ph.Phase.FREEZING, ph.Phase.REBOOTING):
            raise PhaseError(self.phase, "LoadKernel")
        assert self.kernel is not None
        if len(cmdline) > 4096 or "\0" in cmdline:
            raise InvalidArgument("the command line must be under 4096 bytes without NUL")
        base = " ".join(w for w in cmdline.split() if not w.startswith(CMDLINE_MARKER))
        own = (os.dup(kernel_fd), os.dup(initrd_fd) if initrd_fd >= 0 else -1)
        full = _with_marker(base, self.record.id if self.record else "pending")
        try:
            await self._in_kernel(self.kernel.load_kernel, own[0], own[1], full)
        except BaseException:
            _close_fds(*own)
            raise
        if self._kexec is not None:
            _close_fds(self._kexec.kernel_fd, self._kexec.initrd_fd)
        self._kexec = LoadedKernel(own[0], own[1], base)
        self.kernel_loaded = True
        self.kernel_cmdline = full
        if self.record is not None:
            self.record = replace(self.record, kernel_cmdline=full)
            self._save(self.record)
        return full

    def preserve(
        self, fd: int, session: str, token: int, depends_on: Sequence[tuple[str, int]], owner: str
    ) -> None:
        """Hand an fd in: checked now, preserved in the kernel during prepare.  The agent takes
        its own duplicate; the caller keeps (and closes) its fd."""
        if self.phase not in (ph.Phase.IDLE, ph.Phase.PREPARING):
            raise PhaseError(self.phase, "Preserve (fds are handed in while idle or preparing)")
        sessions = self.registry.sessions()
        if session not in sessions and len(sessions) >= self.config.limits.max_sessions:
            raise InvalidArgument(f"too many sessions ({self.config.limits.max_sessions})")
        own = os.dup(fd)
        try:
            self.registry.add(session, token, own, owner=owner, depends_on=tuple(depends_on))
        except BaseException:
            os.close(own)
            raise

    def unpreserve(self, session: str, token: int) -> None:
        if self.phase not in (ph.Phase.IDLE, ph.Phase.PREPARING):
            raise PhaseError(self.phase, "Unpreserve")
        self.registry.remove(session, token)

    async def retrieve(self, session: str, token: int, caller: str = "") -> int:
        if self.phase not in (ph.Phase.UPDATED, ph.Phase.RESTORING, ph.Phase.RESTORED):
            raise PhaseError(self.phase, "Retrieve (only after a live-update boot)")
        assert self.kernel is not None
        fd = await self._in_kernel(self.kernel.retrieve, session, token)
        self._retrieved[(session, token)] = caller
        log.info("fd_retrieved", session=session, token=token, caller=caller)
        return fd

    def check(self) -> CheckReport:
        blockers: list[str] = []
        if self.kernel is None:
            blockers.append("no LUO kernel interface")
        if self.phase is not ph.Phase.IDLE:
            blockers.append(f"an update is in phase {self.phase}")
        if not self.kernel_loaded:
            blockers.append("no kernel loaded for kexec (LoadKernel)")
        warnings: list[str] = []
        if self.kernel_loaded and not _enables_liveupdate(self.kernel_cmdline):
            warnings.append(
                "the loaded kernel's command line has no liveupdate=1: LUO (and so restore) "
                "would be disabled after the kexec unless the kernel enables it by default"
            )
        return CheckReport(
            ready=not blockers,
            blockers=tuple(blockers),
            warnings=tuple(warnings),
            abi=self.abi,
            phase=str(self.phase),
            kernel_loaded=self.kernel_loaded,
            preserved=len(self.registry),
        )

    def sessions(self) -> list[tuple[str, int, str, str]]:
        """(session, token, owner, state) of every fd the agent knows in this boot."""
        if self.phase in ph.POST_REBOOT_PHASES and self.record is not None:
            return [
                (
                    p.session,
                    p.token,
                    p.owner,
                    "retrieved" if (p.session, p.token) in self._retrieved else "carried",
                )
                for p in self.record.preserved
            ]
        state = (
            "preserved"
            if self.phase in (ph.Phase.PREPARED, ph.Phase.FREEZING, ph.Phase.REBOOTING)
            else "registered"
        )
        return [(e.session, e.token, e.owner, state) for e in self.registry]

    def owner_of(self, session: str, token: int) -> str:
        if self.record is not None:
            for p in self.record.preserved:
                if (p.session, p.token) == (session, token):
                    return p.owner
        return ""

    @property
    def kernel_state_text(self) -> str:
        if self.kernel is None:
            return "unavailable"
        try:
            return self.kernel.describe_state()
        except (LuoError, OSError) as exc:
            return f"unknown ({exc})"

    @property
    def progress(self) -> int:
        return PROGRESS.get(self.phase, 0)

    # ---------------------------------------------------------------------------- the engine

    def _apply(self, event: ph.Event) -> None:
        step = ph.step(self.phase, event)
        previous = self.phase
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._timeout_probe is not None:  # a timeout overtaken by this event is stale
            self._timeout_probe.cancel()
            self._timeout_probe = None
        for effect in step.effects:
            if isinstance(effect, ph.ReportFailure):
                self._report_failure(effect)
        self._enter(step.next, previous)
        work = [e for e in step.effects if not isinstance(e, ph.ReportFailure)]
        if work:
            if self._work is not None and not self._work.done():
                self._work.cancel()
            self._work = asyncio.create_task(
                self._run_effects(step.next, work), name=f"effects-{step.next}"
            )
        if step.arms_timer and (seconds := self._timeouts.timeout_for(step.next)) is not None:
            self._timer = asyncio.get_running_loop().call_later(
                seconds, self._timer_expired, step.next
            )

    def _timer_expired(self, phase: ph.Phase) -> None:
        self._timer = None
        self._timeout_probe = asyncio.create_task(self._time_out(phase), name=f"timeout-{phase}")

    async def _time_out(self, phase: ph.Phase) -> None:
        """Post Timeout(phase), after learning which participants of the phase's gate are still
        running: cancelling the gate stops them, and the failure must name them."""
        self._stuck = ()
        target = ph.PHASE_TARGETS.get(phase)
        if target is not None:
            try:
                async with asyncio.timeout(TIMEOUT_PROBE_SECONDS):
                    statuses = await self.gate.unit_statuses(target)
                self._stuck = tuple(s for s in statuses if s.is_failure)
            except Exception as exc:  # the timeout must be posted whatever the probe does
                log.warning("timeout_probe_failed", target=target, error=str(exc))
        self._post(ph.Timeout(phase))

    def _enter(self, new: ph.Phase, previous: ph.Phase) -> None:
        self.phase = new
        if self.record is not None and new is not previous:
            self.record = self.record.with_phase(new)
        marker = MARKERS.get(new)
        try:
            self.runtime.set_active([marker] if marker else [])
            self.runtime.publish_phase(new)
        except PersistError as exc:
            log.error("runtime_state_unwritable", error=str(exc))
        if new is ph.Phase.IDLE and self.record is not None:
            self._end_update(previous)
        else:
            self._save(self.record)
        if new is ph.Phase.RESTORED and self.config.auto_finish:
            self._post(ph.Finish())
        if new is not previous:
            update_id = self.record.id if self.record else ""
            log.info("phase_changed", phase=str(new), previous=str(previous), update_id=update_id)
            self._status(f"phase: {new}" + (f" (update {update_id})" if update_id else ""))
            for listener in self.listeners:
                listener.phase_changed(self.record, new)

    def _end_update(self, previous: ph.Phase) -> None:
        assert self.record is not None
        record = self.record
        if previous is ph.Phase.CANCELLING:
            if record.result in ("failed", "aborted"):
                record = record.ended(record.result, record.error_name, record.message)
            else:
                record = record.ended(
                    "cancelled",
                    "org.luoagent.LiveUpdate1.Error.Cancelled",
                    record.message or "cancelled",
                )
        elif previous is ph.Phase.FINISHING:
            record = record.ended("success")
        else:
            record = record.ended(record.result or "success")
        self.record = None
        self.registry.close_all()
        self._retrieved.clear()
        self._save(None)
        self._finish_record(record)

    def _finish_record(self, record: UpdateRecord) -> None:
        self.last = record
        try:
            self.history.append(record)
        except PersistError as exc:
            log.error("history_unwritable", error=str(exc), update_id=record.id)
        log.info(
            "update_finished",
            update_id=record.id,
            result=record.result,
            error=record.error_name,
            message=record.message,
        )
        for listener in self.listeners:
            listener.update_finished(record)

    def _save(self, record: UpdateRecord | None) -> None:
        try:
            self.runtime.save_current(record)
        except PersistError as exc:
            log.error("runtime_state_unwritable", error=str(exc))

    def _report_failure(self, failure: ph.ReportFailure) -> None:
        reason = failure.reason
        if failure.event == "Timeout" and self._stuck:
            reason += "; still running: " + _describe_units(self._stuck)
            self.participants, self._stuck = self._stuck, ()
        log.warning(
            "phase_failed",
            phase=str(failure.phase),
            cause=failure.event,
            reason=reason,
            update_id=self.record.id if self.record else "",
        )
        if self.record is None:
            return
        name = {
            "GateFailed": "ParticipantFailed",
            "Timeout": "TimedOut",
            "Recovered": "Aborted",
        }.get(failure.event, "KernelError")
        self.record = replace(
            self.record,
            # Found prepared at start-up: the update of an agent that died.
            result="aborted" if failure.event == "Recovered" else "failed",
            error_name=f"org.luoagent.LiveUpdate1.Error.{name}",
            message=reason,
        )

    # --------------------------------------------------------------------------------- effects

    async def _in_kernel(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _run_effects(self, phase: ph.Phase, effects: Sequence[ph.Effect]) -> None:
        outcome = await self._effects_outcome(phase, effects)
        if outcome is not None:
            self._post(outcome)

    async def _effects_outcome(
        self, phase: ph.Phase, effects: Sequence[ph.Effect]
    ) -> ph.Event | None:
        kinds = {type(e) for e in effects}
        target = next((e.target_name for e in effects if isinstance(e, ph.StartTarget)), "")
        if ph.KernelCancel in kinds:
            return await self._cancel(target)
        if ph.PreserveRegistered in kinds:
            return await self._preserve_and_prepare()
        if ph.KernelFreeze in kinds:
            return await self._kernel_step(self._freeze, ph.FreezeDone(), ph.FreezeFailed)
        if ph.KernelReboot in kinds:
            return await self._reboot()
        if ph.KernelFinish in kinds:
            return await self._kernel_step(self._finish_kernel, ph.FinishDone(), ph.FinishFailed)
        if target:
            return await self._gate(target)
        log.error("unknown_effects", effects=[type(e).__name__ for e in effects])
        return None

    async def _gate(self, target: str) -> ph.Event:
        try:
            outcome = await self.gate.run_target(target)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                self.participants = await asyncio.shield(self.gate.unit_statuses(target))
            raise
        except LuoError as exc:
            return ph.GateFailed(target, str(exc))
        if target == ph.PHASE_TARGETS[ph.Phase.FREEZING] and outcome.ok:
            # The blackout-critical path starts here: nothing slow until the kexec.
            self._freeze_gate_done = time.monotonic()
            return ph.GateOk(target)
        self.participants = outcome.culprits or await self._statuses(target)
        with contextlib.suppress(LuoError):
            await self.gate.stop_unit(target)  # so the next update runs the participants again
        if outcome.ok:
            return ph.GateOk(target)
        return ph.GateFailed(target, _describe_gate(outcome))

    async def _statuses(self, target: str) -> tuple[UnitStatus, ...]:
        try:
            return await self.gate.unit_statuses(target)
        except LuoError:
            return ()

    async def _kernel_step(
        self, fn: Callable[[], None], ok: ph.Event, failed: Callable[[str], ph.Event]
    ) -> ph.Event:
        try:
            await self._in_kernel(fn)
        except (LuoError, OSError) as exc:
            return failed(str(exc))
        return ok

    async def _preserve_and_prepare(self) -> ph.Event:
        assert self.kernel is not None and self.record is not None
        entries = self.registry.preservation_order()
        record = self.record
        kernel = self.kernel
        reload = (
            self._kexec
            if self.kernel_cmdline
            != _with_marker(self._kexec.base_cmdline if self._kexec else "", record.id)
            else None
        )

        def in_kernel() -> tuple[PreservedFd, ...]:
            if reload is not None:
                kernel.load_kernel(
                    reload.kernel_fd, reload.initrd_fd, _with_marker(reload.base_cmdline, record.id)
                )
            items = [PreserveItem(e.session, e.token, e.fd) for e in entries]
            tokens = kernel.preserve(items, record)
            preserved = tuple(
                PreservedFd(e.session, e.token, e.owner, tokens[(e.session, e.token)], e.depends_on)
                for e in entries
            )
            # Every kernel token is known now (rfc-v2 makes its own): rewrite the metadata.
            kernel.update_metadata(replace(record, preserved=preserved))
            kernel.prepare()
            return preserved

        try:
            preserved = await self._in_kernel(in_kernel)
        except (LuoError, OSError) as exc:
            return ph.PreparationFailed(str(exc))
        if reload is not None:
            self.kernel_cmdline = _with_marker(reload.base_cmdline, record.id)
        if self.record is not None:
            self.record = replace(
                self.record, preserved=preserved, kernel_cmdline=self.kernel_cmdline
            )
        return ph.PreparationDone()

    def _freeze(self) -> None:
        assert self.kernel is not None and self.record is not None
        self.kernel.freeze()

    async def _reboot(self) -> ph.Event | None:
        assert self.kernel is not None and self.record is not None
        record = replace(self.record.with_phase(ph.Phase.REBOOTING))
        started = time.monotonic()
        try:
            await self._in_kernel(self._reboot_blocking, record)
        except (LuoError, OSError) as exc:
            log.error("kexec_failed", error=str(exc), update_id=record.id)
            if self.abi == "rfc-v2":
                return ph.RebootFailedAfterFreeze(str(exc))
            return ph.RebootFailed(str(exc))
        log.info("kexec_issued", update_id=record.id, seconds=round(time.monotonic() - started, 6))
        self._on_rebooted()
        return None

    def _reboot_blocking(self, record: UpdateRecord) -> None:
        assert self.kernel is not None
        # O(1) before the jump: one pwrite of the small metadata, then the syscall.
        blackout = time.monotonic() - self._freeze_gate_done
        self.kernel.update_metadata(replace(record, blackout_critical=blackout))
        self.kernel.reboot()

    async def _cancel(self, target: str) -> ph.Event:
        problems: list[str] = []
        assert self.kernel is not None
        try:
            await self._in_kernel(self.kernel.cancel)
        except (LuoError, OSError) as exc:
            problems.append(f"kernel cancel: {exc}")
        self.registry.close_all()
        if target:
            outcome = await self._gate(target)
            if isinstance(outcome, ph.GateFailed):
                problems.append(outcome.reason)
        if problems:
            return ph.CancelFailed("; ".join(problems))
        return ph.CancelDone()

    def _finish_kernel(self) -> None:
        assert self.kernel is not None
        problems = self.kernel.finish()
        if problems:
            raise KernelError("finish", 16, "; ".join(problems))


def _describe_gate(outcome: GateOutcome) -> str:
    if not outcome.culprits:
        return f"{outcome.target} job ended {outcome.job_result}"
    return f"{outcome.target} job ended {outcome.job_result}: {_describe_units(outcome.culprits)}"


def _describe_units(units: Sequence[UnitStatus]) -> str:
    return ", ".join(f"{u.unit} ({u.active_state}/{u.sub_state}, result {u.result})" for u in units)


def _enables_liveupdate(cmdline: str) -> bool:
    values = [w.split("=", 1)[1] for w in cmdline.split() if w.startswith("liveupdate=")]
    return bool(values) and values[-1].lower() in ("1", "y", "yes", "on", "true")


def _with_marker(cmdline: str, update_id: str) -> str:
    return f"{cmdline} {CMDLINE_MARKER}{update_id}".strip()


def _close_fds(*fds: int) -> None:
    for fd in fds:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


def _new_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


async def wait_for(awaitable: Awaitable[T], seconds: float) -> T:
    async with asyncio.timeout(seconds):
        return await awaitable
