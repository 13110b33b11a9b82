"""The agent without systemd, for measurements about the agent itself: the real Agent, kernel
backend, D-Bus service (on a private ``dbus-daemon``), structlog journal logging and sd_notify,
on an emulated machine, with a recording gate in place of systemd (every gate passes at once).
The gate and the syscalls stamp the two ends of the blackout-critical path."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import cast

from dbus_fast.aio import MessageBus

from luo_agent import phase as ph
from luo_agent.agent import Agent
from luo_agent.config import AbiChoice, Config, Limits
from luo_agent.dbus.server import serve
from luo_agent.kernel.emulator import EmulatedMachine, EmulatedSyscalls
from luo_agent.records import UpdateRecord
from luo_agent.systemd import notify
from luo_agent.systemd.gate import GateOutcome
from tests.fakes.agent_host import build_agent
from tests.fakes.gate import FakeGate
from tests.private_bus import PrivateBus

FREEZE_TARGET = ph.SPECS[ph.Phase.FREEZING].target


class StampingGate(FakeGate):
    """tests/fakes/gate.py's FakeGate (every target passes at once) that stamps the freeze
    target's completion just before the agent sees it: the start of the blackout-critical path."""

    def __init__(self) -> None:
        super().__init__()
        self.freeze_done: list[float] = []

    async def run_target(
        self, target: str, queued: Callable[[], None] | None = None
    ) -> GateOutcome:
        outcome = await super().run_target(target, queued)
        if target == FREEZE_TARGET:
            self.freeze_done.append(time.monotonic())
        return outcome


class StampingSyscalls(EmulatedSyscalls):
    """Stamps the moment the kexec reboot call is made (the end of the path)."""

    reboot_calls: list[float]

    def reboot_kexec(self) -> None:
        self.reboot_calls.append(time.monotonic())
        super().reboot_kexec()


@contextlib.contextmanager
def private_bus(workdir: Path) -> Iterator[str]:
    """A plain session dbus-daemon (no systemd manager) on a socket under ``workdir``."""
    with PrivateBus(workdir) as bus:
        yield f"unix:path={bus.socket}"


class NotifySink:
    """A NOTIFY_SOCKET that is read all the time, as systemd reads it: a unix datagram queue holds
    only ``net.unix.max_dgram_qlen`` (10) messages, after which sd_notify blocks the sender."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(str(path))
        self.messages: list[tuple[float, bytes]] = []
        self._thread = threading.Thread(target=self._read, name="notify-sink", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            data = self.sock.recv(4096)
            if data == b"BENCH-STOP":
                return
            self.messages.append((time.monotonic(), data))

    def close(self) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as waker:
            waker.sendto(b"BENCH-STOP", str(self.path))
        self._thread.join(timeout=5)
        self.sock.close()


@contextlib.contextmanager
def notify_sink(workdir: Path) -> Iterator[NotifySink]:
    """Point the agent's sd_notify (STATUS=, READY=1) at a NotifySink, as under systemd."""
    sink = NotifySink(workdir / "notify")
    old = os.environ.get("NOTIFY_SOCKET")
    os.environ["NOTIFY_SOCKET"] = str(sink.path)
    try:
        yield sink
    finally:
        if old is None:
            del os.environ["NOTIFY_SOCKET"]
        else:
            os.environ["NOTIFY_SOCKET"] = old
        sink.close()


class PhaseWaiter:
    """An AgentListener: wait for a phase (or the end of an update) without polling."""

    def __init__(self) -> None:
        self._events: dict[ph.Phase, asyncio.Event] = {}
        self.finished: list[UpdateRecord] = []

    def event(self, phase: ph.Phase) -> asyncio.Event:
        return self._events.setdefault(phase, asyncio.Event())

    def phase_changed(self, record: UpdateRecord | None, phase: ph.Phase) -> None:
        self.event(phase).set()

    def update_finished(self, record: UpdateRecord) -> None:
        self.finished.append(record)

    def kernel_state_changed(self, value: str) -> None:
        pass

    async def wait(self, phase: ph.Phase, seconds: float = 30.0) -> None:
        event = self.event(phase)
        async with asyncio.timeout(seconds):
            await event.wait()
        event.clear()


@dataclasses.dataclass
class Boot:
    agent: Agent
    gate: StampingGate
    syscalls: StampingSyscalls
    waiter: PhaseWaiter
    bus: MessageBus
    rebooted: asyncio.Event


class AgentHost:
    """One emulated machine and the agent's directories, across (emulated) boots."""

    def __init__(
        self, workdir: Path, runtime: Path, abi: str, profile: str | None, max_fds: int
    ) -> None:
        self.workdir = workdir
        self.machine = EmulatedMachine(workdir / "machine", abi, profile)
        cfg = Config(
            state_directory=workdir / "state",
            runtime_directory=runtime,
            bus="session",
            limits=Limits(max_fds_per_session=max(128, max_fds), max_fds_total=4096),
        )
        kernel = dataclasses.replace(
            cfg.kernel, abi=cast(AbiChoice, abi), emulate_root=self.machine.root
        )
        self.config = dataclasses.replace(cfg, kernel=kernel)
        self.kernel_image = workdir / "vmlinuz"
        self.kernel_image.write_bytes(b"emulated kernel image\n" * 64)

    @contextlib.asynccontextmanager
    async def boot(self) -> AsyncIterator[Boot]:
        """Start the agent (and its D-Bus service) on the running machine, as the daemon does."""
        gate = StampingGate()
        syscalls = StampingSyscalls(self.machine.root)
        syscalls.reboot_calls = []
        rebooted = asyncio.Event()
        agent = build_agent(
            self.config, syscalls, gate, status=notify.status, on_rebooted=rebooted.set
        )
        waiter = PhaseWaiter()
        agent.listeners.append(waiter)
        runner = asyncio.create_task(agent.run())
        try:
            await agent.start()
            bus, _ = await serve(agent, "session")
            try:
                yield Boot(agent, gate, syscalls, waiter, bus, rebooted)
            finally:
                if self.machine.running:
                    await agent.stop()
                bus.disconnect()
        finally:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner

    async def load_kernel(self, agent: Agent) -> None:
        fd = os.open(self.kernel_image, os.O_RDONLY | os.O_CLOEXEC)
        try:
            await agent.load_kernel(fd, -1, "console=ttyS0")
        finally:
            os.close(fd)


def memfds(count: int, size: int = 4096) -> list[int]:
    fds = []
    for index in range(count):
        fd = os.memfd_create(f"bench-{index}", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        fds.append(fd)
    return fds
