"""What the benchmarks add to the tests' ``AgentHost`` (tests/agent_host.py): a gate and syscalls
that stamp the two ends of the blackout-critical path, a NOTIFY_SOCKET read as systemd reads it,
a phase waiter, and participants' memfds."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from luo_agent import phase as ph
from luo_agent.kernel.emulator import EmulatedSyscalls
from luo_agent.records import UpdateRecord
from luo_agent.systemd.gate import GateOutcome
from tests.fakes.gate import FakeGate

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


def memfds(count: int, size: int = 4096) -> list[int]:
    fds = []
    for index in range(count):
        fd = os.memfd_create(f"bench-{index}", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        fds.append(fd)
    return fds
