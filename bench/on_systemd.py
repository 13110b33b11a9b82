"""2. Phase overhead and 3. D-Bus latency/throughput, with the real daemon (``luo-agent.service``)
under a real systemd user manager and bus (``luo_agent.testbed.Testbed``, session ABI)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from luo_agent.kernel.device import Abi
from luo_agent.kernel.emulator import EmulatedSyscalls
from luo_agent.kernel.session_backend import SessionBackend
from luo_agent.records import UpdateRecord
from luo_agent.testbed import Testbed

from .busclient import Client
from .stats import Sample, fmt, ratio

PREPARE_TARGET = "liveupdate-prepare.target"
CANCEL_TARGET = "liveupdate-cancel.target"
MARKER = "/run/luo-agent/active/prepare"  # the target asserts it: only the agent starts it


def participant_units(count: int) -> dict[str, str]:
    unit = (
        "[Unit]\nDescription=bench participant\nDefaultDependencies=no\n"
        f"Before={PREPARE_TARGET}\nPartOf={PREPARE_TARGET}\n"
        "[Service]\nType=oneshot\nExecStart=/bin/true\n"
        f"[Install]\nRequiredBy={PREPARE_TARGET}\n"
    )
    return {f"bench-participant-{i}.service": unit for i in range(count)}


async def _phase_overhead(
    tb: Testbed,
    address: str,
    marker: Path,
    rounds: int,
    mark: Callable[[str], None] = lambda step: None,
) -> Any:
    client = await Client.connect(address)
    await client.subscribe_systemd()
    agent_times: list[float] = []
    plain_times: list[float] = []
    try:
        for index in range(rounds + 1):  # the first round warms both paths up
            # The agent: Prepare over D-Bus until the "prepared" signal, then cancel (untimed).
            prepared = client.arm_phase("prepared")
            mark("client calls Prepare")
            started = time.monotonic()
            update_id, _ = await client.agent("Prepare", "a{sv}", [{}])
            await asyncio.wait_for(prepared, 60)
            elapsed = time.monotonic() - started
            mark("client has PhaseChanged(prepared)")
            idle = client.arm_phase("idle")
            await client.agent("Cancel", "s", [update_id])
            await asyncio.wait_for(idle, 60)
            # The agent stops the cancel target after "idle": not while the plain client runs.
            await client.settled(CANCEL_TARGET)
            # A plain client: the same target on the same manager, waiting for its job.
            marker.touch()  # noqa: ASYNC240 - a tmpfs file, before the timed part
            try:
                started = time.monotonic()
                result = await client.run_job("StartUnit", PREPARE_TARGET, "fail")
                plain = time.monotonic() - started
                assert result == "done", result
                await client.run_job("StopUnit", PREPARE_TARGET, "replace")  # rerun next time
            finally:
                marker.unlink()  # noqa: ASYNC240
            if index:
                agent_times.append(elapsed)
                plain_times.append(plain)
    finally:
        client.close()
    return agent_times, plain_times


def _kernel_work(tb: Testbed, rounds: int) -> list[float]:
    """What the agent's prepare asks of the (emulated) kernel with no client fds: open the
    device, create the agent's session, write and preserve the metadata memfd; then cancel."""
    times = []
    for _ in range(rounds):
        backend = SessionBackend(EmulatedSyscalls(tb.machine.root))
        record = UpdateRecord(id="bench", abi=Abi.SESSION)
        started = time.monotonic()
        backend.preserve([], record)
        backend.update_metadata(record)
        backend.prepare()
        times.append(time.monotonic() - started)
        backend.cancel()
    return times


def phase_overhead(quick: bool) -> dict[str, Any]:
    print("\n## 2. phase overhead: the agent's prepare (D-Bus Prepare → 'prepared' signal) vs a")
    print("   plain client starting liveupdate-prepare.target and waiting for its job (same")
    print("   systemd user manager, N oneshot participants RequiredBy= the target)")
    rounds = 4 if quick else 10
    out: dict[str, Any] = {}
    for count in (1, 50):
        with tempfile.TemporaryDirectory(prefix="luo-bench-phase-") as tmp:
            tb = Testbed(Path(tmp), "session")
            tb.machine.boot()
            try:
                with contextlib.ExitStack() as stack:
                    units = participant_units(count)
                    sandbox = tb.boot_sandbox(
                        stack, extra_units=units, enable=list(units), start=["luo-agent.service"]
                    )
                    marker = sandbox.path_inside(MARKER)
                    agent, plain = asyncio.run(
                        _phase_overhead(tb, sandbox.bus_address, marker, rounds)
                    )
                    kernel = _kernel_work(tb, rounds)  # the agent is idle now
            finally:
                tb.machine.poweroff()
        a, p = Sample.of("agent", agent), Sample.of("plain", plain)
        r = ratio(a.median, p.median)
        print(f"   {count:>2} participants: agent {a.describe()}")
        print(f"                   baseline plain client {p.describe()}")
        verdict = "met" if r < 1.25 else "MISSED"
        print(f"                   ratio {r:.2f} (target < 1.25: {verdict})")
        k = Sample.of("kernel", kernel)
        rk = ratio(a.median - k.median, p.median)
        print(
            f"                   agent overhead {fmt(a.median - p.median)}, of which the same "
            f"kernel work on the emulator {k.describe()};"
        )
        print(f"                   ratio with the emulated kernel time taken out {rk:.2f}")
        out[str(count)] = {
            "agent": a.median,
            "plain": p.median,
            "ratio": r,
            "kernel": k.median,
            "ratio_without_emulated_kernel": rk,
        }
    return out


