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
import errno
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
    Unsupported,
)
from .fdkind import check_preservable
from .kernel.backend import BootState, KernelBackend, PreserveItem
from .kernel.device import KernelState as KernelStateValue
from .kexec_handover import (
    SYSTEMD_CARRIES_FD_STORES,
    direct_strategy_warning,
    hand_over_to_pid1,
    missing_kexec_image,
    systemd_major,
)
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
# The first systemd whose PID 1 carries fd stores (with LUO session fds) through a kexec.

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

# The kernel states (sysfs ``state`` values) the agent's own work moves the kernel to in each phase,
# allowing for a watcher that reports a step late; a change to anything else was made by someone
# else (on rfc-v2 any process may open the device and send events).
OWN_KERNEL_STATES: Final[dict[ph.Phase, frozenset[str]]] = {
    ph.Phase.IDLE: frozenset({"normal"}),
    ph.Phase.PREPARING: frozenset({"prepared"}),
    ph.Phase.PREPARED: frozenset({"prepared"}),
    ph.Phase.FREEZING: frozenset({"prepared", "frozen"}),
    ph.Phase.REBOOTING: frozenset({"prepared", "frozen"}),
    ph.Phase.CANCELLING: frozenset({"normal", "prepared", "frozen"}),
    ph.Phase.UPDATED: frozenset({"updated"}),
    ph.Phase.RESTORING: frozenset({"updated"}),
    ph.Phase.RESTORED: frozenset({"updated"}),
    ph.Phase.FINISHING: frozenset({"normal"}),
}
# Phases in which the agent holds a prepared kernel: a NORMAL kernel there means the update is gone.
HOLDS_PREPARED_KERNEL: Final = frozenset({ph.Phase.PREPARED, ph.Phase.FREEZING})
# How many unconfirmed fds a finished-with-losses record names (the rest are counted).
MAX_NAMED_FDS: Final = 20


