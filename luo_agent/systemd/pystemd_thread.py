"""The thread that owns the gate's pystemd connection to systemd, and the job signals on it.

pystemd is blocking and its sd-bus connection is not thread-safe, so one dedicated thread owns
the connection and everything on it: it runs commands taken from a queue (FIFO, so a "cancel"
queued after a "start" always sees the start's job) and, between commands, dispatches systemd's
``JobRemoved``/``JobNew`` signals by polling the bus fd together with an eventfd that wakes it
for new commands.  Results reach the asyncio loop only through ``loop.call_soon_threadsafe``; the
loop never blocks.  Methods named ``t_*`` run on the thread only (inside commands).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import select
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import structlog

from luo_agent.errors import GateError
from luo_agent.systemd.pystemd_calls import (
    DEST,
    MANAGER_IFACE,
    MANAGER_PATH,
    DBus,
    DBusAddress,
    call_error,
    manager_call,
    text,
)

log = structlog.get_logger(__name__)

T = TypeVar("T")

# Backstop for the dispatch loop while a job is awaited: pystemd's process() does not say whether
# it did something, so a message left in sd-bus's read queue without a callback could otherwise
# wait for the next fd event.  With no job awaited the thread sleeps until the bus or a command
# wakes it (an idle agent must not poll: only its watchdog ping wakes it).
_POLL_BACKSTOP_MS: Final = 250


@dataclass(eq=False)
class JobRequest:
    """Loop-side future for one systemd job; job_path is filled in on the bus thread."""

    loop: asyncio.AbstractEventLoop
    done: asyncio.Future[str]
    job_path: bytes | None = None


@dataclass(eq=False)
class JobWatcher:
    """Loop-side queue of the units in ``units`` for which systemd queued a job (None: ended)."""

    units: frozenset[str]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[str | None] = field(default_factory=asyncio.Queue)


class _StopBusThread(Exception):
    """Raised by the close command to leave the bus thread's loop."""


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


class BusThread:
    """The systemd manager's bus (``bus_address``, else the user or system bus) on its own
    thread, subscribed to the manager's job signals."""

    def __init__(self, user_mode: bool, bus_address: str | None) -> None:
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
        self._waiters: dict[bytes, JobRequest] = {}
        self._watchers: list[JobWatcher] = []
        self._callbacks: list[Callable[..., None]] = []  # pystemd keeps no reference itself
        self._thread = threading.Thread(target=self._t_main, name="systemd-bus", daemon=True)
        self._thread.start()

    # ---- loop side ----------------------------------------------------------------------
    @property
    def closing(self) -> bool:
        return self._closed is not None

    def submit(self, fn: Callable[[], T]) -> asyncio.Future[T]:
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

    async def call(self, fn: Callable[[], T]) -> T:
        return await self.submit(fn)

    async def close(self) -> None:
        """End the thread: pending jobs fail with GateError, watches end, the bus closes."""
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

    # ---- thread side: for commands ------------------------------------------------------
    def t_bus(self) -> Any:
        if self._broken is not None:
            raise GateError("systemd", f"bus unusable: {self._broken}")
        return self._bus

    def t_await_job(self, request: JobRequest, job_path: bytes) -> None:
        """Resolve ``request`` with the job's result when its JobRemoved arrives.  Called in the
        command that queued the job, i.e. before the dispatch loop can deliver that JobRemoved
        (it waits in sd-bus's read queue until then)."""
        request.job_path = job_path
        self._waiters[job_path] = request

    def t_forget_job(self, request: JobRequest) -> None:
        if request.job_path is not None:
            self._waiters.pop(request.job_path, None)

    def t_add_watcher(self, watcher: JobWatcher) -> None:
        self._watchers.append(watcher)

    def t_remove_watcher(self, watcher: JobWatcher) -> None:
        self._watchers.remove(watcher)

    # ---- thread side: the loop ----------------------------------------------------------
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
            bus.match_signal(DEST, MANAGER_PATH, MANAGER_IFACE, member, on_manager_signal)
        # Without a subscriber systemd does not emit job signals on the API bus.
        manager_call(bus, b"Subscribe", b"", [])

    def _t_main(self) -> None:
        poller = select.poll()
        poller.register(self._wake_fd, select.POLLIN)
        try:
            self._t_open()
            poller.register(self._bus.get_fd(), select.POLLIN)
        except Exception as exc:
            self._broken = call_error("connect", "systemd", exc)
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
            self._broken = call_error("dispatch", "systemd", exc)
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
                _post(request.loop, _resolve, request.done, text(body[3]))
        else:  # JobNew (u id, o job, s unit)
            unit = text(body[2])
            for watcher in self._watchers:
                if unit in watcher.units:
                    _post(watcher.loop, watcher.queue.put_nowait, unit)