# ------------------------------------------------------------------------------------ 3. D-Bus


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _latency(address: str, calls: int, agent_pid: int) -> dict[str, Sample]:
    """Interleaved round trips, so every kind sees the same machine state."""
    client = await Client.connect(address)
    kinds: dict[str, Any] = {
        "agent Get Phase": lambda: client.agent(
            "Get",
            "ss",
            ["org.luoagent.LiveUpdate1.Manager", "Phase"],
            interface="org.freedesktop.DBus.Properties",
        ),
        "bus daemon GetId": client.get_id,
        "agent Peer.Ping": lambda: client.agent("Ping", interface="org.freedesktop.DBus.Peer"),
        "systemd Get Version": lambda: client.agent(
            "Get",
            "ss",
            ["org.freedesktop.systemd1.Manager", "Version"],
            interface="org.freedesktop.DBus.Properties",
            destination="org.freedesktop.systemd1",
            path="/org/freedesktop/systemd1",
        ),
    }
    times: dict[str, list[float]] = {k: [] for k in kinds}
    try:
        order = list(kinds.items())
        for index in range(calls):
            # Rotated, so no kind always follows the same other one.
            for name, fn in order[index % 4 :] + order[: index % 4]:
                started = time.monotonic()
                await fn()
                times[name].append(time.monotonic() - started)
        before = _cpu_seconds(agent_pid)
        for _ in range(calls):
            await kinds["agent Get Phase"]()
        cpu = _cpu_seconds(agent_pid) - before
    finally:
        client.close()
    samples = {k: Sample.of(k, v) for k, v in times.items()}
    samples["agent CPU per Get"] = Sample.of("cpu", [cpu / calls])
    return samples


async def _preserve_many(address: str, count: int, rounds: int) -> tuple[Sample, Sample]:
    client = await Client.connect(address)
    preserve: list[float] = []
    baseline: list[float] = []
    fds = []
    for token in range(1, count + 1):
        fd = os.memfd_create(f"bench-{token}", os.MFD_CLOEXEC)
        os.write(fd, token.to_bytes(4, "little") * 1024)
        fds.append(fd)
    try:
        for index in range(rounds):
            started = time.monotonic()
            for token, fd in enumerate(fds, start=1):
                await client.agent("Preserve", "hsta{sv}", [0, "bench", token, {}], unix_fds=[fd])
            preserve.append(time.monotonic() - started)
            started = time.monotonic()
            for _ in fds:
                await client.get_id()
            baseline.append(time.monotonic() - started)
            if index < rounds - 1:  # the last round stays registered for the kexec
                for token in range(1, count + 1):
                    await client.agent("Unpreserve", "st", ["bench", token])
    finally:
        for fd in fds:
            os.close(fd)
        client.close()
    return Sample.of("Preserve x128", preserve), Sample.of("GetId x128", baseline)


async def _kexec(address: str) -> None:
    client = await Client.connect(address)
    try:
        prepared = client.arm_phase("prepared")
        update_id, _ = await client.agent("Prepare", "a{sv}", [{}])
        await asyncio.wait_for(prepared, 60)
        await client.agent("Execute", "s", [update_id])
    finally:
        client.close()