class AgentListener(Protocol):
    """What the D-Bus layer (or a test) hears.  Called on the loop, must not block."""

    def phase_changed(self, record: UpdateRecord | None, phase: ph.Phase) -> None: ...

    def update_finished(self, record: UpdateRecord) -> None: ...

    def kernel_state_changed(self, value: str) -> None:
        """The kernel's state file (sysfs ``state``) now reads ``value``."""
        ...

    # Optional (looked up with getattr, so a listener may leave it out):
    # ``participants_changed() -> None`` — ``Agent.participants`` was read anew after a gate.


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
        # The agent's own copy of every fd handed out after the reboot, until the update ends: a
        # Retrieve again (a participant that died after its first one) gets a duplicate of it,
        # since rfc-v2 and v3 restore a token only once.
        self._held: dict[tuple[str, int], int] = {}
        self._freeze_gate_done = 0.0
        # What the runtime directory shows, so a step that keeps the phase rewrites nothing; and
        # the phase before "rebooting", published only once the reboot call returns.
        self._published_phase: ph.Phase | None = None
        self._saved_record: UpdateRecord | None = None
        self._unpublished_reboot: ph.Phase | None = None
        self._target_stops: list[asyncio.Task[None]] = []
        self._participants_refresh: asyncio.Task[None] | None = None
        self._unread_participants = ""  # the passed gate whose participants are still to read
        self._unstopped: list[str] = []
        self.boot_notes: tuple[str, ...] = ()
        # The last value of the kernel's state file (daemon's sysfs watcher); None if unwatched.
        self.observed_kernel_state: str | None = None
        self._state_check: asyncio.Task[None] | None = None
        # Set by recovery: why the update of a dead agent is aborted (the failure's message), and
        # whether a restarted agent goes on with Finish (the restore gate had passed) or Restore.
        self._abort_reason = ""
        self._resume_with_finish = False
        # Set by recovery when the dead agent was cancelling: the cancel is finished, not aborted.
        self._resume_cancel = False
        self._shutdown_watch: asyncio.Task[None] | None = None
        # The reboot strategy in effect ("auto" resolved at start) and, for an explicit
        # "systemd" that cannot work here, why (a Check() blocker; Execute is refused).
        self.reboot_strategy = "direct"
        self.reboot_strategy_blocker = ""
        self.reboot_strategy_warning = ""

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
        deadline = time.monotonic() + self.config.kernel.busy_retry_seconds
        kernel = self.kernel = await self._busy_backoff(self._open_kernel, deadline)
        # The session ABI opens the device only here: EBUSY is retried on the same backend (it
        # may already hold sessions adopted from the fd store).
        boot = await self._busy_backoff(kernel.start, deadline)
        self.boot_notes = boot.notes
        for note in boot.notes:
            log.warning("kernel_boot_note", note=note)
        version = "" if self.config.systemd_user_mode else await self._manager_version()
        self._choose_reboot_strategy(version)
        self.reboot_strategy_warning = direct_strategy_warning(
            version, self.reboot_strategy, self.config.systemd_user_mode
        )
        previous = self._load_current()
        await self._recover(boot, previous)
        await self._watch_shutdown()

    async def _manager_version(self) -> str:
        """PID 1's version, asked once at start-up ("" if it cannot be read)."""
        try:
            return await self.gate.manager_version()
        except (LuoError, OSError) as exc:
            log.warning("systemd_version_unknown", error=str(exc))
            return ""

    def _choose_reboot_strategy(self, version: str) -> None:
        """Resolve ``reboot_strategy`` (config.py): "auto" takes "systemd" only where it works;
        an explicit "systemd" that cannot work is reported, never replaced by "direct"."""
        wanted = self.config.reboot_strategy
        if wanted == "direct":
            return
        missing = self._systemd_kexec_missing(version)
        if wanted == "auto":
            self.reboot_strategy = "direct" if missing else "systemd"
        else:
            self.reboot_strategy, self.reboot_strategy_blocker = "systemd", missing
        log.info("reboot_strategy", configured=wanted, chosen=self.reboot_strategy, unmet=missing)

    def _systemd_kexec_missing(self, version: str) -> str:
        """Why PID 1 cannot carry this agent's update through an orderly kexec ("" if it can)."""
        if self.abi != "session":
            return (
                f"reboot_strategy=systemd needs the session ABI: on {self.abi} the update lives "
                "in the device fd, which must stay open through the reboot while PID 1 needs "
                "the device at shutdown"
            )
        if self.config.systemd_user_mode:
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

    async def _busy_backoff(self, fn: Callable[[], T], deadline: float) -> T:
        """Run ``fn`` on the kernel thread, retrying EBUSY (another owner of the exclusive
        device, e.g. systemd >= 261 at boot) with exponential back-off until ``deadline``; the
        service status says what the agent waits for meanwhile."""
        delay = 0.05
        attempt = 1
        while True:
            try:
                result = await self._in_kernel(fn)
            except DeviceBusy as exc:
                if time.monotonic() + delay > deadline:
                    self._status(f"gave up waiting for /dev/liveupdate after {attempt} attempts")
                    raise
                self._status(f"waiting for /dev/liveupdate (attempt {attempt}): {exc}")
                log.info("kernel_busy_retry", delay=delay, attempt=attempt)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                attempt += 1
                continue
            if attempt > 1:
                self._status(f"/dev/liveupdate opened after {attempt} attempts")
            return result

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
        """Pick up where this boot stands (docs/reliability.md has the table per backend):

        * a live-update boot: the update continues (restore; a restarted agent that finds the
          restore gate passed goes on with finish);
        * the kernel still prepared (rfc-v2/v3 after a crash), or a pre-reboot update of a dead
          agent that the kernel already dropped: cancel, so the cancel hooks run, and record the
          update as aborted;
        * a post-reboot update whose carried files the kernel already finished: aborted, unless
          the dead agent was finishing (then what its finish reached: ``_finished``);
        * the kernel updated but its metadata already restored by a dead agent (rfc-v2/v3 restore
          it once): the update is taken from ``in-flight.json``;
        * an update in ``in-flight.json`` that this boot has no handover for: recorded as lost
          (``_record_lost_update``).
        """
        assert self.kernel is not None
        self._record_lost_update(boot, previous)
        if previous is not None and self.last is not None and previous.id == self.last.id:
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
        incoming = boot.incoming
        if incoming is None and boot.kernel_state is KernelStateValue.UPDATED and not same_boot:
            # rfc-v2/v3 restore the metadata only once: an agent that died after restoring it
            # and before saving this boot's record took it along.  The update as prepared, with
            # its kernel tokens, is in the state directory.
            incoming = self.history.load_in_flight()
            if incoming is not None:
                self.kernel.adopt(incoming)
                log.warning("update_taken_from_in_flight_record", update_id=incoming.id)
        if incoming is not None or (boot.kernel_state is KernelStateValue.UPDATED and same_boot):
            if same_boot:
                # rfc-v2/v3 restore the metadata only once (the dead agent did): the kernel
                # tokens come from current.json.  The session ABI could read it again.
                assert previous is not None
                self.kernel.adopt(previous)
                self.record = previous
                self._resume_with_finish = was in (ph.Phase.RESTORED, ph.Phase.FINISHING)
                log.warning("agent_restarted", update_id=previous.id, phase=str(was))
            else:
                assert incoming is not None
                record = incoming.with_phase(ph.Phase.UPDATED, new_boot=True)
                self.record = replace(
                    record, boot_count=record.boot_count + 1, kernel_cmdline=self._read_cmdline()
                )
            kernel_state = ph.KernelState.UPDATED
        elif boot.stale_prepared:
            kernel_state = ph.KernelState(str(boot.kernel_state))
            if previous is not None:
                self.kernel.adopt(previous)
            self.record = previous or UpdateRecord(id=_new_id(), abi=self.abi, started_by="unknown")
            self._resume_cancel = was is ph.Phase.CANCELLING
            self._abort_reason = (
                f"the agent stopped in phase {was}; the kernel was left {boot.kernel_state} "
                "and is cancelled"
            )
        elif previous is not None and ph.is_pre_reboot(was):
            # The kernel already dropped the update (its handles closed with the dead agent), or
            # the dead agent's cancel got as far as EVENT_CANCEL (rfc-v2 then still holds the
            # files): cancel anyway, with the recorded tokens, so the cancel hooks run and
            # nothing stays preserved.
            self.kernel.adopt(previous)
            self.record = previous
            kernel_state = ph.KernelState.PREPARED
            self._resume_cancel = was is ph.Phase.CANCELLING
            self._abort_reason = (
                f"the agent stopped in phase {was}; the kernel discarded the update"
            )
        else:
            kernel_state = ph.KernelState.NORMAL
            if previous is not None and was is ph.Phase.FINISHING:
                # The dead agent's kernel finish went through (rfc-v2/v3 keep the carried files
                # until FINISH, the session ABI's come back from the fd store): record what it
                # reached, as the agent would have.
                log.warning("finish_completed_by_the_kernel", update_id=previous.id)
                # Sessions the dead agent finished but had not yet let go of come back from the
                # fd store: FINISH again is a no-op that releases them (elsewhere it only fails).
                with contextlib.suppress(LuoError, OSError):
                    await self._in_kernel(self.kernel.finish)
                self._finish_record(self._finished(previous))
            elif previous is not None and was is not ph.Phase.IDLE:
                # After the reboot with the carried files gone (incoming sessions closed with
                # the dead agent and finished by the kernel): nothing left to restore.
                aborted = previous.ended(
                    "aborted",
                    "org.luoagent.LiveUpdate1.Error.Aborted",
                    f"the agent stopped in phase {was}; the kernel finished the carried files"
                    " and unretrieved data is lost",
                )
                self._finish_record(aborted)
            if boot.kernel_state is KernelStateValue.UPDATED:
                kernel_state = ph.KernelState.UPDATED
        stale_gate = ph.PHASE_TARGETS.get(was)
        if stale_gate is not None and ph.is_pre_reboot(was):
            # The dead agent's gate may still have a start job queued (a hook that hangs): the
            # cancel target conflicts with it, and starting it would be refused as destructive.
            with contextlib.suppress(LuoError):
                await self.gate.stop_unit(stale_gate)
        await self.submit(ph.Recovered(kernel_state, "; ".join(boot.notes)))

    async def resume(self) -> None:
        """After a live-update boot, start restoring (once the D-Bus API is up: participants
        retrieve through it); a restarted agent whose restore gate had passed finishes."""
        if self.phase is ph.Phase.UPDATED and self.record is not None:
            log.info(
                "live_update_boot", update_id=self.record.id, boot_count=self.record.boot_count
            )
            finish, self._resume_with_finish = self._resume_with_finish, False
            await self.submit(ph.Finish() if finish else ph.Restore())

    async def _watch_shutdown(self) -> None:
        """Notice a normal reboot/poweroff/halt/kexec queued by someone else while an update is
        prepared: the kernel would drop the update anyway, so cancel it (cancel hooks run)."""
        try:
            watch = await self.gate.watch_shutdown_jobs()
        except LuoError as exc:
            log.warning("shutdown_watch_unavailable", error=str(exc))
            return

        async def consume() -> None:
            try:
                async for target in watch:
                    if self.phase in (ph.Phase.PREPARING, ph.Phase.PREPARED):
                        await self._cancel_for_shutdown(target)
                    else:
                        log.info("shutdown_job_seen", target=target, phase=str(self.phase))
            finally:
                with contextlib.suppress(Exception):
                    await watch.aclose()

        self._shutdown_watch = asyncio.create_task(consume(), name="shutdown-watch")

    async def _cancel_for_shutdown(self, target: str) -> None:
        reason = f"{target} was queued by someone else while the update was {self.phase}"
        log.warning("shutdown_while_prepared", target=target, phase=str(self.phase))
        if self.record is not None:
            self.record = replace(self.record, message=reason)
        with contextlib.suppress(PhaseError):
            await self.submit(ph.Cancel())

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
        if self._state_check is not None:
            self._state_check.cancel()
        if self._participants_refresh is not None:
            self._participants_refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._participants_refresh
        if self._shutdown_watch is not None:
            self._shutdown_watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._shutdown_watch
        if self._work is not None:
            self._work.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._work
        with contextlib.suppress(Exception):
            await self._settle_gates()
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
        self._release_held()
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
        # A record while idle is another Prepare whose event is still queued: it has won.
        if self.phase is not ph.Phase.IDLE or self.record is not None:
            raise Busy(f"update {self.record.id if self.record else '?'} is in phase {self.phase}")
        if update_id and self.last is not None and self.last.id == update_id:
            raise InvalidArgument(f"update id {update_id!r} was already used")
        record = UpdateRecord(
            id=update_id or _new_id(),
            abi=self.abi,
            started_by=caller,
            kernel_cmdline=self.kernel_cmdline,
        )
        self.record = record
        try:
            await self.submit(ph.Prepare())
        except PhaseError:
            if self.record is record:
                self.record = None
            raise Busy(f"an update is in phase {self.phase}") from None
        # The update may have moved on (or ended) already; the caller needs its id.
        current = self.record
        return current if current is not None and current.id == record.id else record

    def _require_update(self, update_id: str) -> None:
        if update_id and (self.record is None or self.record.id != update_id):
            current = self.record.id if self.record else "none"
            raise InvalidArgument(f"no update {update_id!r} in progress (current: {current})")

    async def execute(self, update_id: str = "") -> None:
        self._require_update(update_id)
        if not self.kernel_loaded and self.phase is ph.Phase.PREPARED:
            raise PhaseError(self.phase, "Execute without a loaded kernel (LoadKernel first)")
        if self.reboot_strategy_blocker:
            # Before the freeze gate: nothing is frozen, the update stays prepared.
            raise Unsupported("Execute", errno.EOPNOTSUPP, self.reboot_strategy_blocker)
        if self.reboot_strategy == "systemd" and (gone := missing_kexec_image(self.kernel)):
            raise PhaseError(self.phase, f"Execute while {gone}")
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
        except OSError as exc:
            _close_fds(*own)
            # kexec_file_load refused the image (EPERM, ENOEXEC, EBADF): the caller's answer.
            raise KernelError("kexec_file_load", exc.errno or 5) from None
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
        key = (session, token)
        held = self._held.get(key)
        if held is None:
            held = self._held[key] = await self._in_kernel(self.kernel.retrieve, session, token)
        self._retrieved[key] = caller
        log.info("fd_retrieved", session=session, token=token, caller=caller)
        return os.dup(held)

    def check(self) -> CheckReport:
        blockers: list[str] = []
        if self.kernel is None:
            blockers.append("no LUO kernel interface")
        if self.phase is not ph.Phase.IDLE:
            blockers.append(f"an update is in phase {self.phase}")
        if not self.kernel_loaded:
            blockers.append("no kernel loaded for kexec (LoadKernel)")
        if self.reboot_strategy_blocker:
            blockers.append(self.reboot_strategy_blocker)
        gone = missing_kexec_image(self.kernel) if self.reboot_strategy == "systemd" else ""
        if gone and self.kernel_loaded:
            blockers.append(gone)
        warnings = [self.reboot_strategy_warning] if self.reboot_strategy_warning else []
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
        if self.observed_kernel_state is not None:
            return self.observed_kernel_state
        try:
            return self.kernel.describe_state()
        except (LuoError, OSError) as exc:
            return f"unknown ({exc})"

    def observe_kernel_state(self, value: str) -> None:
        """A value of the kernel's state file (the daemon's sysfs watcher): publish it, log a
        change the agent did not make, and act if it contradicts the phase."""
        previous, self.observed_kernel_state = self.observed_kernel_state, value
        if value != previous:
            if previous is not None and value not in OWN_KERNEL_STATES[self.phase]:
                log.warning(
                    "kernel_state_changed_externally",
                    state=value,
                    previous=previous,
                    phase=str(self.phase),
                    update_id=self.record.id if self.record else "",
                )
            for listener in self.listeners:
                listener.kernel_state_changed(value)
        self._check_kernel_state()

    def _check_kernel_state(self) -> None:
        """Kernel NORMAL while the agent holds a prepared update: someone cancelled it.  The
        watcher's value may be stale, so the kernel itself is asked before acting."""
        if self.observed_kernel_state != KernelStateValue.NORMAL:
            return
        if self.phase not in HOLDS_PREPARED_KERNEL or self.kernel is None:
            return
        if self._state_check is None or self._state_check.done():
            self._state_check = asyncio.create_task(
                self._cancel_if_kernel_normal(), name="kernel-state-check"
            )

    async def _cancel_if_kernel_normal(self) -> None:
        assert self.kernel is not None
        try:
            state = await self._in_kernel(self.kernel.describe_state)
        except (LuoError, OSError) as exc:
            log.warning("kernel_state_unreadable", error=str(exc))
            return
        if state != KernelStateValue.NORMAL or self.phase not in HOLDS_PREPARED_KERNEL:
            return  # a stale notification, or the phase moved on meanwhile
        if self.record is None:
            return
        reason = (
            f"the kernel left the prepared state behind the agent's back (kernel {state} in "
            f"phase {self.phase}): another process cancelled the live update"
        )
        log.warning("kernel_state_contradicts_phase", reason=reason, update_id=self.record.id)
        self.record = replace(self.record, message=reason)
        self._post(ph.Cancel())

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
        else:  # the phase is at rest now
            self._refresh_participants()  # before the stops: those stop the participants too
            self._stop_targets()
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
        if new is ph.Phase.REBOOTING:
            # The blackout-critical path (freeze → metadata pwrite → reboot) carries no file
            # writes, logging or signals: "rebooting" is published when the reboot call returns
            # (with a real kernel it returns only on failure).
            self._unpublished_reboot = previous
            return
        self._publish(new, previous)

    def _publish_reboot(self) -> None:
        previous, self._unpublished_reboot = self._unpublished_reboot, None
        if previous is not None and self.phase is ph.Phase.REBOOTING:
            self._publish(ph.Phase.REBOOTING, previous)

    def _publish(self, new: ph.Phase, previous: ph.Phase) -> None:
        marker = MARKERS.get(new)
        if new is not self._published_phase:
            try:
                self.runtime.set_active([marker] if marker else [])
                self.runtime.publish_phase(new)
                self._published_phase = new
            except PersistError as exc:
                log.error("runtime_state_unwritable", error=str(exc))
        if new is ph.Phase.IDLE and self.record is not None:
            self._end_update(previous)
        else:
            self._save(self.record)
            if new in (ph.Phase.PREPARED, ph.Phase.FREEZING) and new is not previous:
                self._save_in_flight()
        if new is ph.Phase.RESTORED and self.config.auto_finish:
            self._post(ph.Finish())
        if new is ph.Phase.PREPARED:
            # A cancel by someone else during preparing may have coalesced into no change at all.
            self._check_kernel_state()
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
            record = self._finished(record)
        else:
            record = record.ended(record.result or "success")
        self.record = None
        self.registry.close_all()
        self._release_held()
        # The history entry first, then current.json: a crash between the two leaves a
        # current.json whose id the history has, which start-up ignores (_recover); the other
        # order lost the update.
        self._finish_record(record)
        self._save(None)

    def _finished(self, record: UpdateRecord) -> UpdateRecord:
        """The outcome of a kernel finish: success only if every participant confirmed its
        restore (the restore gate passed); otherwise the kernel discarded whatever was not
        retrieved, and the record names the failure and the unconfirmed fds."""
        if any(t.phase == ph.Phase.RESTORED for t in record.timings):
            return record.ended("success")
        why = record.message if record.result == "failed" else "the restore gate did not pass"
        fds = [f"{p.session}/{p.token} (owner {p.owner or '?'})" for p in record.preserved]
        listed = ", ".join(fds[:MAX_NAMED_FDS])
        if len(fds) > MAX_NAMED_FDS:
            listed += f" and {len(fds) - MAX_NAMED_FDS} more"
        return record.ended(
            "finished-with-losses",
            "org.luoagent.LiveUpdate1.Error.FinishedWithLosses",
            f"finished without every participant confirming its restore ({why}); the kernel "
            f"discarded whatever was not retrieved of: {listed or 'no fds'}",
        )

    def _release_held(self) -> None:
        _close_fds(*self._held.values())
        self._held.clear()
        self._retrieved.clear()

    def _finish_record(self, record: UpdateRecord) -> None:
        self.last = record
        try:
            self.history.append(record)
        except PersistError as exc:
            log.error("history_unwritable", error=str(exc), update_id=record.id)
        try:
            # After the entry: a crash between the two leaves an in-flight record whose id the
            # history has, which start-up removes.  Removed even if the entry could not be
            # written: the update is over, and a later boot must not call it lost.
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
        for listener in self.listeners:
            listener.update_finished(record)

    def _save_in_flight(self) -> None:
        """Keep the prepared update in the state directory (durable, outside the blackout): a
        boot that comes up without its handover can still record it (_record_lost_update)."""
        if self.record is None:
            return
        try:
            self.history.save_in_flight(self.record)
        except PersistError as exc:
            log.error("in_flight_unwritable", error=str(exc), update_id=self.record.id)

    def _record_lost_update(self, boot: BootState, previous: UpdateRecord | None) -> None:
        """An update that was prepared (perhaps already kexec'd into) and that this boot knows
        nothing of: no handover came in, and /run (current.json) is empty, so the machine went
        through a reboot that was not the live update's (a crash of the new kernel, a power
        cycle).  Recorded as lost, with what the agent last knew."""
        pending = self.history.load_in_flight()
        if pending is None:
            return
        if any(entry.get("id") == pending.id for entry in self.history.load()):
            with contextlib.suppress(PersistError):
                self.history.clear_in_flight()  # recorded already; only the removal was lost
            return
        if previous is not None or boot.kernel_state is KernelStateValue.UPDATED:
            return  # a restart in the same boot, or the kernel carries it: recovery has it
        if boot.incoming is not None and boot.incoming.id == pending.id:
            return  # the live-update boot of that very update
        if f"{CMDLINE_MARKER}{pending.id}" in self._read_cmdline().split():
            # This is the update's own kexec'd kernel, yet its handover is gone: an agent that
            # started earlier in this boot took it and died before keeping it (session ABI:
            # between RETRIEVE_SESSION and the fd store).
            lost = pending.ended(
                "aborted",
                "org.luoagent.LiveUpdate1.Error.Aborted",
                "this is the update's live-update boot, but the agent's handover was not found "
                "(taken by an agent that died earlier in this boot); the agent cannot restore "
                "what was carried",
            )
        else:
            after_kexec = pending.phase in (ph.Phase.FREEZING, ph.Phase.REBOOTING)
            when = (
                "after the kexec was issued (or on the way to it)"
                if after_kexec
                else "while the update was prepared"
            )
            lost = pending.ended(
                "lost-in-reboot",
                "org.luoagent.LiveUpdate1.Error.HandoverLost",
                f"the machine booted without this update's live-update handover: it went down "
                f"{when}, last seen in phase {pending.phase} (a kernel crash or a power cycle); "
                "the carried data is lost",
            )
        log.error("update_lost", update_id=pending.id, phase=pending.phase, result=lost.result)
        self._finish_record(lost)

    def _save(self, record: UpdateRecord | None) -> None:
        if record is not None and record is self._saved_record:
            return  # written already (a step that kept the phase and the record)
        try:
            self.runtime.save_current(record)
            self._saved_record = record
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
        if failure.event == "Recovered" and self._resume_cancel:
            # The dead agent was cancelling: the restart finishes that cancel, which ends as
            # the dead agent would have ended it (_end_update), not as an abort.
            self._resume_cancel, self._abort_reason = False, ""
            return
        if failure.event == "Recovered" and self._abort_reason:
            reason, self._abort_reason = self._abort_reason, ""
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
        # The previous gate's target must be stopped before another gate starts (job mode fail).
        await self._settle_gates()
        self._unread_participants = ""
        if self._participants_refresh is not None:
            self._participants_refresh.cancel()  # this gate's reading supersedes it
            self._participants_refresh = None
        try:
            outcome = await self.gate.run_target(target)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                self.participants = await asyncio.shield(self.gate.unit_statuses(target))
                # Cancelling the job leaves a hook that is still starting running: stop it, or
                # the abandoned phase would keep it (and the next update's gate) waiting.
                await asyncio.shield(self._stop_starting(self.participants))
            raise
        except LuoError as exc:
            return ph.GateFailed(target, str(exc))
        if target == ph.PHASE_TARGETS[ph.Phase.FREEZING] and outcome.ok:
            # The blackout-critical path starts here: nothing slow until the kexec.
            self._freeze_gate_done = time.monotonic()
            return ph.GateOk(target)
        self._unstopped.append(target)  # stopped once the phase is at rest: _stop_targets
        if outcome.ok:
            # The participants' states are for display (the Participants property): read once
            # the phase is at rest, off its path (pystemd holds the GIL for each bus call, so
            # a read overlapping the kernel work only slows that), and announced on their own.
            self._unread_participants = target
            return ph.GateOk(target)
        self.participants = outcome.culprits or await self._statuses(target)
        return ph.GateFailed(target, _describe_gate(outcome))

    def _refresh_participants(self) -> None:
        target, self._unread_participants = self._unread_participants, ""
        if not target:
            return
        if self._participants_refresh is not None:
            self._participants_refresh.cancel()  # a stale reading must not overwrite a newer one
        self._participants_refresh = asyncio.create_task(
            self._read_participants(target), name=f"participants-{target}"
        )

    async def _read_participants(self, target: str) -> None:
        try:
            statuses = await self.gate.unit_statuses(target)
        except Exception as exc:  # display only: the phase has moved on regardless
            log.warning("participants_unreadable", target=target, error=str(exc))
            return
        if statuses == self.participants:
            return
        self.participants = statuses
        for listener in self.listeners:
            notify = getattr(listener, "participants_changed", None)  # optional in listeners
            if notify is not None:
                notify()

    def _stop_targets(self) -> None:
        """Stop the passed gates' targets, so the next update runs the participants again.
        Not on the phase's own path: a stop is a whole systemd job, and pystemd holds the GIL
        for each bus call, stalling the loop.  The next gate waits for them (_settle_gates)."""
        while self._unstopped:
            target = self._unstopped.pop(0)
            self._target_stops.append(asyncio.create_task(self._stop_target(target)))

    async def _stop_target(self, target: str) -> None:
        with contextlib.suppress(LuoError):
            await self.gate.stop_unit(target)

    async def _settle_gates(self) -> None:
        self._stop_targets()
        while self._target_stops:
            # Shielded: a cancelled gate must not leave its predecessor's target running.
            await asyncio.shield(self._target_stops[0])
            self._target_stops.pop(0)

    async def _stop_starting(self, units: Sequence[UnitStatus]) -> None:
        for unit in units:
            if unit.active_state == "activating":
                log.warning("participant_stopped", unit=unit.unit, sub_state=unit.sub_state)
                with contextlib.suppress(LuoError):
                    await self.gate.stop_unit(unit.unit)

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
        record = self.record.with_phase(ph.Phase.REBOOTING)
        started = time.monotonic()
        try:
            await self._kexec_now(record)
        except (LuoError, OSError) as exc:
            self._publish_reboot()
            log.error("kexec_failed", error=str(exc), update_id=record.id)
            reason = f"kexec reboot failed: {exc}"
            if self.abi == "rfc-v2":
                return ph.RebootFailedAfterFreeze(reason)
            return ph.RebootFailed(reason)
        self._publish_reboot()
        log.info(
            "kexec_issued",
            update_id=record.id,
            seconds=round(time.monotonic() - started, 6),
            strategy=self.reboot_strategy,
        )
        self._on_rebooted()
        return None

    async def _kexec_now(self, record: UpdateRecord) -> None:
        if self.reboot_strategy != "systemd":
            await self._in_kernel(self._reboot_blocking, record)
            return
        kernel = self.kernel
        assert kernel is not None
        # The systemd strategy: the session fds go to the fd store, kexec.target stops every
        # unit (this agent too) and PID 1 carries the store through reboot(KEXEC) (>= 261).
        await hand_over_to_pid1(
            self.gate,
            image_loaded=lambda: self._in_kernel(kernel.kexec_image_loaded),
            entrust=lambda: self._in_kernel(self._entrust_blocking, record),
            reclaim=lambda: self._in_kernel(kernel.reclaim_outgoing),
            announce=self._publish_reboot,
        )

    def _write_final_metadata(self, record: UpdateRecord) -> None:
        """O(1) before the jump: one pwrite of the small metadata, stamped with the agent's share
        of the blackout so far."""
        assert self.kernel is not None
        blackout = time.monotonic() - self._freeze_gate_done
        self.kernel.update_metadata(replace(record, blackout_critical=blackout))

    def _entrust_blocking(self, record: UpdateRecord) -> int:
        assert self.kernel is not None
        self._write_final_metadata(record)
        return self.kernel.entrust_outgoing()

    def _reboot_blocking(self, record: UpdateRecord) -> None:
        assert self.kernel is not None
        self._write_final_metadata(record)
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
