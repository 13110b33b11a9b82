"""reboot_strategy = "systemd" | "auto": the agent's side on an emulated machine, with what
systemd 262's PID 1 does with the agent's fd store around kexec.target emulated
(tests/fakes/pid1.py); the agent's SystemdFdStore talks to it over a real notify socket."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from luo_agent import phase as ph
from luo_agent.agent import Agent
from luo_agent.config import AbiChoice, Config, RebootStrategy, parse_config
from luo_agent.errors import ConfigError, GateError, PhaseError, Unsupported
from luo_agent.kernel.backend import FdCustody, NoCustody
from luo_agent.kernel.device import Abi
from luo_agent.kernel.emulator import EmulatedMachine, EmulatedSyscalls
from luo_agent.kernel.session import SessionDevice
from luo_agent.kernel.syscalls import KEXEC_FILE_UNLOAD
from luo_agent.systemd import notify
from luo_agent.systemd.fdstore import OUTGOING_PREFIX, SystemdFdStore, fd_name, session_of
from tests.agent_host import AgentHost, memfd_with, poll, until
from tests.fakes.gate import FakeGate
from tests.fakes.pid1 import AgentFdStore, FakeSystemd262

RESTORE = ph.SPECS[ph.Phase.RESTORING].target
FREEZE = ph.SPECS[ph.Phase.FREEZING].target
CARRIED = sorted(fd_name(s, OUTGOING_PREFIX) for s in ("luo-agent", "vm-1"))


class Host(AgentHost):
    """An AgentHost with what systemd 262's PID 1 does around the kexec."""

    def agent_with(
        self,
        gate: FakeGate,
        strategy: RebootStrategy,
        custody: FdCustody | None = None,
        user_mode: bool = False,
    ) -> contextlib.AbstractAsyncContextManager[Agent]:
        config = dataclasses.replace(
            self.config(), reboot_strategy=strategy, systemd_user_mode=user_mode
        )
        return self.agent(gate, config=config, custody=custody)

    def under_pid1(
        self, gate: FakeGate, pid1: FakeSystemd262
    ) -> contextlib.AbstractAsyncContextManager[Agent]:
        """The agent with reboot_strategy = "systemd", its fd store PID 1's."""
        return self.agent_with(gate, "systemd", AgentFdStore(pid1, self.runtime_directory))

    async def prepared(self, agent: Agent, data: bytes) -> None:
        fd = memfd_with(data, 4321)
        agent.preserve(fd, "vm-1", 7, [], owner="uid=0")
        os.close(fd)
        image = self.workdir / "vmlinuz"
        image.write_bytes(b"kernel" * 100)
        kfd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
        await agent.load_kernel(kfd, -1, "liveupdate=1")
        os.close(kfd)
        await agent.prepare("upd-s")
        await until(agent, lambda: agent.phase is ph.Phase.PREPARED)

    def outgoing_sessions(self) -> list[str]:
        return sorted(s["name"] for s in self.machine.inspect()["outgoing_sessions"])

    def incoming_sessions(self) -> list[str]:
        return sorted(s["name"] for s in self.machine.inspect()["incoming_sessions"])

    def unload_image(self) -> None:
        EmulatedSyscalls(self.machine.root).kexec_file_load(-1, -1, "", KEXEC_FILE_UNLOAD)

    async def pid1_reboots(self, pid1: FakeSystemd262) -> None:
        """systemd-shutdown's kexec (or its fallback), then the next boot's PID 1."""
        await asyncio.to_thread(pid1.shutdown)
        if pid1.last_shutdown == "kexec":
            await asyncio.to_thread(self.machine.wait_down, 10)
        self.power_on()
        await asyncio.to_thread(pid1.boot)


def _host(tmp_path: Path, abi: AbiChoice, profile: str | None = None) -> Iterator[Host]:
    machine = EmulatedMachine(tmp_path / "machine", abi, profile)
    machine.boot()
    try:
        yield Host(tmp_path, abi, machine)
    finally:
        machine.poweroff()


@pytest.fixture(params=["6.19", "g6"])
def session_host(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Host]:
    yield from _host(tmp_path, Abi.SESSION, request.param)


@pytest.fixture(params=[Abi.V3, Abi.RFC_V2])
def state_machine_host(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Host]:
    yield from _host(tmp_path, request.param)


