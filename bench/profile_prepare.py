"""Where the prepare phase's time goes (the explanation of figure 2's miss with 1 participant).

The agent runs in this process (``agent_host``: real Agent, D-Bus service, journal logging) but
with the real ``PystemdGate`` on a Testbed sandbox's systemd user manager and bus; its gate and
kernel steps are wrapped with timestamps.  ``python -m bench.profile_prepare [participants]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from luo_agent.agent.custody import Custody
from luo_agent.log import configure_logging
from luo_agent.systemd.gate import GateOutcome, UnitStatus
from luo_agent.systemd.pystemd_gate import PystemdGate
from luo_agent.testbed import Testbed

from .agent_host import AgentHost, notify_sink
from .busclient import Client
from .on_systemd import PREPARE_TARGET, participant_units

STEPS = ["call", "gate start", "gate job done", "kernel start", "kernel done", "prepared signal"]
# The participants' states are read once the phase is at rest, after "prepared" is published.
LATE = ("prepared signal", "statuses read")


class TimedGate(PystemdGate):
    def __init__(self, marks: dict[str, list[float]], address: str) -> None:
        super().__init__(bus_address=address)
        self.marks = marks

    async def run_target(
        self, target: str, queued: Callable[[], None] | None = None
    ) -> GateOutcome:
        ours = target == PREPARE_TARGET
        if ours:
            self.marks["gate start"].append(time.monotonic())
        outcome = await super().run_target(target, queued)
        if ours:
            self.marks["gate job done"].append(time.monotonic())
        return outcome

    async def unit_statuses(self, target: str) -> tuple[UnitStatus, ...]:
        statuses = await super().unit_statuses(target)
        if target == PREPARE_TARGET:
            self.marks["statuses read"].append(time.monotonic())
        return statuses


async def _rounds(host: AgentHost, address: str, rounds: int) -> dict[str, list[float]]:
    marks: dict[str, list[float]] = {step: [] for step in (*STEPS, LATE[1])}
    original = Custody.preserve_and_prepare

    async def timed(self: Custody) -> Any:
        marks["kernel start"].append(time.monotonic())
        try:
            return await original(self)
        finally:
            marks["kernel done"].append(time.monotonic())

    patched: Callable[[Custody], Awaitable[Any]] = timed
    Custody.preserve_and_prepare = patched  # type: ignore[method-assign,assignment]
    gate = TimedGate(marks, address)
    try:
        async with host.boot() as boot:
            boot.agent.gate = gate
            client = await Client.connect(address)
            for _ in range(rounds):
                prepared = client.arm_phase("prepared")
                marks["call"].append(time.monotonic())
                update_id, _ = await client.agent("Prepare", "a{sv}", [{}])
                await asyncio.wait_for(prepared, 60)
                marks["prepared signal"].append(time.monotonic())
                idle = client.arm_phase("idle")
                await client.agent("Cancel", "s", [update_id])
                await asyncio.wait_for(idle, 60)
            client.close()
    finally:
        Custody.preserve_and_prepare = original  # type: ignore[method-assign]
        await gate.close()
    return marks


def main(participants: int = 1, rounds: int = 12) -> None:
    with tempfile.TemporaryDirectory(prefix="luo-bench-profile-") as tmp:
        runtime = Path(tempfile.mkdtemp(prefix="luo-bench-run-", dir="/dev/shm"))
        tb = Testbed(Path(tmp) / "testbed", "session")
        host = AgentHost(Path(tmp), runtime, "session", "6.19", 1)
        host.machine.boot()
        log = open(Path(tmp) / "agent.log", "w")  # noqa: SIM115
        saved, sys.stderr = sys.stderr, log
        configure_logging("journal", "info")
        try:
            with contextlib.ExitStack() as stack, notify_sink(Path(tmp)):
                units = participant_units(participants)
                sandbox = tb.boot_sandbox(stack, extra_units=units, enable=list(units), start=())
                # The in-process agent's runtime directory is not the sandbox's /run/luo-agent,
                # where the targets look for their markers.
                active = sandbox.path_inside("/run/luo-agent/active")
                active.mkdir(parents=True, exist_ok=True)
                for marker in ("prepare", "cancel"):
                    (active / marker).touch()
                os.environ["DBUS_SESSION_BUS_ADDRESS"] = sandbox.bus_address
                marks = asyncio.run(_rounds(host, sandbox.bus_address, rounds))
        finally:
            sys.stderr = saved
            log.close()
            host.machine.poweroff()
    skip = 2  # warm-up rounds
    calls, signals = marks["call"][skip:], marks["prepared signal"][skip:]
    total = [b - a for a, b in zip(calls, signals, strict=True)]
    print(f"prepare with {participants} participant(s), in-process agent + real systemd: "
          f"median {statistics.median(total) * 1e3:.2f} ms over {len(total)} rounds")  # fmt: skip
    for first, second in itertools.pairwise(STEPS):
        spans = [b - a for a, b in zip(marks[first][skip:], marks[second][skip:], strict=True)]
        print(f"  {first:>15} → {second:<15} {statistics.median(spans) * 1e3:6.2f} ms")
    first, second = LATE
    spans = [b - a for a, b in zip(marks[first][skip:], marks[second][skip:], strict=True)]
    print(f"  {first:>15} → {second:<15} {statistics.median(spans) * 1e3:6.2f} ms  (off the path)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
