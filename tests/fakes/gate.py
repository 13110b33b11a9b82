"""A recording Gate for agent tests that do not need systemd (the systemd adapter itself and the
whole-update tests run against a real systemd manager).  Each target's behaviour is set per test:
pass, fail naming a unit, hang until cancelled, or run a hook (a participant's action) first."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from luo_agent.systemd.gate import GateOutcome, JobResult, UnitStatus

Hook = Callable[[], Awaitable[None]]


@dataclass
class FakeGate:
    started: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    failing: dict[str, UnitStatus] = field(default_factory=dict)
    hanging: set[str] = field(default_factory=set)
    hooks: dict[str, Hook] = field(default_factory=dict)

    async def run_target(self, target: str) -> GateOutcome:
        self.started.append(target)
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

    async def close(self) -> None:
        pass
