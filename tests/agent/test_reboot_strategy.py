"""reboot_strategy = "systemd" | "auto": the agent's side on an emulated machine, with what
systemd >= 261's PID 1 does around Manager.KExec emulated (tests/fakes/pid1.py)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from luo_agent import phase as ph
from luo_agent.agent import Agent
from luo_agent.config import AbiChoice, Config, RebootStrategy, parse_config
from luo_agent.daemon import kernel_factory
from luo_agent.errors import ConfigError, GateError, Unsupported
from luo_agent.kernel.backend import FdCustody
from luo_agent.kernel.emulator import EmulatedMachine, EmulatedSyscalls
from luo_agent.persist import History, RuntimeState
from luo_agent.systemd.fdstore import SystemdFdStore, session_of
from tests.agent.test_agent_flow import memfd_with, until
from tests.fakes.gate import FakeGate
from tests.fakes.pid1 import FakeFdStore, FakeSystemd261

RESTORE = ph.PHASE_TARGETS[ph.Phase.RESTORING]
FREEZE = ph.PHASE_TARGETS[ph.Phase.FREEZING]


@dataclasses.dataclass
class Host:
    tmp: Path
    machine: EmulatedMachine
    abi: AbiChoice

    @contextlib.asynccontextmanager
    async def agent(
        self,
        gate: FakeGate,
        strategy: RebootStrategy,
        custody: FdCustody | None = None,
        user_mode: bool = False,
    ) -> AsyncIterator[Agent]:
        cfg = Config(
            state_directory=self.tmp / "state",
            runtime_directory=self.tmp / "run",
            reboot_strategy=strategy,
            systemd_user_mode=user_mode,
        )
        cfg = dataclasses.replace(
            cfg,
            kernel=dataclasses.replace(cfg.kernel, abi=self.abi, emulate_root=self.machine.root),
        )
        agent = Agent(
            config=cfg,
            open_kernel=kernel_factory(cfg, EmulatedSyscalls(self.machine.root), custody),
            gate=gate,
            runtime=RuntimeState(cfg.runtime_directory),
            history=History(cfg.state_directory),
        )
        runner = asyncio.create_task(agent.run())
        try:
            await agent.start()
            yield agent
        finally:
            if self.machine.running:
                await agent.stop()  # what PID 1 stopping the unit does
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner

    async def prepared(self, agent: Agent, data: bytes) -> None:
        fd = memfd_with(data, 4321)
        agent.preserve(fd, "vm-1", 7, [], owner="uid=0")
        os.close(fd)
        image = self.tmp / "vmlinuz"
        image.write_bytes(b"kernel" * 100)
        kfd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
        await agent.load_kernel(kfd, -1, "liveupdate=1")
        os.close(kfd)
        await agent.prepare("upd-s")
        await until(agent, lambda: agent.phase is ph.Phase.PREPARED)

    def outgoing_sessions(self) -> list[str]:
        return sorted(s["name"] for s in self.machine.inspect()["outgoing_sessions"])


def _host(tmp_path: Path, abi: AbiChoice, profile: str | None = None) -> Iterator[Host]:
    machine = EmulatedMachine(tmp_path / "machine", abi, profile)
    machine.boot()
    try:
        yield Host(tmp_path, machine, abi)
    finally:
        machine.poweroff()


@pytest.fixture(params=["6.19", "g6"])
def session_host(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Host]:
    yield from _host(tmp_path, "session", request.param)


@pytest.fixture(params=["v3", "rfc-v2"])
def state_machine_host(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Host]:
    yield from _host(tmp_path, request.param)


async def test_systemd_strategy_carries_sessions_through_pid1_kexec(session_host: Host) -> None:
    host = session_host
    data = os.urandom(256 << 10)
    pid1 = FakeSystemd261(host.machine.root)
    kexec_queued = asyncio.Event()

    async def queue_kexec() -> None:
        kexec_queued.set()  # Manager.KExec returns once the job is queued

    gate = FakeGate(version="261.3-1", on_kexec=queue_kexec)
    async with host.agent(gate, "systemd", pid1.store) as agent:
        assert agent.reboot_strategy == "systemd"
        assert not any("reboot_strategy" in b for b in agent.check().blockers)
        await host.prepared(agent, data)
        await agent.execute("upd-s")
        async with asyncio.timeout(10):
            await kexec_queued.wait()
        await until(agent, lambda: agent.phase is ph.Phase.REBOOTING)
        assert gate.started[-1] == FREEZE and gate.kexec_requests == 1
        assert sorted(pid1.store.outgoing) == ["luo-agent", "vm-1"]
    # The agent is stopped with its own session fds closed: only the fd store keeps them.
    assert host.machine.running and host.outgoing_sessions() == ["luo-agent", "vm-1"]
    await asyncio.to_thread(pid1.kexec)
    await asyncio.to_thread(host.machine.wait_down, 10)

    host.machine.boot()
    store = await asyncio.to_thread(pid1.boot)
    restore_gate = FakeGate(version="261.3-1")
    retrieved: list[int] = []
    async with host.agent(restore_gate, "systemd", store) as agent:
        assert agent.phase is ph.Phase.UPDATED
        assert agent.record is not None and agent.record.id == "upd-s"

        async def participant_restores() -> None:
            retrieved.append(await agent.retrieve("vm-1", 7))

        restore_gate.hooks[RESTORE] = participant_restores
        await agent.resume()
        await until(agent, lambda: agent.phase is ph.Phase.IDLE)
        assert agent.last is not None and agent.last.result == "success"
    (fd,) = retrieved
    assert os.fstat(fd).st_size == len(data)
    assert hashlib.sha256(os.pread(fd, len(data), 0)).digest() == hashlib.sha256(data).digest()
    assert os.lseek(fd, 0, os.SEEK_CUR) == 4321
    os.close(fd)
    assert store.incoming == {}  # finished sessions are removed from the store
    assert host.machine.inspect()["incoming_sessions"] == []
    store.close()


async def test_refused_kexec_job_takes_the_sessions_back(session_host: Host) -> None:
    host = session_host
    store = FakeFdStore()

    async def refuse() -> None:
        raise GateError("kexec.target", "failed")

    gate = FakeGate(version="262", on_kexec=refuse)
    async with host.agent(gate, "systemd", store) as agent:
        await host.prepared(agent, b"keep me")
        await agent.execute()
        await until(agent, lambda: agent.phase is ph.Phase.PREPARED and gate.kexec_requests > 0)
        assert store.outgoing == {}  # not left in the store for some later kexec
        assert host.outgoing_sessions() == ["luo-agent", "vm-1"]  # still prepared, retryable
        await agent.cancel()
        await until(agent, lambda: agent.phase is ph.Phase.IDLE)
    assert host.outgoing_sessions() == []


async def test_old_systemd_is_a_blocker_and_execute_is_refused(session_host: Host) -> None:
    host = session_host
    gate = FakeGate(version="252.38-1~deb12u1")
    store = FakeFdStore()
    async with host.agent(gate, "systemd", store) as agent:
        await host.prepared(agent, b"x" * 100)
        report = agent.check()
        assert any(">= 261" in b and "252.38" in b for b in report.blockers)
        with pytest.raises(Unsupported, match=">= 261"):
            await agent.execute()
        assert agent.phase is ph.Phase.PREPARED and FREEZE not in gate.started
        assert gate.kexec_requests == 0 and store.outgoing == {}
        await agent.cancel()
        await until(agent, lambda: agent.phase is ph.Phase.IDLE)


async def test_state_machine_abis_cannot_use_the_systemd_strategy(
    state_machine_host: Host,
) -> None:
    host = state_machine_host
    gate = FakeGate(version="262")
    async with host.agent(gate, "systemd") as agent:
        assert any("session ABI" in b for b in agent.check().blockers)
        await host.prepared(agent, b"y" * 100)
        with pytest.raises(Unsupported, match="session ABI"):
            await agent.execute()
        assert FREEZE not in gate.started and gate.kexec_requests == 0
        await agent.cancel()
        await until(agent, lambda: agent.phase is ph.Phase.IDLE)


@pytest.mark.parametrize(
    ("abi", "version", "user_mode", "expected"),
    [
        ("session", "261", False, "systemd"),
        ("session", "263.1-2", False, "systemd"),
        ("session", "262", True, "direct"),
        ("session", "257.9-1~deb13u1", False, "direct"),
        ("session", "", False, "direct"),
        ("v3", "262", False, "direct"),
    ],
)
async def test_auto_picks_systemd_only_where_it_works(
    tmp_path: Path, abi: AbiChoice, version: str, user_mode: bool, expected: str
) -> None:
    for host in _host(tmp_path, abi):
        gate = FakeGate(version=version)
        async with host.agent(gate, "auto", FakeFdStore(), user_mode=user_mode) as agent:
            assert agent.reboot_strategy == expected
            assert agent.reboot_strategy_blocker == ""
            assert not any("reboot_strategy" in b for b in agent.check().blockers)


def test_config_accepts_the_strategies() -> None:
    for name in ("direct", "systemd", "auto"):
        assert parse_config(f'reboot_strategy = "{name}"').reboot_strategy == name
    assert Config().reboot_strategy == "direct"
    with pytest.raises(ConfigError, match="reboot_strategy"):
        parse_config('reboot_strategy = "soft-reboot"')


def test_fd_store_keeps_outgoing_sessions_under_their_own_name(tmp_path: Path) -> None:
    """The real SystemdFdStore over a real notify socket: luo-out-<hex> names go out, come back
    as sessions; without a notify socket keeping an outgoing session is an error."""
    with pytest.raises(OSError, match="no fd store"):
        SystemdFdStore(env={}).keep_outgoing("vm-1", 0)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify"))
        sock.settimeout(5)
        store = SystemdFdStore(env={"NOTIFY_SOCKET": str(tmp_path / "notify")})
        r, w = os.pipe()
        store.keep_outgoing("vm-1", r)
        data, ancdata, _flags, _addr = sock.recvmsg(4096, socket.CMSG_SPACE(4))
        assert data == b"FDSTORE=1\nFDNAME=luo-out-766d2d31\n"
        for _level, _kind, payload in ancdata:
            os.close(int.from_bytes(payload[:4], "little"))
        store.drop("vm-1")  # an incoming session that came back under either name
        removed = {sock.recv(4096) for _ in range(2)}
        assert removed == {
            b"FDSTOREREMOVE=1\nFDNAME=luo-in-766d2d31\n",
            b"FDSTOREREMOVE=1\nFDNAME=luo-out-766d2d31\n",
        }
        os.close(r)
        os.close(w)
    # What PID 1 hands back after the kexec (LISTEN_FDNAMES) is adopted as the session.
    assert session_of("luo-out-766d2d31") == session_of("luo-in-766d2d31") == "vm-1"
    assert session_of("luo-out-zz") is None and session_of("other") is None


_INHERIT = r"""
import json, os, sys
from pathlib import Path
from luo_agent.systemd.fdstore import SystemdFdStore
runtime = Path(sys.argv[1])
fd = os.memfd_create("session-stand-in")
if fd != 3:  # systemd passes stored fds from 3 on
    os.dup2(fd, 3)
    os.close(fd)
