"""4. Start-up (agent start → READY=1, peak RSS) and 5. idle cost (wake-ups over 30 s) of the
daemon itself: ``python -m luo_agent`` run directly, as its unit runs it, against a real systemd
user manager and bus (a Testbed sandbox without the agent unit) and the emulated kernel, with
``NOTIFY_SOCKET`` pointing at a socket read here and the watchdog on (``WATCHDOG_USEC=10 s``,
``WATCHDOG_PID`` = the agent), so the only periodic work should be the watchdog ping (every 5 s).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from luo_agent.testbed import Testbed

from .instruments import NotifySink
from .stats import Sample, ratio

# What the daemon imports to run (python -X importtime -m luo_agent lists them).
# The baseline sends READY=1 the same way once imported, so both are timed spawn → READY=1.
BARE_IMPORTS = (
    "import asyncio, dbus_fast.aio, pystemd.dbuslib, structlog;"
    " import luo_agent.daemon, luo_agent.dbus.server, luo_agent.kernel.emulator;"
    " import luo_agent.systemd.notify as n; n.ready()"
)
WATCHDOG_USEC = 10_000_000


def _agent_argv(tb: Testbed, runtime: Path) -> list[str]:
    # WATCHDOG_PID must be the agent's own pid: set by the shell that then execs it.
    return [
        "/bin/sh",
        "-c",
        'WATCHDOG_PID=$$ exec "$@"',
        "sh",
        sys.executable,
        "-m",
        "luo_agent",
        "--session-bus",
        "--user-manager",
        "--emulate",
        str(tb.machine.root),
        "--abi",
        "session",
        "--state-directory",
        str(tb.agent_state),
        "--runtime-directory",
        str(runtime),
        "--log",
        "journal",
    ]


def _wait_for(sink: NotifySink, needle: bytes, since: int, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for stamp, data in sink.messages[since:]:
            if needle in data.split(b"\n"):
                return stamp
        time.sleep(0.001)  # the harness's own wait; the agent is not polled
    raise TimeoutError(f"no {needle!r} from the agent")


def _status_field(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise KeyError(name)


def _switches(pid: int) -> dict[str, int]:
    """Context switches (voluntary + involuntary) of every thread, by thread name."""
    out: dict[str, int] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            comm = (task / "comm").read_text().strip()
            total = sum(
                int(line.split()[1])
                for line in (task / "status").read_text().splitlines()
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"))
            )
            role = "main thread" if task.name == str(pid) else "thread"
            out[f"{role} {task.name} ({comm})"] = total
    return out


def run(quick: bool = False) -> dict[str, Any]:
    rounds = 3 if quick else 7
    idle_seconds = 10.0 if quick else 30.0
    print("\n## 4. start-up and 5. idle cost (python -m luo_agent run directly; real systemd")
    print("   user manager and bus in a sandbox; emulated session kernel; watchdog 10 s)")
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="luo-bench-daemon-") as tmp:
        tb = Testbed(Path(tmp), "session")
        runtime = Path(tempfile.mkdtemp(prefix="luo-bench-run-", dir="/dev/shm"))
        tb.machine.boot()
        sink = NotifySink(Path(tmp) / "notify")
        try:
            with contextlib.ExitStack() as stack:
                sandbox = tb.boot_sandbox(stack, enable=(), start=())
                env = dict(os.environ) | {
                    "DBUS_SESSION_BUS_ADDRESS": sandbox.bus_address,
                    "NOTIFY_SOCKET": str(sink.path),
                    "WATCHDOG_USEC": str(WATCHDOG_USEC),
                }
                ready: list[float] = []
                bare: list[float] = []
                rss: list[float] = []
                idle: dict[str, Any] = {}
                log = open(Path(tmp) / "agent.log", "wb")  # noqa: SIM115
                stack.callback(log.close)
                for index in range(rounds):
                    # The baseline: a bare interpreter importing the same libraries.
                    since = len(sink.messages)
                    started = time.monotonic()
                    subprocess.run([sys.executable, "-c", BARE_IMPORTS], check=True, env=env)
                    bare.append(_wait_for(sink, b"READY=1", since, 30) - started)
                    since = len(sink.messages)
                    started = time.monotonic()
                    proc = subprocess.Popen(
                        _agent_argv(tb, runtime),
                        env=env,
                        stdout=log,
                        stderr=log,
                        stdin=subprocess.DEVNULL,
                    )
                    try:
                        ready.append(_wait_for(sink, b"READY=1", since, 30) - started)
                        if index == rounds - 1:
                            idle = _idle(proc.pid, sink, idle_seconds)
                        rss.append(_status_field(proc.pid, "VmHWM") / 1024)
                    finally:
                        proc.send_signal(signal.SIGTERM)
                        proc.wait(timeout=30)
        finally:
            sink.close()
            tb.machine.poweroff()
            shutil.rmtree(runtime, ignore_errors=True)
    r_ready, r_bare = Sample.of("ready", ready), Sample.of("bare", bare)
    r = ratio(r_ready.median, r_bare.median)
    peak = max(rss)
    print(f"   agent start → READY=1: {r_ready.describe()}")
    print(f"   baseline bare interpreter importing the same libraries: {r_bare.describe()}")
    print(f"   ratio {r:.2f}")
    print(
        f"   peak RSS (VmHWM) after READY=1: max {peak:.1f} MB over {len(rss)} runs "
        f"(target < 60 MB: {'met' if peak < 60 else 'MISSED'})"
    )
    print(
        f"   idle {idle['seconds']:.0f} s after READY=1: {idle['switches']} context switches "
        f"in all threads; {idle['pings']} watchdog pings (expected "
        f"{idle['seconds'] / (WATCHDOG_USEC / 2e6):.0f}); other notify messages: "
        f"{idle['other']}"
    )
    for thread, count in idle["threads"].items():
        print(f"      {thread}: {count}")
    per_ping = idle["switches"] / max(1, idle["pings"])
    print(
        f"   → {per_ping:.1f} switches per watchdog ping "
        f"({'no polling loop' if per_ping <= 3 else 'POLLING'})"
    )
    out.update(ready=r_ready.median, bare=r_bare.median, ratio=r, peak_rss_mb=peak, idle=idle)
    return out


def _idle(pid: int, sink: NotifySink, seconds: float) -> dict[str, Any]:
    time.sleep(1.0)  # let start-up work (the gate's bus thread connecting) settle
    before, since = _switches(pid), len(sink.messages)
    time.sleep(seconds)
    after, messages = _switches(pid), sink.messages[since:]
    threads = {name: after[name] - before.get(name, 0) for name in after}
    pings = sum(1 for _, data in messages if data.strip() == b"WATCHDOG=1")
    return {
        "seconds": seconds,
        "switches": sum(threads.values()),
        "threads": threads,
        "pings": pings,
        "other": len(messages) - pings,
    }


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
