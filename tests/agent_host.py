"""The one way the tests and the benchmarks host the real Agent.

``AgentHost(workdir, abi)``: one emulated machine and the agent's directories across boots, and
at most one agent at a time, composed by ``build_agent`` as ``luo_agent/daemon.py`` composes it,
with a gate of the test's (by default a ``FakeGate``) in place of systemd.  What differs between
suites is a parameter:

* ``bus``: ``None`` for the agent's own tests, which call it directly; or the bus it serves on as
  the daemon does, stopping and leaving the bus after the kexec (``down`` is then set);
* ``profile`` or ``machine``: the emulated kernel;
* ``**settings``: ``Config`` fields (timeouts, limits, reboot strategy, …);
* per agent: ``start(gate, config=, syscalls=, custody=, **hooks)`` and ``stop()``, or
  ``async with host.agent(…)``; ``boot()``/``reboot()``/``close()`` drive the machine too;
* the agent as its own process: ``AgentProcess`` runs ``python -m tests.agent_host`` (``main``)
  as a child, for the security tests (another mount namespace, its fds counted, hostile callers).

Under a real systemd manager the agent is the packaged unit, hosted by ``luo_agent.testbed``
(tests/e2e, tests/faults).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from dbus_fast.aio import MessageBus

from luo_agent.agent import Agent
from luo_agent.config import BusKind, Config, load_config
from luo_agent.daemon import EX_OK, EX_UNAVAILABLE, kernel_factory
from luo_agent.dbus.bus import wait_until_stopped
from luo_agent.dbus.server import serve
from luo_agent.kernel.backend import FdCustody
from luo_agent.kernel.device import Abi
from luo_agent.kernel.emulator import EmulatedMachine, EmulatedSyscalls
from luo_agent.kernel.syscalls import Syscalls
from luo_agent.log import configure_logging
from luo_agent.persist import History, RuntimeState
from luo_agent.systemd.gate import Gate
from tests.fakes.gate import FakeGate
from tests.private_bus import HarnessError, end_process, read_line

REPO = Path(__file__).resolve().parents[1]


def build_agent(
    config: Config,
    syscalls: Syscalls,
    gate: Gate,
    custody: FdCustody | None = None,
    **hooks: Any,
) -> Agent:
    """The real Agent composed as ``luo_agent/daemon.py`` composes it (its kernel through
    ``kernel_factory``, its records in the configured directories), on the test's syscalls and
    gate; ``hooks``: the Agent's ``status``, ``on_rebooted``, ``coordinator``."""
    return Agent(
        config=config,
        open_kernel=kernel_factory(config, syscalls, custody),
        gate=gate,
        runtime=RuntimeState(config.runtime_directory),
        history=History(config.state_directory),
        **hooks,
    )


class AgentHost:
    """One emulated machine and the agent's directories, across boots (see the module doc)."""

    def __init__(
        self,
        workdir: Path,
        abi: Abi,
        machine: EmulatedMachine | None = None,
        *,
        profile: str | None = None,
        bus: BusKind | None = None,
        **settings: Any,
    ) -> None:
        self.workdir = workdir
        self.abi = abi
        self.machine = machine or EmulatedMachine(workdir / "machine", abi, profile)
        self.serves_on = bus
        self.settings = settings
        self.statuses: list[str] = []  # every STATUS= the agent reported
        self.gate = FakeGate()
        self.started: Agent | None = None
        self.bus: MessageBus | None = None
        self.down = asyncio.Event()  # set once a served agent stopped after its kexec
        self._runner: asyncio.Task[None] | None = None
        self._stopper: asyncio.Task[None] | None = None

    @property
    def runtime_directory(self) -> Path:
        return Path(self.settings.get("runtime_directory", self.workdir / "run"))

    def config(self, busy_retry_seconds: float = 5.0, **timeouts: float) -> Config:
        """What the daemon would load: the host's directories, machine and settings, then
        ``timeouts`` by step name."""
        fields: dict[str, Any] = {
            "state_directory": self.workdir / "state",
            "runtime_directory": self.runtime_directory,
        }
        if self.serves_on is not None:
            fields["bus"] = self.serves_on
        cfg = Config(**(fields | self.settings))
        kernel = dataclasses.replace(
            cfg.kernel,
            abi=self.abi,
            emulate_root=self.machine.root,
            busy_retry_seconds=busy_retry_seconds,
        )
        return dataclasses.replace(
            cfg, kernel=kernel, timeouts=dataclasses.replace(cfg.timeouts, **timeouts)
        )

    def build(self, gate: Gate, cfg: Config) -> Agent:
        """An agent not started (a test that drives ``start`` itself)."""
        return build_agent(
            cfg, EmulatedSyscalls(self.machine.root), gate, status=self.statuses.append
        )

    async def start(
        self,
        gate: FakeGate | None = None,
        *,
        config: Config | None = None,
        syscalls: Syscalls | None = None,
        custody: FdCustody | None = None,
        **hooks: Any,
    ) -> Agent:
        """An agent on the running machine, started (and served) as the daemon does."""
        self.gate = gate or FakeGate()
        self.down = asyncio.Event()
        config = config or self.config()
        defaults: dict[str, Any] = {"status": self.statuses.append}
        if self.serves_on is not None:
            defaults["on_rebooted"] = self._after_kexec
        agent = build_agent(
            config,
            syscalls or EmulatedSyscalls(self.machine.root),
            self.gate,
            custody,
            **(defaults | hooks),
        )
        self._runner = asyncio.create_task(agent.run(), name="agent")
        self.started = agent
        await agent.start()
        if self.serves_on is not None:
            self.bus, _ = await serve(agent, config.bus)
        return agent

    def _after_kexec(self) -> None:
        self._stopper = asyncio.create_task(self._stop_after_kexec())

    async def _stop_after_kexec(self) -> None:
        await self.stop()
        self.down.set()

    async def stop(self) -> None:
        """Stop the agent (what systemd stopping the unit does) and leave the bus."""
        if self._stopper is not None and self._stopper is not asyncio.current_task():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._stopper, 30)
        agent, self.started = self.started, None
        if agent is not None:
            await agent.stop()
        if self.bus is not None:
            await disconnect(self.bus)
            self.bus = None
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None

    @contextlib.asynccontextmanager
    async def agent(self, gate: FakeGate | None = None, **how: Any) -> AsyncIterator[Agent]:
        """``start(gate, **how)`` for the block, then ``stop()``."""
        try:
            yield await self.start(gate, **how)
        finally:
            await self.stop()

    def power_on(self) -> None:
        """Boot the machine; ``/run`` is empty after a boot."""
        shutil.rmtree(self.runtime_directory, ignore_errors=True)
        self.machine.boot()

    async def boot(self, gate: FakeGate | None = None) -> None:
        """Boot the machine and start an agent on it."""
        await asyncio.to_thread(self.power_on)
        await self.start(gate)

    async def reboot(self, gate: FakeGate | None = None) -> None:
        """After Execute: wait for the kexec to take the machine down, then boot again."""
        await asyncio.wait_for(self.down.wait(), 30)
        await asyncio.to_thread(self.machine.wait_down)
        await self.boot(gate)

    async def close(self) -> None:
        await self.stop()
        await asyncio.to_thread(self.machine.poweroff)

    def kernel_image(self) -> int:
        path = self.workdir / "vmlinuz"
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