@pytest.fixture
def pid1(session_host: Host) -> Iterator[FakeSystemd262]:
    emulated = FakeSystemd262(session_host.machine)
    yield emulated
    emulated.close()


def _gate(pid1: FakeSystemd262, version: str = "262.1-1") -> FakeGate:
    return FakeGate(version=version, on_kexec=pid1.kexec_target_job, fd_store=pid1.fill)


async def _execute_until_kexec_queued(host: Host, agent: Agent, pid1: FakeSystemd262) -> None:
    await agent.execute("upd-s")
    async with asyncio.timeout(10):
        await pid1.kexec_queued.wait()
    assert agent.phase is ph.Phase.REBOOTING
    # Published before PID 1 stops the participants' units (their ExecStop= may look).
    assert (host.runtime_directory / "state").read_text() == "rebooting\n"
    assert pid1.kexec_jobs == ["kexec.target"]
    assert sorted(pid1.stored_names()) == CARRIED


async def _restore_and_finish(host: Host, pid1: FakeSystemd262, data: bytes) -> Agent:
    restore_gate = _gate(pid1)
    retrieved: list[int] = []
    async with host.under_pid1(restore_gate, pid1) as (agent):
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
    assert pid1.stored_names() == []  # finished sessions are removed from the store
    assert host.incoming_sessions() == []
    return agent


async def test_systemd_strategy_carries_sessions_through_kexec_target(
    session_host: Host, pid1: FakeSystemd262
) -> None:
    host = session_host
    data = os.urandom(256 << 10)
    gate = _gate(pid1)
    async with host.under_pid1(gate, pid1) as agent:
        assert agent.reboot_strategy == "systemd"
        assert not any("reboot_strategy" in b for b in (await agent.check()).blockers)
        await host.prepared(agent, data)
        await _execute_until_kexec_queued(host, agent, pid1)
        assert gate.started[-1] == FREEZE and gate.kexec_requests == 1
    # kexec.target stopped the agent: its own session fds are closed, the store keeps them.
    assert host.machine.running and host.outgoing_sessions() == ["luo-agent", "vm-1"]
    await host.pid1_reboots(pid1)
    assert pid1.last_shutdown == "kexec" and pid1.kexec_count == 1
    # Handed back under the FDNAMEs they went in with, as retrieved (incoming) sessions.
    assert sorted(pid1.stored_names()) == CARRIED and pid1.not_restored == []
    assert host.incoming_sessions() == ["luo-agent", "vm-1"]
    agent = await _restore_and_finish(host, pid1, data)
    assert any("adopted incoming sessions" in note for note in agent.boot_notes)


async def test_sessions_carried_without_pid1s_session_are_retrieved_by_name(
    session_host: Host, pid1: FakeSystemd262
) -> None:
    """A survivor of the killing spree holds /dev/liveupdate when systemd-shutdown wants it:
    no `systemd` session, so the kernel carries the agent's sessions but nobody maps them back;
    the agent retrieves them by name."""
    host = session_host
    data = os.urandom(64 << 10)
    async with host.under_pid1(_gate(pid1), pid1) as agent:
        await host.prepared(agent, data)
        await _execute_until_kexec_queued(host, agent, pid1)
    survivor = SessionDevice(EmulatedSyscalls(host.machine.root))
    survivor.open()
    try:
        await host.pid1_reboots(pid1)
    finally:
        survivor.close()
    assert pid1.last_shutdown == "kexec"
    assert pid1.kexec_count == 0 and pid1.stored_names() == []  # nothing handed back
    agent = await _restore_and_finish(host, pid1, data)
    assert not any("adopted" in note for note in agent.boot_notes)


