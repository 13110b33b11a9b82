"""The systemd gate over pystemd — the only module of the project that imports pystemd.

pystemd is blocking and its sd-bus connection is not thread-safe, so one dedicated thread owns
the connection and everything on it: it runs commands taken from a queue (FIFO, so a "cancel"
queued after a "start" always sees the start's job) and, between commands, dispatches signals by
polling the bus fd together with an eventfd that wakes it for new commands.  Results reach the
asyncio loop only through ``loop.call_soon_threadsafe``; the loop never blocks.  Bytes from
pystemd become ``str`` here, at the edge.

Every D-Bus call is one ``sd_bus_call`` with sd-bus's default method timeout (25 s): the only
timeout inside; callers bound whole operations with ``asyncio.timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import select
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, TypeVar

import structlog
from pystemd.dbusexc import DBusBaseError
from pystemd.dbuslib import DBus, DBusAddress, apply_signature, path_encode

from luo_agent.errors import GateError
from luo_agent.systemd.gate import GateOutcome, JobResult, UnitStatus, select_culprits

log = structlog.get_logger(__name__)

T = TypeVar("T")

_DEST: Final = b"org.freedesktop.systemd1"
_MANAGER_PATH: Final = b"/org/freedesktop/systemd1"
_MANAGER_IFACE: Final = b"org.freedesktop.systemd1.Manager"
_UNIT_IFACE: Final = b"org.freedesktop.systemd1.Unit"
_JOB_IFACE: Final = b"org.freedesktop.systemd1.Job"
_UNIT_PATH_PREFIX: Final = b"/org/freedesktop/systemd1/unit"

# What RequiredBy= creates on the target, plus its stricter siblings.
PARTICIPANT_PROPERTIES: Final = ("Requires", "Requisite", "BindsTo")

# The unit types whose type-specific interface carries a Result property.
_RESULT_INTERFACES: Final = {
    "service": b"org.freedesktop.systemd1.Service",
    "socket": b"org.freedesktop.systemd1.Socket",
    "mount": b"org.freedesktop.systemd1.Mount",
    "swap": b"org.freedesktop.systemd1.Swap",
    "timer": b"org.freedesktop.systemd1.Timer",
    "path": b"org.freedesktop.systemd1.Path",
    "automount": b"org.freedesktop.systemd1.Automount",
    "scope": b"org.freedesktop.systemd1.Scope",
}

# What `systemctl kexec` starts once a kexec image is loaded.
KEXEC_TARGET: Final = "kexec.target"
KEXEC_JOB_MODE: Final = "replace-irreversibly"

SHUTDOWN_TARGETS: Final = frozenset(
    {"reboot.target", "poweroff.target", "halt.target", "kexec.target", "soft-reboot.target"}
)

# Backstop for the dispatch loop while a job is awaited: pystemd's process() does not say whether
# it did something, so a message left in sd-bus's read queue without a callback could otherwise
# wait for the next fd event.  With no job awaited the thread sleeps until the bus or a command
# wakes it (an idle agent must not poll: only its watchdog ping wakes it).
_POLL_BACKSTOP_MS: Final = 250


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _call_error(what: str, subject: str, exc: BaseException) -> GateError:
    if isinstance(exc, DBusBaseError):
        name = getattr(exc, "err_name", "") or type(exc).__name__
        detail = _text(getattr(exc, "err_message", b"")) or str(exc)
        return GateError(subject, f"{what} failed: {_text(name)}: {detail}")
    return GateError(subject, f"{what} failed: {exc!r}")


class _StopBusThread(Exception):
    """Raised by the close command to leave the bus thread's loop."""


@dataclass(eq=False)
class _JobRequest:
    """Loop-side future for one systemd job; job_path is filled in on the bus thread."""

    loop: asyncio.AbstractEventLoop
    done: asyncio.Future[str]
    job_path: bytes | None = None


@dataclass(eq=False)
class _JobWatcher:
    units: frozenset[str]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[str | None] = field(default_factory=asyncio.Queue)


