"""Gating: the phase targets' systemd jobs, and what the participants' units show.

A gate starts its phase's target (job mode ``fail``) through the ``Gate`` port and becomes an
engine event.  Passed targets are stopped once the phase is at rest, so the next update runs the
participants again; the next gate waits for those stops.  The participants' states are read off
the phase's path, for display: after each gate, and while a gate is slow (who holds it), failures
first; a failed gate's culprits stay first until the next update's gate."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Final

import structlog

from .. import phase as ph
from ..errors import LuoError
from ..systemd.gate import Gate, GateOutcome, UnitStatus, failures_first
from .state import AgentListener, describe_units

log = structlog.get_logger("luo_agent.agent")

# How long an expired phase timer may wait to learn which participants are stuck.
TIMEOUT_PROBE_SECONDS: Final = 5.0
# A gate still running after this long shows who it waits for, read again at this interval.  A
# fast gate is never read while it runs: each read costs the loop (pystemd holds the GIL).
SLOW_GATE_SECONDS: Final = 1.0


class Gates:
    def __init__(self, gate: Gate, listeners: Sequence[AgentListener]) -> None:
        self.gate = gate
        self._listeners = listeners
        self.participants: tuple[UnitStatus, ...] = ()
        # When the freeze gate passed: the blackout-critical path starts there.
        self.freeze_passed_at = 0.0
        self._unstopped: list[str] = []
        self._stops: list[asyncio.Task[None]] = []
        self._refresh: asyncio.Task[None] | None = None
        self._unread = ""  # the passed gate whose participants are still to read
        # Between a phase timer's expiry and its Timeout event: which participants still run.
        self._stuck: tuple[UnitStatus, ...] = ()
        # The last failed gate's culprits: shown first until the next update's gate (the cancel
        # gate's participants, read after them, must not hide them).
        self._blamed: tuple[UnitStatus, ...] = ()

    async def run(self, target: str, queued: Callable[[], None] | None = None) -> ph.Event:
        # The previous gate's target must be stopped before another gate starts (job mode fail).
        await self.settle()
        self._unread = ""
        if self._refresh is not None:
            self._refresh.cancel()  # this gate's reading supersedes it
            self._refresh = None
        if target != ph.SPECS[ph.Phase.CANCELLING].target:
            self._blamed = ()
        watch = asyncio.create_task(self._watch_slow_gate(target), name=f"watch-{target}")
        try:
            outcome = await self.gate.run_target(target, queued)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                statuses = await asyncio.shield(self.gate.unit_statuses(target))
                self._show(statuses)
                # Cancelling the job leaves a hook that is still starting running: stop it, or
                # the abandoned phase would keep it (and the next update's gate) waiting.
                await asyncio.shield(self._stop_starting(statuses))
            raise
        except LuoError as exc:
            return ph.GateFailed(target, str(exc))
        finally:
            watch.cancel()
        if target == ph.SPECS[ph.Phase.FREEZING].target and outcome.ok:
            # The blackout-critical path starts here: nothing slow until the kexec.
            self.freeze_passed_at = time.monotonic()
            return ph.GateOk(target)
        self._unstopped.append(target)  # stopped once the phase is at rest: at_rest
        if outcome.ok:
            # The participants' states are for display (the Participants property): read once
            # the phase is at rest, off its path (pystemd holds the GIL for each bus call, so
            # a read overlapping the kernel work only slows that), and announced on their own.
            self._unread = target
            return ph.GateOk(target)
        self._blamed = outcome.culprits
        self._show(await self._statuses(target))
        return ph.GateFailed(target, _describe_gate(outcome))

    async def _watch_slow_gate(self, target: str) -> None:
        """While the gate runs past SLOW_GATE_SECONDS: show its units (who holds it) anew."""
        while True:
            await asyncio.sleep(SLOW_GATE_SECONDS)
            try:
                statuses = await self.gate.unit_statuses(target)
            except Exception as exc:  # display only
                log.warning("participants_unreadable", target=target, error=str(exc))
                continue
            self._show(statuses)

    def _show(self, statuses: Sequence[UnitStatus]) -> None:
        """Participants: the blamed first, then ``statuses`` failures first; listeners told."""
        blamed = {s.unit for s in self._blamed}
        shown = self._blamed + failures_first(s for s in statuses if s.unit not in blamed)
        if shown == self.participants:
            return
        self.participants = shown
        for listener in self._listeners:
            notify = getattr(listener, "participants_changed", None)  # optional in listeners
            if notify is not None:
                notify()

    def at_rest(self) -> None:
        """The phase is at rest: read the passed gate's participants, then stop the passed
        targets (in that order: the stops stop the participants too)."""
        self._refresh_participants()
        self.stop_targets()

    def _refresh_participants(self) -> None:
        target, self._unread = self._unread, ""
        if not target:
            return
        if self._refresh is not None:
            self._refresh.cancel()  # a stale reading must not overwrite a newer one
        self._refresh = asyncio.create_task(
            self._read_participants(target), name=f"participants-{target}"
        )

    async def _read_participants(self, target: str) -> None:
        try:
            statuses = await self.gate.unit_statuses(target)
        except Exception as exc:  # display only: the phase has moved on regardless
            log.warning("participants_unreadable", target=target, error=str(exc))
            return
        self._show(statuses)

    def stop_targets(self) -> None:
        """Stop the passed gates' targets, so the next update runs the participants again.
        Not on the phase's own path: a stop is a whole systemd job, and pystemd holds the GIL
        for each bus call, stalling the loop.  The next gate waits for them (``settle``)."""
        while self._unstopped:
            target = self._unstopped.pop(0)
            self._stops.append(asyncio.create_task(self._stop_target(target)))

    async def _stop_target(self, target: str) -> None:
        with contextlib.suppress(LuoError):
            await self.gate.stop_unit(target)

    async def settle(self) -> None:
        self.stop_targets()
        while self._stops:
            # Shielded: a cancelled gate must not leave its predecessor's target running.
            await asyncio.shield(self._stops[0])
            self._stops.pop(0)

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

    async def probe_stuck(self, phase: ph.Phase) -> None:
        """Before a phase's Timeout: learn which participants of its gate are still running
        (cancelling the gate stops them, and the failure must name them)."""
        self._stuck = ()
        target = ph.SPECS[phase].target
        if target is None:
            return
        try:
            async with asyncio.timeout(TIMEOUT_PROBE_SECONDS):
                statuses = await self.gate.unit_statuses(target)
            self._stuck = tuple(s for s in statuses if s.is_failure)
        except Exception as exc:  # the timeout must be posted whatever the probe does
            log.warning("timeout_probe_failed", target=target, error=str(exc))

    def still_running(self) -> str:
        """What a Timeout's reason adds: the participants the probe found still running, who
        become the Participants shown."""
        if not self._stuck:
            return ""
        self._blamed, self._stuck = failures_first(self._stuck), ()
        self._show(())
        return "; still running: " + describe_units(self._blamed)

    async def close(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._refresh


def _describe_gate(outcome: GateOutcome) -> str:
    if not outcome.culprits:
        return f"{outcome.target} job ended {outcome.job_result}"
    return f"{outcome.target} job ended {outcome.job_result}: {describe_units(outcome.culprits)}"