async def test_no_kexec_image_refuses_execute_and_keeps_the_update(
    session_host: Host, pid1: FakeSystemd262
) -> None:
    """Without an image systemd-shutdown's reboot(KEXEC) fails and it reboots ordinarily:
    Execute is refused while nothing is frozen, and the hand-over refuses if the image goes
    away after the freeze."""
    host = session_host
    gate = _gate(pid1)
    async with host.under_pid1(gate, pid1) as agent:
        await host.prepared(agent, b"keep me")
        assert not any("kexec image" in b for b in (await agent.check()).blockers)
        host.unload_image()
        assert any("no kexec image is loaded" in b for b in (await agent.check()).blockers)
        with pytest.raises(PhaseError, match="no kexec image is loaded"):
            await agent.execute()
        assert agent.phase is ph.Phase.PREPARED and FREEZE not in gate.started

        # The image disappears between Execute and the hand-over.
        kfd = os.open(host.workdir / "vmlinuz", os.O_RDONLY | os.O_CLOEXEC)
        await agent.load_kernel(kfd, -1, "liveupdate=1")
        os.close(kfd)

        async def image_goes_away() -> None:
            host.unload_image()

        gate.hooks[FREEZE] = image_goes_away
        await agent.execute()
        await until(agent, lambda: agent.phase is ph.Phase.PREPARED and FREEZE in gate.started)
        assert agent.record is not None and "no kexec image" in agent.record.message
        assert gate.kexec_requests == 0 and pid1.stored_names() == []
        assert host.outgoing_sessions() == ["luo-agent", "vm-1"]  # still prepared
        await agent.cancel()
        await until(agent, lambda: agent.phase is ph.Phase.IDLE)
    assert host.outgoing_sessions() == []


async def test_full_fd_store_is_detected_before_the_kexec(session_host: Host) -> None:
    host = session_host
    pid1 = FakeSystemd262(host.machine, max_fds=1)
    try:
        gate = _gate(pid1)
        async with host.under_pid1(gate, pid1) as agent:
            await host.prepared(agent, b"two sessions, room for one")
            await agent.execute()
            await until(agent, lambda: agent.phase is ph.Phase.PREPARED and FREEZE in gate.started)
            assert len(pid1.dropped) == 1  # dropped without a word, as PID 1 does
            assert agent.record is not None
            assert "FileDescriptorStoreMax=1" in agent.record.message
            assert gate.kexec_requests == 0
            # taken back (FDSTOREREMOVE=1 is a datagram PID 1 handles after the agent moved on)
            await poll(lambda: pid1.stored_names() == [])
            assert host.outgoing_sessions() == ["luo-agent", "vm-1"]
            await agent.cancel()
            await until(agent, lambda: agent.phase is ph.Phase.IDLE)
    finally:
        pid1.close()


async def test_refused_kexec_job_takes_the_sessions_back(
    session_host: Host, pid1: FakeSystemd262
) -> None:
    host = session_host

    async def refuse() -> None:
        raise GateError("kexec.target", "dependency")

    gate = FakeGate(version="262", on_kexec=refuse, fd_store=pid1.fill)
    async with host.under_pid1(gate, pid1) as agent:
        await host.prepared(agent, b"keep me")
        await agent.execute()
        await until(agent, lambda: agent.phase is ph.Phase.PREPARED and gate.kexec_requests > 0)
        await poll(lambda: pid1.stored_names() == [])  # not left in the store for a later kexec
        assert host.outgoing_sessions() == ["luo-agent", "vm-1"]  # still prepared, retryable
        await agent.cancel()
        await until(agent, lambda: agent.phase is ph.Phase.IDLE)
    assert host.outgoing_sessions() == []


def _push(pid1: FakeSystemd262, name: str, fd: int) -> None:
    """What any process of the unit does with FDSTORE=1 (then BARRIER=1: PID 1 has it)."""
    env = {"NOTIFY_SOCKET": pid1.notify_address}
    assert notify.store_fds(name, [fd], env=env) and notify.barrier(5, env=env)
    os.close(fd)


@pytest.mark.parametrize("preserve", ["yes", "restart"])
async def test_pid1_carries_the_whole_store_by_fd_kind(session_host: Host, preserve: str) -> None:
    """FileDescriptorStorePreserve=yes carries every fd of the store: sessions by kernel name,
    memfds in PID 1's own session, other kinds are lost; an incoming session does not come
    back (the kernel carries only outgoing ones).  restart carries nothing."""
    host = session_host
    pid1 = FakeSystemd262(host.machine, preserve="yes" if preserve == "yes" else "restart")
    sc = EmulatedSyscalls(host.machine.root)
    try:
        with SessionDevice(sc) as dev:
            dev.open()
            _push(pid1, "luo-out-7331", dev.create_session("s1").detach())
        _push(pid1, "state", memfd_with(b"unit state", 3))
        r, w = os.pipe()
        os.close(w)
        _push(pid1, "a-pipe", r)
        _load_image(host)
        await host.pid1_reboots(pid1)
        if preserve == "restart":
            assert pid1.stored_names() == [] and host.incoming_sessions() == []
            return
        assert pid1.stored_names() == ["luo-out-7331", "state"]
        assert pid1.kexec_count == 1 and host.incoming_sessions() == ["s1"]
        ((_name, fd),) = [e for e in pid1.pass_fds() if e[0] == "state"]
        assert os.pread(fd, 100, 0) == b"unit state"
        os.close(fd)

        # Left unfinished in the store, s1 is serialized again but not carried: lost.
        _load_image(host)
        await host.pid1_reboots(pid1)
        assert pid1.not_restored == ["s1"] and pid1.stored_names() == ["state"]
        assert pid1.kexec_count == 2
    finally:
        pid1.close()


