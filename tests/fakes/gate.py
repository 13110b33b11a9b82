"""A recording Gate for agent tests that do not need systemd (the systemd adapter itself and the
whole-update tests run against a real systemd manager).  Each target's behaviour is set per test:
pass, fail naming a unit, hang until cancelled, or run a hook (a participant's action) first."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from luo_agent.errors import GateError
from luo_agent.systemd.gate import GateOutcome, JobResult, UnitStatus

Hook = Callable[[], Awaitable[None]]


@dataclass
class FakeGate:
    started: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    failing: dict[str, UnitStatus] = field(default_factory=dict)
    hanging: set[str] = field(default_factory=set)
    # Targets whose StartUnit the manager is slow to answer: the job is never reported queued.
    unqueued: set[str] = field(default_factory=set)
    hooks: dict[str, Hook] = field(default_factory=dict)
    # Shutdown jobs "queued by PID 1": put a target name with queue_shutdown_job().
    shutdown_jobs: asyncio.Queue[str | None] = field(default_factory=asyncio.Queue)
    watching: asyncio.Event = field(default_factory=asyncio.Event)
    # The manager's Version property; kexec() (StartUnit kexec.target, replace-irreversibly)
    # records the request, then runs on_kexec: what PID 1 does with the job
    # (tests/fakes/pid1.py emulates systemd 262).
    version: str = "252.38-1~deb12u1"
    kexec_requests: int = 0
    on_kexec: Hook | None = None
    # The agent unit's (NFileDescriptorStore, FileDescriptorStoreMax); None: no such unit.
    fd_store: Callable[[], tuple[int, int]] | None = None
    # logind's block inhibitors of shutdown ("who (PID n): why").
    inhibitors: list[str] = field(default_factory=list)

    def queue_shutdown_job(self, target: str) -> None:
        self.shutdown_jobs.put_nowait(target)

    async def run_target(
        self, target: str, queued: Callable[[], None] | None = None
    ) -> GateOutcome:
        self.started.append(target)
        if queued is not None and target not in self.unqueued:
            queued()
        if target in self.hanging:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.append(target)
                raise
        hook = self.hooks.get(target)
        if hook is not None:
            try:
                await hook()
            except Exception as exc:
                unit = UnitStatus(f"hook-{target}", "failed", "failed", f"exception: {exc}")
                return GateOutcome(target, JobResult.DEPENDENCY, (unit,))
        if target in self.failing:
            return GateOutcome(target, JobResult.DEPENDENCY, (self.failing[target],))
        return GateOutcome(target, JobResult.DONE, ())

    async def unit_statuses(self, target: str) -> tuple[UnitStatus, ...]:
        if target in self.hanging:
            return (UnitStatus(f"hang-{target}", "activating", "start", ""),)
        return tuple(v for k, v in self.failing.items() if k == target)

    async def stop_unit(self, unit: str) -> None:
        self.stopped.append(unit)

    async def reload(self) -> None:
        pass

    async def watch_shutdown_jobs(self) -> FakeShutdownWatch:
        self.watching.set()
        return FakeShutdownWatch(self.shutdown_jobs)

    async def kexec(self) -> None:
        self.kexec_requests += 1
        if self.on_kexec is not None:
            await self.on_kexec()

    async def fd_store_fill(self, unit: str = "") -> tuple[int, int]:
        if self.fd_store is None:
            raise GateError(unit or "own unit", "get NFileDescriptorStore failed: no such unit")
        return self.fd_store()

    async def manager_version(self) -> str:
        return self.version

    async def shutdown_inhibitors(self) -> list[str]:
        return list(self.inhibitors)

    async def close(self) -> None:
        self.shutdown_jobs.put_nowait(None)


@dataclass
class FakeShutdownWatch:
    queue: asyncio.Queue[str | None]
    closed: bool = False

    def __aiter__(self) -> FakeShutdownWatch:
        return self

    async def __anext__(self) -> str:
        if self.closed:
            raise StopAsyncIteration
        unit = await self.queue.get()
        if unit is None:
            self.closed = True
            raise StopAsyncIteration
        return unit

    async def aclose(self) -> None:
        self.closed = True
