"""The real Agent in this process on a real emulated kernel, with the recording FakeGate: for the
agent's own tests and the faults where systemd is irrelevant (EBUSY, kexec failures, state files,
shutdown jobs).  The whole update under a real systemd manager is tests/e2e's."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from luo_agent.agent import Agent
from luo_agent.config import Config
from luo_agent.daemon import kernel_factory
from luo_agent.kernel.backend import FdCustody
from luo_agent.kernel.device import Abi
from luo_agent.kernel.emulator import EmulatedMachine, EmulatedSyscalls
from luo_agent.kernel.syscalls import Syscalls
from luo_agent.persist import History, RuntimeState
from luo_agent.systemd.gate import Gate
from tests.fakes.gate import FakeGate


def build_agent(
    config: Config,
    syscalls: Syscalls,
    gate: Gate,
    custody: FdCustody | None = None,
    **hooks: Any,
) -> Agent:
    """The real Agent composed as ``luo_agent/daemon.py`` composes it (its kernel through
    ``kernel_factory``, its records in the configured directories), on the test's syscalls and
    gate; ``hooks``: the Agent's ``status``, ``on_rebooted``, ``coordinator``.  The one way the
    tests and the benchmarks build an agent."""
    return Agent(
        config=config,
        open_kernel=kernel_factory(config, syscalls, custody),
        gate=gate,
        runtime=RuntimeState(config.runtime_directory),
        history=History(config.state_directory),
        **hooks,
    )


@dataclasses.dataclass
class Host:
    """One emulated machine and the agent's directories, across boots."""

    tmp: Path
    abi: str
    machine: EmulatedMachine
    statuses: list[str] = dataclasses.field(default_factory=list)

    def config(self, busy_retry_seconds: float = 5.0, **timeouts: float) -> Config:
        cfg = Config(state_directory=self.tmp / "state", runtime_directory=self.tmp / "run")
        kernel = dataclasses.replace(
            cfg.kernel,
            abi=self.abi,  # type: ignore[arg-type]  # one of ABIS, checked by the machine
            emulate_root=self.machine.root,
            busy_retry_seconds=busy_retry_seconds,
        )
        return dataclasses.replace(
            cfg, kernel=kernel, timeouts=dataclasses.replace(cfg.timeouts, **timeouts)
        )

    def build(self, gate: FakeGate, cfg: Config) -> Agent:
        return build_agent(
            cfg, EmulatedSyscalls(self.machine.root), gate, status=self.statuses.append
        )

    @contextlib.asynccontextmanager
    async def agent(self, gate: FakeGate, **config: float) -> AsyncIterator[Agent]:
        agent = self.build(gate, self.config(**config))
        runner = asyncio.create_task(agent.run())
        try:
            await agent.start()
            yield agent
        finally:
            await agent.stop()
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner

    def kernel_image(self) -> int:
        path = self.tmp / "vmlinuz"
        path.write_bytes(b"kernel" * 100)
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def kernel_files(self) -> int:
        """Files the emulated kernel holds for the next kexec."""
        info = self.machine.inspect()
        if self.abi == Abi.SESSION:
            return sum(len(s["files"]) for s in info["outgoing_sessions"])
        return len(info["files"])

    def kernel_state(self) -> str:
        info = self.machine.inspect()
        if self.abi == Abi.SESSION:
            return "prepared" if info["outgoing_sessions"] else "normal"
        return str(info["state"])


class Changes:
    def __init__(self) -> None:
        self.changed = asyncio.Event()

    def phase_changed(self, record: object, phase: object) -> None:
        self.changed.set()

    def update_finished(self, record: object) -> None:
        self.changed.set()

    def kernel_state_changed(self, value: str) -> None:
        self.changed.set()


async def until(agent: Agent, predicate: Callable[[], bool], limit: float = 10.0) -> None:
    """Wait on the agent's own change notifications until ``predicate`` holds."""
    changes = Changes()
    agent.listeners.append(changes)
    try:
        async with asyncio.timeout(limit):
            while not predicate():
                changes.changed.clear()
                await changes.changed.wait()
    finally:
        agent.listeners.remove(changes)


async def poll(predicate: Callable[[], object], limit: float = 10.0) -> None:
    """For what no notification of the agent announces (a fake PID 1's store, etcd's keys, the
    gate's calls): bounded polling."""
    for _ in range(int(limit / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached in time")


def memfd_with(data: bytes, pos: int | None = None) -> int:
    """A participant's memfd holding ``data``, its file position at ``pos`` (default: the end)."""
    fd = os.memfd_create("participant", os.MFD_CLOEXEC)
    os.write(fd, data)
    if pos is not None:
        os.lseek(fd, pos, os.SEEK_SET)
    return fd
