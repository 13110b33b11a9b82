"""The port through which the agent drives systemd phase targets (no pystemd here).

A phase is a target whose participants hook in with ``RequiredBy=`` + ``Before=``; the agent
starts the target in job mode ``fail`` and reads the job result (landscape.md §6.1).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol


class JobResult(StrEnum):
    """The result string of systemd's ``JobRemoved`` signal."""

    DONE = "done"
    CANCELED = "canceled"
    TIMEOUT = "timeout"
    FAILED = "failed"
    DEPENDENCY = "dependency"
    SKIPPED = "skipped"
    ASSERT = "assert"
    # also seen from systemd: "invalid", "unsupported", "collected", "once" (kept by _missing_)

    @classmethod
    def _missing_(cls, value: object) -> JobResult | None:
        # Values come from systemd, which adds results over time: keep unknown ones rather
        # than fail while reporting a failure.
        if not isinstance(value, str):
            return None
        member = str.__new__(cls, value)
        member._name_ = value.upper().replace("-", "_")
        member._value_ = value
        return member


@dataclass(frozen=True, slots=True)
class UnitStatus:
    unit: str
    active_state: str  # "active", "failed", "activating", "inactive", ...
    sub_state: str  # "exited", "start", "dead", ...
    result: str  # the unit's Result property ("success", "exit-code", "timeout", ...); "" if none

    @property
    def is_failure(self) -> bool:
        """Failed, stuck in a transition, or ended with a non-success result."""
        return self.active_state in ("failed", "activating", "deactivating", "reloading") or (
            self.result not in ("", "success")
        )


@dataclass(frozen=True, slots=True)
class GateOutcome:
    target: str
    job_result: JobResult
    # The participants (the target's Requires=/Requisite=/BindsTo= dependencies, which is what
    # RequiredBy= creates) that failed, are not active, or are still activating.
    culprits: tuple[UnitStatus, ...]

    @property
    def ok(self) -> bool:
        return self.job_result == JobResult.DONE


def select_culprits(
    job_result: JobResult, statuses: tuple[UnitStatus, ...]
) -> tuple[UnitStatus, ...]:
    """The participants to blame for a job that did not end ``done``.

    Units that failed or are stuck come first.  Only when none did are the merely inactive ones
    named: a ``Requisite=`` unit that was never started is inactive with result ``success``,
    but so is a oneshot without ``RemainAfterExit=`` that ran fine, so they are a fallback.
    """
    if job_result == JobResult.DONE:
        return ()
    failing = tuple(s for s in statuses if s.is_failure)
    if failing:
        return failures_first(failing)
    return tuple(s for s in statuses if s.active_state != "active")


def failures_first(statuses: Iterable[UnitStatus]) -> tuple[UnitStatus, ...]:
    """Failed units (or a non-success result) first, then those still in a transition (what a
    running gate waits for), then the rest; in their order otherwise."""

    def rank(s: UnitStatus) -> int:
        if s.active_state == "failed" or s.result not in ("", "success"):
            return 0
        return 1 if s.is_failure else 2

    return tuple(sorted(statuses, key=rank))


class ShutdownWatch(Protocol):
    """Names of shutdown targets (reboot, poweroff, halt, kexec, ...) for which the manager
    queued a job, as they are queued; ends when closed."""

    def __aiter__(self) -> ShutdownWatch: ...

    async def __anext__(self) -> str: ...

    async def aclose(self) -> None: ...


class Gate(Protocol):
    async def run_target(
        self, target: str, queued: Callable[[], None] | None = None
    ) -> GateOutcome:
        """Start ``target`` in job mode ``fail`` and wait for its job to end; ``queued`` is
        called (on the loop) once the manager has queued the job, if it does.

        No timeout inside (callers wrap it in ``asyncio.timeout``).  If the waiting task is
        cancelled, the systemd job (and the pending start jobs of the target's participants)
        is cancelled before ``CancelledError`` propagates; ``unit_statuses`` then tells why.
        """
        ...

    async def unit_statuses(self, target: str) -> tuple[UnitStatus, ...]:
        """Status of every participant of ``target`` (Requires=/Requisite=/BindsTo=)."""
        ...

    async def stop_unit(self, unit: str) -> None:
        """Stop ``unit`` (job mode ``replace``) and wait for the stop job to end."""
        ...

    async def reload(self) -> None:
        """daemon-reload; returns once the manager has reloaded."""
        ...

    async def watch_shutdown_jobs(self) -> ShutdownWatch:
        """Start watching for shutdown jobs (``JobNew`` of PID 1); registered on return."""
        ...

    async def kexec(self) -> None:
        """An orderly kexec, as ``systemctl kexec`` does with an image loaded: start
        ``kexec.target`` in job mode ``replace-irreversibly`` and wait for the job to end.

        PID 1 stops every unit on the way (the caller and the system bus too, usually before
        the job ends); once the job is queued, cancelling the wait or losing it (the gate closed,
        the bus gone) leaves the job alone and is no error.  Raises ``GateError`` if the start is
        refused or the job ends other than ``done``.  No timeout inside."""
        ...

    async def fd_store_fill(self, unit: str = "") -> tuple[int, int]:
        """``(NFileDescriptorStore, FileDescriptorStoreMax)`` of a service; "" is the caller's
        own unit."""
        ...

    async def manager_version(self) -> str:
        """The manager's ``Version`` property (e.g. ``"252.38-1~deb12u1"``)."""
        ...

    async def shutdown_inhibitors(self) -> list[str]:
        """logind's block inhibitors of shutdown ("who (PID n): why"); none without logind."""
        ...

    async def close(self) -> None: ...