env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "luo-out-766d2d31"}
got = SystemdFdStore(env=env, runtime_directory=runtime).inherited()
try:
    os.fstat(3)
    still_open = True
except OSError:
    still_open = False
print(json.dumps({"sessions": sorted(got), "fd3_open": still_open}))
"""


@pytest.mark.parametrize("kexec_happened", [True, False])
def test_outgoing_sessions_left_in_the_store_by_a_kexec_that_never_happened(
    tmp_path: Path, kexec_happened: bool
) -> None:
    """The runtime directory is a tmpfs no reboot survives: the marker written when outgoing
    sessions went into the store tells a restart in the same boot (the kexec PID 1 accepted did
    not happen: release them, which cancels) from the live-update boot (adopt them)."""
    import json
    import subprocess
    import sys

    runtime = tmp_path / "run"
    runtime.mkdir()
    if not kexec_happened:
        (runtime / "outgoing-in-fd-store").touch()
    out = subprocess.run(
        [sys.executable, "-c", _INHERIT, str(runtime)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    result = json.loads(out.splitlines()[-1])
    if kexec_happened:
        assert result == {"sessions": ["vm-1"], "fd3_open": True}
    else:
        assert result == {"sessions": [], "fd3_open": False}
    assert not (runtime / "outgoing-in-fd-store").exists()
