"""Trace points in the daemon for ``bench.trace_prepare``; imported at interpreter start-up (this
directory is put on the agent's ``PYTHONPATH`` by a unit drop-in), inert without
``LUO_BENCH_TRACE``.  Each point appends ``<CLOCK_MONOTONIC ns> <thread> <step>`` to that file;
the bench client writes to the same file, so one clock orders both processes.

``LUO_BENCH_FLOOR=1`` also takes out of the daemon what a prepare does besides its hops: the
caller's identification (taken as root), the state file and current.json (the markers, which the
targets check, stay) and all kernel work.  What is left is the floor of the design.
"""

from __future__ import annotations

import functools
import inspect
import os
import threading
import time
from typing import Any

_PATH = os.environ.get("LUO_BENCH_TRACE", "")


def _install() -> None:
    fd = os.open(_PATH, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def mark(step: str) -> None:
        now = time.monotonic_ns()
        os.write(fd, f"{now} {threading.current_thread().name} {step}\n".encode())

    from luo_agent import phase as ph
    from luo_agent.agent.core import Agent
    from luo_agent.agent.custody import Custody
    from luo_agent.agent.ledger import Ledger
    from luo_agent.agent.state import KernelThread
    from luo_agent.dbus.auth import Authorizer, Caller, current_sender
    from luo_agent.dbus.manager import ManagerInterface
    from luo_agent.persist import RuntimeState
    from luo_agent.systemd import pystemd_calls
    from luo_agent.systemd.pystemd_gate import PystemdGate
    from luo_agent.systemd.pystemd_thread import BusThread

    floor = os.environ.get("LUO_BENCH_FLOOR") == "1"

    def around(cls: Any, name: str, before: str, after: str = "") -> None:
        """Mark ``before`` each call of ``cls.name`` and ``after`` it (sync or async; "" marks
        nothing)."""
        original = getattr(cls, name)
        if inspect.iscoroutinefunction(original):

            async def wrapper(*args: Any, **kwargs: Any) -> Any:
                if before:
                    mark(before)
                try:
                    return await original(*args, **kwargs)
                finally:
                    if after:
                        mark(after)

        else:

            def wrapper(*args: Any, **kwargs: Any) -> Any:
                if before:
                    mark(before)
                try:
                    return original(*args, **kwargs)
                finally:
                    if after:
                        mark(after)

        setattr(cls, name, functools.wraps(original)(wrapper))

    # The loop.
    original_identify = Authorizer.identify

    async def identify(self: Authorizer) -> Caller:
        mark("call reaches the agent")
        caller = Caller(current_sender(), 0, 0) if floor else await original_identify(self)
        mark("caller identified")
        return caller

    Authorizer.identify = identify  # type: ignore[method-assign]
    original_apply = Agent._apply

    def apply(self: Agent, event: ph.Event) -> None:
        mark(f"{type(event).__name__} applied")
        original_apply(self, event)

    Agent._apply = apply  # type: ignore[method-assign]
    original_save = Ledger._save_phase

    def save_phase(self: Ledger, new: ph.Phase, previous: ph.Phase) -> Any:
        ended = original_save(self, new, previous)
        mark(f"'{new}' saved")
        return ended

    Ledger._save_phase = save_phase  # type: ignore[method-assign]
    original_changed = ManagerInterface.phase_changed

    def phase_changed(self: ManagerInterface, record: Any, phase: ph.Phase) -> None:
        original_changed(self, record, phase)
        mark(f"'{phase}' signalled")

    ManagerInterface.phase_changed = phase_changed  # type: ignore[method-assign]
    original_run_target = PystemdGate.run_target

    async def run_target(self: PystemdGate, target: str, queued: Any = None) -> Any:
        def job_queued() -> None:
            mark("job queued (loop)")
            if queued is not None:
                queued()

        return await original_run_target(self, target, job_queued)

    PystemdGate.run_target = run_target  # type: ignore[method-assign]
    around(PystemdGate, "run_target", "gate starts (loop)", "gate returned (loop)")
    around(Custody, "preserve_registered", "kernel step starts (loop)")
    around(Custody, "prepare", "", "kernel step done (loop)")

    # The bus thread.
    sent, answered = "StartUnit sent (bus thread)", "StartUnit answered (bus thread)"
    around(pystemd_calls, "enqueue_job", sent, answered)
    original_signal = BusThread._t_on_manager_signal

    def on_signal(self: BusThread, msg: Any) -> None:
        mark(f"{msg.get_member().decode()} (bus thread)")
        original_signal(self, msg)

    BusThread._t_on_manager_signal = on_signal  # type: ignore[method-assign]

    # The kernel thread.
    original_call = KernelThread.call

    async def call(self: KernelThread, fn: Any, *args: Any) -> Any:
        def traced(*inner: Any) -> Any:
            mark(f"{getattr(fn, '__name__', 'call')} starts (kernel thread)")
            try:
                return fn(*inner)
            finally:
                mark(f"{getattr(fn, '__name__', 'call')} done (kernel thread)")

        return await original_call(self, traced, *args)

    KernelThread.call = call  # type: ignore[method-assign]

    if floor:

        async def no_kernel_step(self: Custody) -> None:
            mark("kernel step starts (loop)")

        async def no_kernel_prepare(self: Custody) -> ph.Event:
            return ph.PreparationDone()

        Custody.preserve_registered = no_kernel_step  # type: ignore[method-assign,assignment]
        Custody.preserve_metadata = no_kernel_step  # type: ignore[method-assign,assignment]
        Custody.prepare = no_kernel_prepare  # type: ignore[method-assign]
        RuntimeState.publish_phase = lambda self, phase: None  # type: ignore[method-assign]
        RuntimeState.save_current = lambda self, record: None  # type: ignore[method-assign]


if _PATH:
    _install()