async def test_pid1_without_a_kexec_image_reboots_ordinarily(session_host: Host) -> None:
    host = session_host
    pid1 = FakeSystemd262(host.machine)
    try:
        with SessionDevice(EmulatedSyscalls(host.machine.root)) as dev:
            dev.open()
            _push(pid1, "luo-out-7331", dev.create_session("s1").detach())
        await host.pid1_reboots(pid1)
        assert pid1.last_shutdown == "reboot"
        assert pid1.stored_names() == [] and host.incoming_sessions() == []
    finally:
        pid1.close()


def _load_image(host: Host) -> None:
    image = host.workdir / "vmlinuz"
    image.write_bytes(b"kernel" * 100)
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    host.machine.syscalls.kexec_file_load(fd, -1, "liveupdate=1", 0)
    os.close(fd)


async def test_old_systemd_is_a_blocker_and_execute_is_refused(session_host: Host) -> None:
    host = session_host
    gate = FakeGate(version="252.38-1~deb12u1")
    async with host.agent_with(gate, "systemd", NoCustody()) as agent:
        await host.prepared(agent, b"x" * 100)
        report = await agent.check()
        assert any(">= 261" in b and "252.38" in b for b in report.blockers)
        with pytest.raises(Unsupported, match=">= 261"):
            await agent.execute()
        assert agent.phase is ph.Phase.PREPARED and FREEZE not in gate.started
        assert gate.kexec_requests == 0
        await agent.cancel()
        await until(agent, lambda: agent.phase is ph.Phase.IDLE)


async def test_state_machine_abis_cannot_use_the_systemd_strategy(
    state_machine_host: Host,
) -> None:
    host = state_machine_host
    gate = FakeGate(version="262")
    async with host.agent_with(gate, "systemd") as agent:
        assert any("session ABI" in b for b in (await agent.check()).blockers)
        await host.prepared(agent, b"y" * 100)
        with pytest.raises(Unsupported, match="session ABI"):
            await agent.execute()
        assert FREEZE not in gate.started and gate.kexec_requests == 0
        await agent.cancel()
        await until(agent, lambda: agent.phase is ph.Phase.IDLE)


@pytest.mark.parametrize(
    ("abi", "version", "user_mode", "expected"),
    [
        (Abi.SESSION, "261", False, "systemd"),
        (Abi.SESSION, "263.1-2", False, "systemd"),
        (Abi.SESSION, "262", True, "direct"),
        (Abi.SESSION, "257.9-1~deb13u1", False, "direct"),
        (Abi.SESSION, "", False, "direct"),
        (Abi.V3, "262", False, "direct"),
    ],
)
async def test_auto_picks_systemd_only_where_it_works(
    tmp_path: Path, abi: AbiChoice, version: str, user_mode: bool, expected: str
) -> None:
    for host in _host(tmp_path, abi):
        gate = FakeGate(version=version)
        async with host.agent_with(gate, "auto", NoCustody(), user_mode=user_mode) as agent:
            assert agent.reboot_strategy == expected
            assert agent.reboot_strategy_blocker == ""
            assert not any("reboot_strategy" in b for b in (await agent.check()).blockers)


@pytest.mark.parametrize(
    ("strategy", "version", "user_mode", "warned"),
    [
        ("direct", "262.1-1", False, True),
        ("direct", "261", False, True),
        ("direct", "257.9-1~deb13u1", False, False),
        ("direct", "262", True, False),
        ("systemd", "262", False, False),
    ],
)
async def test_direct_strategy_under_a_carrying_pid1_is_a_warning(
    tmp_path: Path, strategy: RebootStrategy, version: str, user_mode: bool, warned: bool
) -> None:
    for host in _host(tmp_path, Abi.SESSION):
        gate = FakeGate(version=version)
        async with host.agent_with(gate, strategy, NoCustody(), user_mode=user_mode) as agent:
            warnings = (await agent.check()).warnings
            assert any("bypasses PID 1" in w for w in warnings) is warned
            assert not any("bypasses" in b for b in (await agent.check()).blockers)


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
    with pytest.raises(OSError, match="no fd store"):
        SystemdFdStore(env={}).sync()  # no BARRIER=1 answer to wait for
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


