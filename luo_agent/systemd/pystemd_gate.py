"""The ``Gate`` port over pystemd: phase targets as systemd jobs, awaited on the asyncio loop.

The connection lives on its own thread (``pystemd_thread``); what is asked of systemd is in
``pystemd_calls``: the only module that imports pystemd.  Callers bound whole operations
with ``asyncio.timeout``: a cancelled job wait cancels the job in systemd before the
cancellation propagates.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Final

import structlog

from luo_agent.errors import GateError
from luo_agent.systemd import pystemd_calls as calls
from luo_agent.systemd.gate import GateOutcome, JobResult, UnitStatus, select_culprits
from luo_agent.systemd.pystemd_thread import BusThread, JobRequest, JobWatcher

log = structlog.get_logger(__name__)

# What `systemctl kexec` starts once a kexec image is loaded.
KEXEC_TARGET: Final = "kexec.target"
KEXEC_JOB_MODE: Final = "replace-irreversibly"

SHUTDOWN_TARGETS: Final = frozenset(
    {"reboot.target", "poweroff.target", "halt.target", "kexec.target", "soft-reboot.target"}
)


class ShutdownJobWatch:
    """Async iterator of shutdown-target names for which PID 1 queued a job (``JobNew``).

    Registered before it is returned, so no job queued after ``watch_shutdown_jobs()`` returns
    is missed.  Ends when closed or when the gate closes.
    """

    def __init__(self, bus: BusThread, watcher: JobWatcher) -> None:
        self._bus, self._watcher, self._closed = bus, watcher, False

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
            if not self._bus.closing:
                await self._bus.call(lambda: self._bus.t_remove_watcher(self._watcher))

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
        self._bus = BusThread(user_mode, bus_address)

    async def run_target(
        self, target: str, queued: Callable[[], None] | None = None
    ) -> GateOutcome:
        result = await self._run_job(
            b"StartUnit", target, "fail", cancel_participants=True, queued=queued
        )
        job_result = JobResult(result)
        if job_result == JobResult.DONE:
            return GateOutcome(target, job_result, ())
        statuses = await self.unit_statuses(target)
        return GateOutcome(target, job_result, select_culprits(job_result, statuses))

    async def unit_statuses(self, target: str) -> tuple[UnitStatus, ...]:
        return await self._bus.call(lambda: calls.unit_statuses(self._bus.t_bus(), target))

    async def stop_unit(self, unit: str) -> None:
        result = await self._run_job(b"StopUnit", unit, "replace", cancel_participants=False)
        if result != JobResult.DONE:
            raise GateError(unit, result)

    async def reload(self) -> None:
        # systemd answers Reload only once the reload is complete.
        await self._bus.call(lambda: calls.manager_call(self._bus.t_bus(), b"Reload", b"", []))

    async def kexec(self) -> None:
        # Not Manager.KExec, which stops no unit (docs/architecture.md, "systemd 262 and
        # /dev/liveupdate").  Not _run_job: cancelling this wait must not cancel the kexec.
        loop = asyncio.get_running_loop()
        request = JobRequest(loop, loop.create_future())

        def enqueue() -> None:
            path = calls.enqueue_job(self._bus.t_bus(), b"StartUnit", KEXEC_TARGET, KEXEC_JOB_MODE)
            self._bus.t_await_job(request, path)

        await self._bus.call(enqueue)
        try:
            result = await request.done
        except GateError as exc:
            # PID 1 took the job (irreversible: nothing replaces it) and is shutting down: the
            # system bus stops, this agent is stopped, and the wait ends without a job result.
            # That is no refusal: the fd store keeps the sessions for the kexec.  Found on
            # systemd 262, where dbus.service stopping failed the wait and the agent took its
            # sessions back out of the store.
            log.info("kexec_job_queued_wait_ended", unit=KEXEC_TARGET, why=str(exc))
            return
        if result != JobResult.DONE:
            raise GateError(KEXEC_TARGET, result)

    async def fd_store_fill(self, unit: str = "") -> tuple[int, int]:
        return await self._bus.call(lambda: calls.fd_store_fill(self._bus.t_bus(), unit))

    async def manager_version(self) -> str:
        return await self._bus.call(lambda: calls.manager_version(self._bus.t_bus()))

    async def shutdown_inhibitors(self) -> list[str]:
        return await self._bus.call(lambda: calls.shutdown_inhibitors(self._bus.t_bus()))

    async def watch_shutdown_jobs(
        self, units: Iterable[str] = SHUTDOWN_TARGETS
    ) -> ShutdownJobWatch:
        watcher = JobWatcher(frozenset(units), asyncio.get_running_loop())
        await self._bus.call(lambda: self._bus.t_add_watcher(watcher))
        return ShutdownJobWatch(self._bus, watcher)

    async def close(self) -> None:
        """End the bus thread: pending jobs fail with GateError, watches end, the bus closes."""
        await self._bus.close()

    async def __aenter__(self) -> PystemdGate:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _run_job(
        self,
        method: bytes,
        unit: str,
        mode: str,
        *,
        cancel_participants: bool,
        queued: Callable[[], None] | None = None,
    ) -> str:
        loop = asyncio.get_running_loop()
        request = JobRequest(loop, loop.create_future())

        def enqueue() -> None:
            path = calls.enqueue_job(self._bus.t_bus(), method, unit, mode)
            self._bus.t_await_job(request, path)

        try:
            await self._bus.call(enqueue)
            if queued is not None:
                queued()
            return await request.done
        except asyncio.CancelledError:
            # The caller gave up (its timeout): cancel the job in systemd before propagating.
            # Queued after the start command, this runs after it even if that is still pending.
            try:
                cancel = self._bus.submit(
                    lambda: self._t_cancel_job(request, unit, cancel_participants)
                )
                await asyncio.shield(cancel)
            except GateError as exc:  # closed meanwhile, or the bus broke: report, still cancel
                log.warning("job_cancel_failed", unit=unit, error=str(exc))
            raise

    def _t_cancel_job(self, request: JobRequest, unit: str, with_participants: bool) -> None:
        if request.job_path is None:  # the start call failed: no job exists
            return
        self._bus.t_forget_job(request)
        calls.cancel_job(self._bus.t_bus(), request.job_path, unit, with_participants)