async def _retrieve_many(address: str, count: int) -> tuple[float, float, bool, float]:
    client = await Client.connect(address)
    try:
        restored = client.arm_phase("restored")
        phase = (
            await client.agent(
                "Get",
                "ss",
                ["org.luoagent.LiveUpdate1.Manager", "Phase"],
                interface="org.freedesktop.DBus.Properties",
            )
        )[0].value
        if phase != "restored":
            await asyncio.wait_for(restored, 60)
        got = []
        started = time.monotonic()
        for token in range(1, count + 1):
            (fd,) = await client.agent("Retrieve", "st", ["bench", token])
            got.append(fd)
        elapsed = time.monotonic() - started
        started = time.monotonic()
        for _ in range(count):
            await client.get_id()
        baseline = time.monotonic() - started
        intact = all(
            os.pread(fd, 4096, 0) == token.to_bytes(4, "little") * 1024
            for token, fd in enumerate(got, start=1)
        )
        for fd in got:
            os.close(fd)
        idle = client.arm_phase("idle")
        (update_id,) = [
            (
                await client.agent(
                    "Get",
                    "ss",
                    ["org.luoagent.LiveUpdate1.Manager", "CurrentUpdate"],
                    interface="org.freedesktop.DBus.Properties",
                )
            )[0].value
        ]
        await client.agent("Finish", "s", [update_id])
        await asyncio.wait_for(idle, 60)
        (history,) = await client.agent("GetHistory", "u", [1])
        blackout = float(history[-1]["blackout-critical"].value)
    finally:
        client.close()
    return elapsed, baseline, intact, blackout


def dbus(quick: bool) -> dict[str, Any]:
    print("\n## 3. D-Bus (real daemon on the sandbox's dbus-daemon; client outside the sandbox)")
    calls, rounds, count = (200, 2, 128) if quick else (1000, 5, 128)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="luo-bench-dbus-") as tmp:
        # auto_finish off: the agent waits in "restored" so the bench retrieves after the kexec.
        tb = Testbed(Path(tmp), "session", agent_config="auto_finish = false\n")
        tb.machine.boot()
        try:
            with contextlib.ExitStack() as first_boot:
                sandbox = tb.boot_sandbox(first_boot, enable=(), start=["luo-agent.service"])
                agent_pid = int(
                    sandbox.systemctl("show", "-P", "MainPID", "luo-agent.service").stdout
                )
                lat = asyncio.run(_latency(sandbox.bus_address, calls, agent_pid))
                prop, getid = lat["agent Get Phase"], lat["bus daemon GetId"]
                pres, pres_base = asyncio.run(_preserve_many(sandbox.bus_address, count, rounds))
                tb.ctl(sandbox, "load-kernel", str(tb.kernel_image), "--cmdline", "console=ttyS0")
                asyncio.run(_kexec(sandbox.bus_address))
                tb.machine.wait_down(timeout=30)
            tb.machine.boot()
            with contextlib.ExitStack() as second_boot:
                sandbox = tb.boot_sandbox(second_boot, enable=(), start=["luo-agent.service"])
                retrieve, retrieve_base, intact, blackout = asyncio.run(
                    _retrieve_many(sandbox.bus_address, count)
                )
        finally:
            tb.machine.poweroff()
    r = ratio(prop.median, getid.median)
    print(f"   status property read (Get Phase): {prop.describe(p99=True)}")
    print(f"   baseline bus daemon GetId:        {getid.describe(p99=True)}")
    print(f"   ratio {r:.2f} (target < 2: {'met' if r < 2 else 'MISSED'})")
    ping, sysd = lat["agent Peer.Ping"], lat["systemd Get Version"]
    print(
        f"   references: agent Peer.Ping (dbus-fast's own reply, no agent code) "
        f"{ping.describe()} = {ratio(ping.median, getid.median):.2f}x GetId;"
    )
    print(
        f"   systemd's Get Version (C, sd-bus) {sysd.describe()} = "
        f"{ratio(sysd.median, getid.median):.2f}x GetId; agent CPU per Get "
        f"{fmt(lat['agent CPU per Get'].median)} (CPU ticks over a separate pass)"
    )
    rp = ratio(pres.median, pres_base.median)
    print(f"   Preserve {count} memfds (sequential calls): {pres.describe()}")
    print(
        f"   baseline {count} GetId round trips: {pres_base.describe()}; ratio {rp:.2f}; "
        f"target < 100 ms: {'met' if pres.median < 0.1 else 'MISSED'}"
    )
    rr = ratio(retrieve, retrieve_base)
    print(
        f"   Retrieve {count} fds after the emulated kexec: {fmt(retrieve)} (one pass); "
        f"baseline {count} GetId {fmt(retrieve_base)}; ratio {rr:.2f}; "
        f"contents intact: {'yes' if intact else 'NO'}"
    )
    print(
        f"   blackout-critical recorded by the real daemon (PystemdGate, real systemd, "
        f"{count} fds) for that kexec, from GetHistory: {fmt(blackout)} (one sample)"
    )
    out.update(
        blackout_full_stack=blackout,
        property_read=prop.median,
        getid=getid.median,
        ratio=r,
        ping=ping.median,
        systemd_get=sysd.median,
        preserve=pres.median,
        preserve_ratio=rp,
        retrieve=retrieve,
        retrieve_ratio=rr,
        intact=intact,
    )
    return out