def _image_cmdline(host: Host) -> str | None:
    image = host.machine.inspect()["kexec_image"]
    return None if image is None else str(image["cmdline"])


async def test_the_image_is_in_the_kernel_only_while_an_update_is_prepared(
    session_host: Host, pid1: FakeSystemd262
) -> None:
    """With an image loaded, systemd >= 256's `systemctl reboot` kexecs into it (logind's
    auto-kexec): an idle agent only checks the image, prepare loads it under the update's marker,
    and a cancel takes it out again, unless someone else's shutdown is what ended the update."""
    host = session_host
    gate = _gate(pid1)
    async with host.under_pid1(gate, pid1) as agent:
        image = host.workdir / "vmlinuz"
        image.write_bytes(b"kernel" * 100)
        kfd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
        await agent.load_kernel(kfd, -1, "liveupdate=1")
        os.close(kfd)
        assert _image_cmdline(host) is None and agent.kernel_loaded
        assert (await agent.check()).ready  # nothing loaded in the kernel is no blocker while idle

        await host.prepared(agent, b"data")  # loads again, with the update's id
        assert _image_cmdline(host) == "liveupdate=1 luo_agent.update=upd-s"
        await agent.cancel()
        await until(agent, lambda: agent.phase is ph.Phase.IDLE)
        assert _image_cmdline(host) is None

        await agent.prepare("upd-t")
        await until(agent, lambda: agent.phase is ph.Phase.PREPARED)
        gate.queue_shutdown_job("reboot.target")
        await until(agent, lambda: agent.phase is ph.Phase.IDLE)
        assert agent.last is not None and agent.last.result == "cancelled"
        assert "reboot.target was queued by someone else" in agent.last.message
        assert _image_cmdline(host) == "liveupdate=1 luo_agent.update=upd-t"  # that reboot's


async def test_check_blocks_when_the_fd_store_cannot_take_the_sessions(
    session_host: Host,
) -> None:
    """PID 1 drops an fd that does not fit with a warning only, and a dropped session is ended:
    Check() counts the store against what the kexec would push."""
    host = session_host
    pid1 = FakeSystemd262(host.machine, max_fds=3)
    try:
        async with host.under_pid1(_gate(pid1), pid1) as agent:
            image = host.workdir / "vmlinuz"
            image.write_bytes(b"kernel" * 100)
            kfd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
            await agent.load_kernel(kfd, -1, "liveupdate=1")
            os.close(kfd)
            for session in ("vm-1", "vm-2"):
                fd = memfd_with(b"x", 0)
                agent.preserve(fd, session, 1, [], owner="uid=0")
                os.close(fd)
            assert (await agent.check()).ready  # 2 sessions + the agent's own: 3 fit
            _push(pid1, "unrelated", memfd_with(b"y", 0))
            report = await agent.check()
            assert not report.ready
            (blocker,) = [b for b in report.blockers if "FileDescriptorStoreMax=3" in b]
            assert "would need 4 fds (1 held, 3 sessions" in blocker
    finally:
        pid1.close()


async def _kexec_and_read_mapping(host: Host, pid1: FakeSystemd262) -> dict[str, object] | None:
    """systemd-shutdown's kexec, then the new kernel's `systemd` session read as PID 1 would
    (None if there is none); the session is finished, as PID 1 does."""
    _load_image(host)
    await asyncio.to_thread(pid1.shutdown)
    await asyncio.to_thread(host.machine.wait_down, 10)
    host.machine.boot()
    with SessionDevice(EmulatedSyscalls(host.machine.root)) as dev:
        dev.open()
        if "systemd" not in host.incoming_sessions():
            return None
        with dev.retrieve_session("systemd") as own:
            fd = own.retrieve_fd(0)
            mapping = json.loads(os.pread(fd, 1 << 16, 0))
            os.close(fd)
            own.finish()
    return dict(mapping)


async def test_pid1_creates_no_session_when_nothing_is_serialized(session_host: Host) -> None:
    host = session_host
    pid1 = FakeSystemd262(host.machine)
    try:
        assert await _kexec_and_read_mapping(host, pid1) is None
    finally:
        pid1.close()