async def disconnect(bus: MessageBus) -> None:
    bus.disconnect()
    # CancelledError too: a waiter of the connection's end (wait_until_stopped) cancels it.
    with contextlib.suppress(Exception, asyncio.CancelledError):
        await asyncio.wait_for(bus.wait_for_disconnect(), 5)  # type: ignore[no-untyped-call]


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


# ------------------------------------------------------------------- the agent as its own process


class AgentProcess:
    """The agent as its own process (``python -m tests.agent_host``), a child of the test,
    optionally entered into a namespace first."""

    def __init__(
        self,
        workdir: Path,
        machine: EmulatedMachine,
        bus: str,
        *,
        env: dict[str, str],
        prefix: Sequence[str] = (),
        config: str = "",
        hang: Sequence[str] = (),
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        config_file = workdir / "agent.toml"
        config_file.write_text(
            f'bus = "{bus}"\nstate_directory = "{workdir / "state"}"\n'
            f'runtime_directory = "{workdir / "run"}"\n{config}'
        )
        hangs = [arg for target in hang for arg in ("--hang", target)]
        module = ("-m", "tests.agent_host", "--config", str(config_file))
        argv = [*prefix, sys.executable, *module, "--machine", str(machine.root), *hangs]
        self.log = workdir / "agent.log"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                argv,
                cwd=REPO,
                env=env | {"PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,
            )
        try:
            line = read_line(self.proc, 30.0, "agent")
        except HarnessError as exc:
            self.stop()
            raise HarnessError(f"{exc}; log:\n{self.log_text()}") from None
        if not line.startswith("ready"):
            self.stop()
            raise HarnessError(f"agent said {line!r}")
        self.pid = self.proc.pid

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_exit(self, timeout: float = 15.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        end_process(self.proc)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


async def serve_until_stopped(args: argparse.Namespace) -> int:
    """Print ``ready <phase>`` once the bus name is owned; stop on SIGTERM, or by itself after a
    kexec (like the daemon); EX_UNAVAILABLE (as the daemon) if the bus connection is lost."""
    config = load_config(args.config)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    machine = EmulatedMachine(args.machine)
    host = AgentHost(args.config.parent, Abi(machine.abi), machine, bus=config.bus)
    async with host.agent(
        FakeGate(hanging=set(args.hang)), config=config, on_rebooted=stop.set
    ) as agent:
        print(f"ready {agent.phase}", flush=True)
        await agent.resume()
        assert host.bus is not None
        stopped = await wait_until_stopped(host.bus, stop)
    return EX_OK if stopped else EX_UNAVAILABLE


def main() -> None:
    """``python -m tests.agent_host --config FILE --machine ROOT [--hang TARGET]…``, from the
    repository root."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--machine", type=Path, required=True)
    parser.add_argument("--hang", action="append", default=[], help="a gate target that hangs")
    args = parser.parse_args()
    configure_logging("console", "info")
    status = asyncio.run(serve_until_stopped(args))
    sys.stderr.flush()
    sys.exit(status)


if __name__ == "__main__":
    main()
