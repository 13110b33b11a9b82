"""1. The blackout-critical path: from the freeze gate's job completing to the kexec reboot call.

Measured on the agent itself (tests/agent_host.py's ``AgentHost``: real Agent, D-Bus service on a
private bus, journal logging, sd_notify, emulated kernel; a gate that passes at once instead of
systemd; ``instruments`` stamps the two ends).  Each iteration is an
Execute whose reboot call fails by an injected EIO (so the kernel stays prepared and the next
Execute repeats the path); a few real emulated kexecs per configuration check that the figure the
agent records itself (``UpdateRecord.blackout_critical``, read back by the next boot) agrees.

Run alone: ``python -m bench.blackout`` (the worker runs in a subprocess per configuration, so
each starts with a fresh interpreter and its logs go to a file).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from luo_agent import phase as ph
from luo_agent.agent import Agent
from luo_agent.config import Limits
from luo_agent.kernel.device import Abi
from luo_agent.log import configure_logging
from luo_agent.systemd import notify
from tests.agent_host import AgentHost
from tests.private_bus import PrivateBus

from .instruments import PhaseWaiter, StampingGate, StampingSyscalls, memfds, notify_sink
from .stats import Sample, fmt, ratio

CONFIGS = [("6.19", 1), ("6.19", 128), ("g6", 1), ("g6", 500)]


# Failed Execute attempts per update: each adds phase timings to the update's record (encoded
# into the metadata on the path), so an update retried hundreds of times is not what is measured.
RETRIES_PER_UPDATE = 10


async def _one_update(
    host: AgentHost,
    agent: Agent,
    syscalls: StampingSyscalls,
    fds: int,
    external: list[float],
    *,
    last: bool,
) -> None:
    """Register ``fds`` memfds, prepare, repeat the path with the reboot failing, then either
    kexec for real (``last``) or cancel."""
    gate, waiter = host.gate, agent.listeners[-1]
    assert isinstance(gate, StampingGate) and isinstance(waiter, PhaseWaiter)
    handed = memfds(fds)
    for token, fd in enumerate(handed, start=1):
        agent.preserve(fd, "bench", token, (), "uid=0")
        os.close(fd)
    await agent.prepare()
    await waiter.wait(ph.Phase.PREPARED)
    # One control request for all attempts: nothing else touches the machine meanwhile.
    host.machine.inject_fault("reboot", errno.EIO, count=RETRIES_PER_UPDATE)
    for _ in range(RETRIES_PER_UPDATE):
        await agent.execute()
        await waiter.wait(ph.Phase.PREPARED)
        external.append(syscalls.reboot_calls[-1] - gate.freeze_done[-1])
    if not last:
        await agent.cancel()
        await waiter.wait(ph.Phase.IDLE)
        return
    await agent.execute()
    async with asyncio.timeout(30):
        await host.down.wait()
    external.append(syscalls.reboot_calls[-1] - gate.freeze_done[-1])


async def _load_kernel(host: AgentHost, agent: Agent) -> None:
    fd = host.kernel_image()
    try:
        await agent.load_kernel(fd, -1, "console=ttyS0")
    finally:
        os.close(fd)


async def _measure(workdir: Path, profile: str, fds: int, iterations: int, reboots: int) -> Any:
    # The runtime directory on tmpfs, as /run/luo-agent is; the state directory on disk.
    runtime = Path(tempfile.mkdtemp(prefix="luo-bench-run-", dir="/dev/shm"))
    limits = Limits(max_fds_per_session=max(128, fds), max_fds_total=4096)
    host = AgentHost(
        workdir,
        Abi.SESSION,
        profile=profile,
        bus="session",
        runtime_directory=runtime,
        limits=limits,
    )
    host.machine.boot()
    syscalls = StampingSyscalls(host.machine.root)
    syscalls.reboot_calls = []
    external: list[float] = []
    recorded: list[float] = []
    per_boot = math.ceil(iterations / reboots)
    try:
        with PrivateBus(workdir) as bus:  # NOTIFY_SOCKET: read by the parent process
            os.environ["DBUS_SESSION_BUS_ADDRESS"] = bus.address
            for boot_index in range(reboots + 1):
                waiter = PhaseWaiter()
                async with host.agent(
                    StampingGate(), syscalls=syscalls, status=notify.status
                ) as agent:
                    agent.listeners.append(waiter)
                    if agent.phase is ph.Phase.UPDATED:
                        assert agent.record is not None
                        recorded.append(agent.record.blackout_critical)
                        await agent.resume()
                        await waiter.wait(ph.Phase.IDLE)
                    if boot_index == reboots:
                        break
                    await _load_kernel(host, agent)
                    updates = math.ceil(per_boot / RETRIES_PER_UPDATE)
                    for update in range(updates):
                        await _one_update(
                            host, agent, syscalls, fds, external, last=update == updates - 1
                        )
                host.machine.wait_down(timeout=30)
                host.machine.boot()
    finally:
        host.machine.poweroff()
        shutil.rmtree(runtime, ignore_errors=True)
    return {"external": external, "recorded": recorded}


def worker(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--profile", default="6.19")
    parser.add_argument("--fds", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--reboots", type=int, default=2)
    args = parser.parse_args(argv)
    configure_logging("journal", "info")  # as under systemd: key=value lines to stderr
    result = asyncio.run(
        _measure(args.workdir, args.profile, args.fds, args.iterations, args.reboots)
    )
    print(json.dumps(result))
    return 0


def measure(profile: str, fds: int, iterations: int, reboots: int) -> tuple[Sample, Sample]:
    with (
        tempfile.TemporaryDirectory(prefix="luo-bench-blackout-") as tmp,
        # Read in this process, as systemd reads it in its own: not competing for the GIL.
        notify_sink(Path(tmp)),
    ):
        log = Path(tmp) / "agent.log"
        with open(log, "wb") as err:
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "bench.blackout",
                    "--worker",
                    "--workdir",
                    tmp,
                    "--profile",
                    profile,
                    "--fds",
                    str(fds),
                    "--iterations",
                    str(iterations),
                    "--reboots",
                    str(reboots),
                ],
                stdout=subprocess.PIPE,
                stderr=err,
                timeout=240,
                check=False,
            )
        if proc.returncode != 0:
            raise RuntimeError(f"blackout worker failed:\n{log.read_text()[-3000:]}")
        data = json.loads(proc.stdout)
    name = f"{profile} {fds} fd"
    return (
        Sample.of(f"{name} (stamped)", data["external"]),
        Sample.of(f"{name} (agent's record)", data["recorded"]),
    )


def run(quick: bool = False) -> dict[str, Any]:
    iterations, reboots = (60, 1) if quick else (300, 3)
    print("\n## 1. blackout-critical path (freeze gate job done → kexec reboot call)")
    print("   agent without systemd: real Agent + D-Bus service + journal logging + sd_notify on")
    print("   the emulated session kernel; the gate passes at once (FakeGate-like)")
    results: dict[str, Any] = {}
    for profile in ("6.19", "g6"):
        samples = {}
        for p, fds in CONFIGS:
            if p != profile:
                continue
            stamped, recorded = measure(profile, fds, iterations, reboots)
            samples[fds] = stamped
            print(f"   {profile:>4} {fds:>3} fds: {stamped.describe(p99=True)}")
            print(
                f"            agent's own record over {recorded.n} real kexecs: "
                f"median {fmt(recorded.median)}"
            )
        low, high = min(samples), max(samples)
        r = ratio(samples[high].median, samples[low].median)
        verdict_ms = all(s.median < 1e-3 for s in samples.values())
        print(
            f"   {profile}: {high} fds vs baseline {low} fd: ratio {r:.2f} (target < 1.2: "
            f"{'met' if r < 1.2 else 'MISSED'}); median < 1 ms: "
            f"{'met' if verdict_ms else 'MISSED'}"
        )
        results[profile] = {
            str(k): {"median": s.median, "p99": s.p99, "n": s.n} for k, s in samples.items()
        } | {"ratio": r}
    return results


if __name__ == "__main__":
    if "--worker" in sys.argv:
        sys.exit(worker([a for a in sys.argv[1:] if a != "--worker"]))
    run(quick="--quick" in sys.argv)