async def test_pid1_mapping_carries_kexecs_count_under_its_source_name(
    session_host: Host,
) -> None:
    host = session_host
    pid1 = FakeSystemd262(host.machine)
    try:
        _push(pid1, "state", memfd_with(b"unit state", 0))
        mapping = await _kexec_and_read_mapping(host, pid1)
        assert mapping is not None and mapping["version"] == 1
        assert mapping["state"] == {"kexecsCount": 0}
        assert mapping["units"] == {
            "luo-agent.service": {"fdstore": [{"type": "fd", "name": "state", "token": 1}]}
        }
    finally:
        pid1.close()


def test_a_full_store_warns_and_closes_the_rest_a_duplicate_is_stored_once(
    session_host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    pid1 = FakeSystemd262(session_host.machine, max_fds=2)
    try:
        memfd = memfd_with(b"once", 0)
        _push(pid1, "first", os.dup(memfd))
        _push(pid1, "again", memfd)  # the same open file: suppressed, silently
        assert pid1.stored_names() == ["first"] and pid1.dropped == []
        env = {"NOTIFY_SOCKET": pid1.notify_address}
        fds = [memfd_with(b"a", 0), memfd_with(b"b", 0), memfd_with(b"c", 0)]
        with caplog.at_level(logging.DEBUG, logger="tests.fakes.pid1"):
            assert notify.store_fds("three", fds, env=env) and notify.barrier(5, env=env)
        for fd in fds:
            os.close(fd)
        assert pid1.stored_names() == ["first", "three"] and pid1.dropped == ["three", "three"]
        (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert "Cannot store more fds than FileDescriptorStoreMax=2" in warning.getMessage()
    finally:
        pid1.close()


async def test_a_mapping_of_an_unknown_version_is_skipped_and_the_agent_retrieves_by_name(
    session_host: Host,
) -> None:
    """A mapping written by another systemd build with a newer version: the new boot's PID 1
    skips it (and finishes its own session); the sessions it did not take back are the kernel's,
    and the agent retrieves them by name."""
    host = session_host
    pid1 = FakeSystemd262(host.machine, mapping_version=2)
    try:
        data = os.urandom(32 << 10)
        async with host.under_pid1(_gate(pid1), pid1) as agent:
            await host.prepared(agent, data)
            await _execute_until_kexec_queued(host, agent, pid1)
        await host.pid1_reboots(pid1)
        assert pid1.stored_names() == [] and pid1.kexec_count == 0
        assert host.incoming_sessions() == ["luo-agent", "vm-1"]
        agent = await _restore_and_finish(host, pid1, data)
        assert not any("adopted" in note for note in agent.boot_notes)
    finally:
        pid1.close()


async def test_a_store_too_small_in_the_new_boot_ends_a_session_and_the_agent_says_so(
    session_host: Host,
) -> None:
    """FileDescriptorStoreMax= lowered for the new boot: PID 1 hands back what fits and closes
    the rest, which ends those sessions (nothing left to retrieve by name); the agent reports
    the session as not carried and the restore as failed, never as done."""
    host = session_host
    pid1 = FakeSystemd262(host.machine)
    try:
        async with host.under_pid1(_gate(pid1), pid1) as agent:
            await host.prepared(agent, b"lost in the new boot")
            await _execute_until_kexec_queued(host, agent, pid1)
        pid1.max_fds = 1
        await host.pid1_reboots(pid1)
        assert pid1.stored_names() == [fd_name("luo-agent", OUTGOING_PREFIX)]
        assert pid1.dropped == [fd_name("vm-1", OUTGOING_PREFIX)]
        assert host.incoming_sessions() == ["luo-agent"]  # vm-1 ended with its fd
        restore_gate = _gate(pid1)
        async with host.under_pid1(restore_gate, pid1) as agent:
            assert any("session 'vm-1' not carried" in n for n in agent.boot_notes)

            async def participant_restores() -> None:
                await agent.retrieve("vm-1", 7)

            restore_gate.hooks[RESTORE] = participant_restores
            await agent.resume()
            # The restore fails and the update waits in `updated` (to retry or abort), saying why.
            await until(
                agent,
                lambda: (
                    agent.phase is ph.Phase.UPDATED
                    and agent.record is not None
                    and "no incoming session 'vm-1'" in agent.record.message
                ),
            )
    finally:
        pid1.close()


async def test_a_reboot_while_freezing_is_recorded_as_what_stopped_the_agent(
    session_host: Host, pid1: FakeSystemd262
) -> None:
    """Too late to cancel (the freeze gate is running): PID 1 stops the agent on the way down,
    and the update is recorded as aborted by that shutdown, its image left for it."""
    host = session_host
    gate = _gate(pid1)
    frozen = asyncio.Event()

    async def freeze_hook_waits() -> None:
        frozen.set()
        await asyncio.Event().wait()

    gate.hooks[FREEZE] = freeze_hook_waits
    async with host.under_pid1(gate, pid1) as agent:
        await host.prepared(agent, b"data")
        await agent.execute()
        await asyncio.wait_for(frozen.wait(), 10)
        gate.queue_shutdown_job("kexec.target")
        await asyncio.sleep(0.2)  # the watcher takes the job from the queue
        assert agent.state.shutdown_queued == "kexec.target"
        assert agent.phase is ph.Phase.FREEZING
    assert agent.last is not None and agent.last.result == "aborted"
    assert agent.last.message == (
        "the agent was stopped in phase freezing (kexec.target was queued by someone else)"
    )
    assert host.outgoing_sessions() == []
    assert _image_cmdline(host) == "liveupdate=1 luo_agent.update=upd-s"


async def test_a_shutdown_inhibitor_blocks_check_and_execute_before_the_freeze(
    session_host: Host, pid1: FakeSystemd262
) -> None:
    """An fwupd-style tool holds a logind block lock on shutdown: the agent's kexec would not go
    through logind, so Check() reports it and Execute is refused while nothing is frozen."""
    host = session_host
    gate = _gate(pid1)
    gate.inhibitors = ["fwupd (PID 42): Updating the firmware"]
    async with host.under_pid1(gate, pid1) as agent:
        await host.prepared(agent, b"data")
        report = await agent.check()
        assert (
            "a shutdown is inhibited (logind block lock) by fwupd (PID 42): Updating"
            in " ".join(report.blockers)
        )
        with pytest.raises(PhaseError, match=r"inhibited .* by fwupd"):
            await agent.execute()
        assert agent.phase is ph.Phase.PREPARED and FREEZE not in gate.started
        gate.inhibitors.clear()
        await _execute_until_kexec_queued(host, agent, pid1)


async def test_a_session_pid1_could_not_read_back_is_reported_before_the_kexec(
    session_host: Host, pid1: FakeSystemd262, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PID 1 carries a session by the name its fd link shows: a kernel that showed it otherwise
    (here: cut short) would leave it out, so the hand-over refuses before the kexec."""
    host = session_host
    real = EmulatedSyscalls.fd_link

    def cut_short(self: EmulatedSyscalls, fd: int) -> str:
        return real(self, fd)[:-2]

    gate = _gate(pid1)
    async with host.under_pid1(gate, pid1) as agent:
        await host.prepared(agent, b"data")
        monkeypatch.setattr(EmulatedSyscalls, "fd_link", cut_short)
        await agent.execute()
        await until(agent, lambda: agent.phase is ph.Phase.PREPARED and FREEZE in gate.started)
        assert agent.record is not None and "reads back as" in agent.record.message
        assert gate.kexec_requests == 0 and pid1.stored_names() == []
        assert host.outgoing_sessions() == ["luo-agent", "vm-1"]
        monkeypatch.undo()
        await agent.cancel()
        await until(agent, lambda: agent.phase is ph.Phase.IDLE)


async def test_a_freeze_failing_under_someone_elses_shutdown_says_so(
    session_host: Host, pid1: FakeSystemd262
) -> None:
    host = session_host
    gate = _gate(pid1)

    async def stopped_by_the_shutdown() -> None:
        gate.queue_shutdown_job("reboot.target")
        await asyncio.sleep(0.2)  # the watcher takes the job from the queue
        raise RuntimeError("stopped")

    gate.hooks[FREEZE] = stopped_by_the_shutdown
    async with host.under_pid1(gate, pid1) as agent:
        await host.prepared(agent, b"data")
        await agent.execute()
        await until(agent, lambda: agent.phase is ph.Phase.IDLE)
        assert agent.last is not None and agent.last.result == "failed"
        assert agent.last.message.endswith("(reboot.target was queued by someone else)")