def _resolve(fut: asyncio.Future[T], value: T) -> None:
    if not fut.done():
        fut.set_result(value)


def _reject(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


def _post(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    """Hand a callback to an event loop from the bus thread; a closed loop has no listener."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


class ShutdownJobWatch:
    """Async iterator of shutdown-target names for which PID 1 queued a job (``JobNew``).

    Registered before it is returned, so no job queued after ``watch_shutdown_jobs()`` returns
    is missed.  Ends when closed or when the gate closes.
    """

    def __init__(self, gate: PystemdGate, watcher: _JobWatcher) -> None:
        self._gate, self._watcher, self._closed = gate, watcher, False

    def __aiter__(self) -> ShutdownJobWatch:
        return self

    async def __anext__(self) -> str:
        if self._closed:
            raise StopAsyncIteration
        unit = await self._watcher.queue.get()
        if unit is None:
            self._closed = True
            raise StopAsyncIteration
        return unit

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._gate._unwatch(self._watcher)

    async def __aenter__(self) -> ShutdownJobWatch:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class PystemdGate:
    """``Gate`` over a systemd manager: the system one, or with ``user_mode`` the session's
    user manager (``$DBUS_SESSION_BUS_ADDRESS``); ``bus_address``, if given, names the bus
    explicitly (and ``user_mode`` is then irrelevant)."""

    def __init__(self, user_mode: bool = False, *, bus_address: str | None = None) -> None:
        self._user_mode = user_mode
        self._bus_address = bus_address
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._closed: asyncio.Future[None] | None = None
        # Bus-thread state: touched only by the thread below.
        self._bus: Any = None
        self._stop_loop: asyncio.AbstractEventLoop | None = None
        self._broken: BaseException | None = None
        self._signal_seen = False
        self._waiters: dict[bytes, _JobRequest] = {}
        self._watchers: list[_JobWatcher] = []
        self._callbacks: list[Callable[..., None]] = []  # pystemd keeps no reference itself
        self._thread = threading.Thread(target=self._t_main, name="systemd-bus", daemon=True)
        self._thread.start()

    # ---- the Gate port ------------------------------------------------------------------
    async def run_target(self, target: str) -> GateOutcome:
        result = await self._run_job(b"StartUnit", target, "fail", cancel_participants=True)
        job_result = JobResult(result)
        if job_result == JobResult.DONE:
            return GateOutcome(target, job_result, ())
        statuses = await self.unit_statuses(target)
        return GateOutcome(target, job_result, select_culprits(job_result, statuses))

    async def unit_statuses(self, target: str) -> tuple[UnitStatus, ...]:
        return await self._call(lambda: self._t_unit_statuses(target))

    async def stop_unit(self, unit: str) -> None:
        result = await self._run_job(b"StopUnit", unit, "replace", cancel_participants=False)
        if result != JobResult.DONE:
            raise GateError(unit, result)

    async def reload(self) -> None:
        # systemd answers Reload only once the reload is complete.
        await self._call(lambda: self._t_manager_call(b"Reload", b"", []))

    async def kexec(self) -> None:
        # Not Manager.KExec, which stops no unit (docs/architecture.md, "systemd 262 and
        # /dev/liveupdate").  Not _run_job: cancelling this wait must not cancel the kexec.
        loop = asyncio.get_running_loop()
        request = _JobRequest(loop, loop.create_future())
        await self._call(
            lambda: self._t_enqueue_job(request, b"StartUnit", KEXEC_TARGET, KEXEC_JOB_MODE)
        )
        result = await request.done
        if result != JobResult.DONE:
            raise GateError(KEXEC_TARGET, result)

    async def fd_store_fill(self, unit: str = "") -> tuple[int, int]:
        return await self._call(lambda: self._t_fd_store_fill(unit))

    async def manager_version(self) -> str:
        return await self._call(
            lambda: _text(
                self._t_bus().get_property(_DEST, _MANAGER_PATH, _MANAGER_IFACE, b"Version", b"s")
            )
        )

    async def watch_shutdown_jobs(
        self, units: Iterable[str] = SHUTDOWN_TARGETS
    ) -> ShutdownJobWatch:
        watcher = _JobWatcher(frozenset(units), asyncio.get_running_loop())
        await self._call(lambda: self._watchers.append(watcher))
        return ShutdownJobWatch(self, watcher)

    async def close(self) -> None:
        """End the bus thread: pending jobs fail with GateError, watches end, the bus closes."""
        if self._closed is None:
            loop = asyncio.get_running_loop()
            self._closed = loop.create_future()
            if self._thread.is_alive():
                self._commands.put(lambda: self._t_stop(loop))
                os.eventfd_write(self._wake_fd, 1)
            else:
                self._closed.set_result(None)
        await asyncio.shield(self._closed)
        self._thread.join()  # already past its last statement: the stop was posted last
        if self._wake_fd >= 0:
            os.close(self._wake_fd)
            self._wake_fd = -1

    async def __aenter__(self) -> PystemdGate:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ---- loop side ----------------------------------------------------------------------
    def _submit(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Queue ``fn`` for the bus thread.  It runs even if the returned future is cancelled:
        later commands rely on FIFO order, and a half-done D-Bus call cannot be undone."""
        if self._closed is not None:
            raise GateError("systemd", "gate closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()

        def command() -> None:
            try:
                value = fn()
            except BaseException as exc:  # handed to the awaiting task
                _post(loop, _reject, fut, exc)
            else:
                _post(loop, _resolve, fut, value)

        self._commands.put(command)
        os.eventfd_write(self._wake_fd, 1)
        return fut

    async def _call(self, fn: Callable[[], T]) -> T:
        return await self._submit(fn)

    async def _run_job(
        self, method: bytes, unit: str, mode: str, *, cancel_participants: bool
    ) -> str:
        loop = asyncio.get_running_loop()
        request = _JobRequest(loop, loop.create_future())
        try:
            await self._call(lambda: self._t_enqueue_job(request, method, unit, mode))
            return await request.done
        except asyncio.CancelledError:
            # The caller gave up (its timeout): cancel the job in systemd before propagating.
            # Queued after the start command, this runs after it even if that is still pending.
            try:
                cancel = self._submit(
                    lambda: self._t_cancel_job(request, unit, cancel_participants)
                )
                await asyncio.shield(cancel)
            except GateError as exc:  # closed meanwhile, or the bus broke: report, still cancel
                log.warning("job_cancel_failed", unit=unit, error=str(exc))
            raise

    async def _unwatch(self, watcher: _JobWatcher) -> None:
        if self._closed is None:
            await self._call(lambda: self._watchers.remove(watcher))

    # ---- bus thread ---------------------------------------------------------------------
    def _t_bus(self) -> Any:
        if self._broken is not None:
            raise GateError("systemd", f"bus unusable: {self._broken}")
        return self._bus

    def _t_open(self) -> None:
        bus = (
            DBusAddress(self._bus_address.encode()) if self._bus_address else DBus(self._user_mode)
        )
        bus.open()
        self._bus = bus

        def on_manager_signal(msg: Any, error: Any = None, userdata: Any = None) -> None:
            # Never raise into sd-bus: it would surface as an unrelated error in process().
            self._signal_seen = True
            try:
                self._t_on_manager_signal(msg)
            except Exception:
                log.exception("systemd_signal_failed")

        self._callbacks.append(on_manager_signal)
        # The Manager signals used go through one callback, so the dispatch loop can tell that
        # process() did something (it returns no status).  Only JobRemoved/JobNew: the bus then
        # drops UnitNew/UnitRemoved/... before they reach (and, GIL held, stall) the agent.
        for member in (b"JobRemoved", b"JobNew"):
            bus.match_signal(_DEST, _MANAGER_PATH, _MANAGER_IFACE, member, on_manager_signal)
        # Without a subscriber systemd does not emit job signals on the API bus.
        self._t_manager_call(b"Subscribe", b"", [])

    def _t_main(self) -> None:
        poller = select.poll()
        poller.register(self._wake_fd, select.POLLIN)
        try:
            self._t_open()
            poller.register(self._bus.get_fd(), select.POLLIN)
        except Exception as exc:
            self._broken = _call_error("connect", "systemd", exc)
        try:
            while True:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._wake_fd)
                while True:
                    try:
                        command = self._commands.get_nowait()
                    except queue.Empty:
                        break
                    command()  # raises _StopBusThread for close()
                    self._t_dispatch(poller)
                self._t_dispatch(poller)
                poller.poll(_POLL_BACKSTOP_MS if self._waiters else None)
        except _StopBusThread:
            pass
        finally:
            self._t_shutdown()

    def _t_dispatch(self, poller: select.poll) -> None:
        if self._broken is not None or self._bus is None:
            return
        try:
            while True:
                self._signal_seen = False
                message = self._bus.process()
                if message.is_empty() and not self._signal_seen:
                    return
        except Exception as exc:
            self._broken = _call_error("dispatch", "systemd", exc)
            log.error("systemd_bus_broken", error=str(self._broken))
            with contextlib.suppress(Exception):
                poller.unregister(self._bus.get_fd())
            for request in self._waiters.values():
                _post(request.loop, _reject, request.done, self._broken)
            self._waiters.clear()

    def _t_stop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._stop_loop = loop
        raise _StopBusThread

    def _t_shutdown(self) -> None:
        closed = GateError("systemd", "gate closed")
        self._broken = closed
        for request in self._waiters.values():
            _post(request.loop, _reject, request.done, closed)
        self._waiters.clear()
        for watcher in self._watchers:
            _post(watcher.loop, watcher.queue.put_nowait, None)
        self._watchers.clear()
        while True:  # commands queued behind close() fail instead of hanging their callers
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            command()
        if self._bus is not None:
            with contextlib.suppress(Exception):
                self._bus.close()
            self._bus = None
        if self._stop_loop is not None and self._closed is not None:
            _post(self._stop_loop, _resolve, self._closed, None)

    def _t_on_manager_signal(self, msg: Any) -> None:
        member = msg.get_member()
        if member not in (b"JobRemoved", b"JobNew"):
            return
        msg.process_reply(False)
        body = msg.body
        if member == b"JobRemoved":  # (u id, o job, s unit, s result)
            request = self._waiters.pop(bytes(body[1]), None)
            if request is not None:
                _post(request.loop, _resolve, request.done, _text(body[3]))
        else:  # JobNew (u id, o job, s unit)
            unit = _text(body[2])
            for watcher in self._watchers:
                if unit in watcher.units:
                    _post(watcher.loop, watcher.queue.put_nowait, unit)

    def _t_manager_call(self, method: bytes, signature: bytes, args: list[Any]) -> Any:
        try:
            return (
                self._t_bus()
                .call_method(
                    _DEST, _MANAGER_PATH, _MANAGER_IFACE, method, apply_signature(signature, args)
                )
                .body
            )
        except DBusBaseError as exc:
            raise _call_error(method.decode(), _text(args[0]) if args else "systemd", exc) from exc

    def _t_enqueue_job(self, request: _JobRequest, method: bytes, unit: str, mode: str) -> None:
        path = self._t_manager_call(method, b"ss", [unit.encode(), mode.encode()])
        # Registered before this command returns, i.e. before the dispatch loop can deliver
        # this job's JobRemoved (it waits in sd-bus's read queue until then).
        request.job_path = bytes(path)
        self._waiters[request.job_path] = request

    def _t_cancel_job(self, request: _JobRequest, unit: str, with_participants: bool) -> None:
        if request.job_path is None:  # the start call failed: no job exists
            return
        self._waiters.pop(request.job_path, None)
        bus = self._t_bus()
        try:
            bus.call_method(_DEST, request.job_path, _JOB_IFACE, b"Cancel", [])
        except DBusBaseError as exc:  # already finished: nothing to cancel
            log.debug("job_cancel_skipped", unit=unit, error=str(exc))
        if not with_participants:
            return
        # Cancelling the target's job does not touch the start jobs it pulled in (systemd
        # only fails jobs that depend on the cancelled one); cancel the participants' too,
        # so that a following phase (job mode "fail") does not trip over them.
        participants = set(self._t_participants(unit))
        for job in self._t_manager_call(b"ListJobs", b"", []) or []:
            job_id, job_unit = job[0], _text(job[1])
            if job_unit in participants:
                with contextlib.suppress(GateError):  # may have finished meanwhile
                    self._t_manager_call(b"CancelJob", b"u", [job_id])
                    log.info("participant_job_cancelled", unit=job_unit, target=unit)

    def _t_fd_store_fill(self, unit: str) -> tuple[int, int]:
        bus, service = self._t_bus(), _RESULT_INTERFACES["service"]
        try:
            if unit:
                path = self._t_unit_path(unit)
            else:  # GetUnitByPID(0): the caller's unit
                args = apply_signature(b"u", [0])
                reply = bus.call_method(_DEST, _MANAGER_PATH, _MANAGER_IFACE, b"GetUnitByPID", args)
                path = bytes(reply.body[0])
            count, room = (
                int(bus.get_property(_DEST, path, service, name, b"u"))
                for name in (b"NFileDescriptorStore", b"FileDescriptorStoreMax")
            )
        except DBusBaseError as exc:
            raise _call_error("get NFileDescriptorStore", unit or "own unit", exc) from exc
        return count, room

    def _t_unit_path(self, unit: str) -> bytes:
        # Looking the object path up loads the unit if needed (as pystemd's Unit does).
        return bytes(path_encode(_UNIT_PATH_PREFIX, unit.encode()))

    def _t_property(self, unit: str, interface: bytes, name: bytes, rtype: bytes) -> Any:
        try:
            return self._t_bus().get_property(
                _DEST, self._t_unit_path(unit), interface, name, rtype
            )
        except DBusBaseError as exc:
            raise _call_error(f"get {name.decode()}", unit, exc) from exc

    def _t_participants(self, target: str) -> list[str]:
        seen: dict[str, None] = {}  # ordered set
        for prop in PARTICIPANT_PROPERTIES:
            for name in self._t_property(target, _UNIT_IFACE, prop.encode(), b"as") or []:
                seen[_text(name)] = None
        return list(seen)

    def _t_unit_statuses(self, target: str) -> tuple[UnitStatus, ...]:
        units = self._t_participants(target)
        if not units:
            return ()
        # One ListUnitsByNames call for every unit's states: pystemd holds the GIL for each bus
        # call, so three calls per participant stalled the agent's loop for tens of ms at 50.
        rows = self._t_manager_call(b"ListUnitsByNames", b"as", [[u.encode() for u in units]])
        listed = {_text(row[0]): row for row in rows or []}
        return tuple(self._t_listed_status(unit, listed.get(unit)) for unit in units)

    def _t_listed_status(self, unit: str, row: Any) -> UnitStatus:
        # (name, description, load, active, sub, following, path, job id, job type, job path)
        if row is None:
            return self._t_unit_status(unit)
        load, active, sub = _text(row[2]), _text(row[3]), _text(row[4])
        interface = _RESULT_INTERFACES.get(unit.rpartition(".")[2])
        if interface is None or load != "loaded":
            result = ""
        elif active in ("active", "inactive"):
            result = "success"  # systemd resets Result at start; any failure makes it "failed"
        else:
            result = ""
            with contextlib.suppress(GateError):
                result = _text(self._t_property(unit, interface, b"Result", b"s"))
        return UnitStatus(unit, active, sub, result)

    def _t_unit_status(self, unit: str) -> UnitStatus:
        active = _text(self._t_property(unit, _UNIT_IFACE, b"ActiveState", b"s"))
        sub = _text(self._t_property(unit, _UNIT_IFACE, b"SubState", b"s"))
        result = ""
        interface = _RESULT_INTERFACES.get(unit.rpartition(".")[2])
        if interface is not None:
            with contextlib.suppress(GateError):  # e.g. a not-found unit
                result = _text(self._t_property(unit, interface, b"Result", b"s"))
        return UnitStatus(unit, active, sub, result)
