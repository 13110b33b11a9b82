"""Figure 2's prepare with one participant, traced across processes, and the design's floor.

``python -m bench.trace_prepare [runs]`` runs ``runs`` (default 3) interleaved pairs of figure 2's
one-participant case, 10 timed rounds each: the agent as it is, and its floor (``trace_hooks``:
no caller identification, no state file or current.json, no kernel work).  The daemon carries
the trace points of ``trace_hooks/sitecustomize.py`` (a unit drop-in puts them on its
``PYTHONPATH``) and the client two more, all on one clock.  Prints each run's ratio to the plain
client and, per variant, the median time of each step from the client's call.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

from luo_agent.testbed import Testbed

from .on_systemd import MARKER, _phase_overhead, participant_units
from .stats import ratio

HOOKS = Path(__file__).resolve().parent / "trace_hooks"
CALL, DONE = "client calls Prepare", "client has PhaseChanged(prepared)"
JOB_DONE, GATE_RETURNED = "JobRemoved (bus thread)", "gate returned (loop)"
STEPS = (
    CALL,
    "call reaches the agent",
    "caller identified",
    "Prepare applied",
    "'preparing' saved",
    "gate starts (loop)",
    "StartUnit sent (bus thread)",
    "StartUnit answered (bus thread)",
    "job queued (loop)",
    "'preparing' signalled",
    JOB_DONE,
    GATE_RETURNED,
    "GateOk applied",
    "kernel step starts (loop)",
    "in_kernel starts (kernel thread)",
    "in_kernel done (kernel thread)",
    "kernel step done (loop)",
    "PreparationDone applied",
    "'prepared' saved",
    "'prepared' signalled",
    DONE,
)
VARIANTS = ("agent", "floor")


def _rounds(trace: Path) -> list[dict[str, float]]:
    """Per timed round, each step's time in ms after the client's call (the first round warms up).
    A round runs until the next call: the daemon may write its last marks after the client has the
    signal.  A step's first occurrence counts, except the job's end: the last JobRemoved before the
    gate returned, the target's own (the participant's comes first)."""
    marks: list[list[tuple[str, float]]] = []
    for line in trace.read_text().splitlines():
        ns, _thread, step = line.split(" ", 2)
        if step == CALL:
            marks.append([])
        if marks:
            marks[-1].append((step, int(ns) / 1e6))
    rounds: list[dict[str, float]] = []
    for current in marks[1:]:
        start, times = current[0][1], {}
        for name, at in current:
            if name == GATE_RETURNED:
                break
            if name == JOB_DONE:
                times[JOB_DONE] = at - start
        for name, at in current:
            times.setdefault(name, at - start)
        if DONE in times:
            rounds.append(times)
    return rounds


def _one_run(floor: bool, workdir: Path) -> tuple[float, list[dict[str, float]]]:
    trace = workdir / "trace.log"
    tb = Testbed(workdir, "session")
    tb.machine.boot()
    try:
        with contextlib.ExitStack() as stack:
            units = participant_units(1)
            sandbox = tb.boot_sandbox(stack, extra_units=units, enable=list(units), start=())
            dropin = (
                "[Service]\n"
                f"Environment=PYTHONPATH={HOOKS} LUO_BENCH_TRACE={trace}"
                f" LUO_BENCH_FLOOR={int(floor)}\n"
            )
            sandbox.install_units([], {"luo-agent.service.d/60-trace.conf": dropin})
            sandbox.systemctl("start", "luo-agent.service")
            with trace.open("a", buffering=1) as out:

                def mark(step: str) -> None:
                    out.write(f"{time.monotonic_ns()} client {step}\n")

                agent, plain = asyncio.run(
                    _phase_overhead(tb, sandbox.bus_address, sandbox.path_inside(MARKER), 10, mark)
                )
    finally:
        tb.machine.poweroff()
    return ratio(statistics.median(agent), statistics.median(plain)), _rounds(trace)


def main(runs: int = 3) -> None:
    ratios: dict[str, list[float]] = {v: [] for v in VARIANTS}
    rounds: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    for _ in range(runs):  # interleaved: drift in the host's load hits both variants alike
        for variant in VARIANTS:
            with tempfile.TemporaryDirectory(prefix=f"luo-bench-trace-{variant}-") as tmp:
                r, traced = _one_run(variant == "floor", Path(tmp))
            ratios[variant].append(r)
            rounds[variant].extend(traced)
    print("prepare with 1 participant, ratio to the plain client per run (target < 1.25):")
    for variant in VARIANTS:
        print(f"  {variant:>5}: " + " ".join(f"{r:.2f}" for r in ratios[variant]))
    print("\nmedian ms after the client's call (n rounds having the step):")
    print(f"  {'step':<36}" + "".join(f"{v:>16}" for v in VARIANTS))
    for step in STEPS:
        cells = []
        for variant in VARIANTS:
            times = [t[step] for t in rounds[variant] if step in t]
            cells.append(f"{statistics.median(times):8.2f} (n={len(times):2})" if times else "—")
        print(f"  {step:<36}" + "".join(f"{c:>16}" for c in cells))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
