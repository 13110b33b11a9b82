"""SIGKILL at every crash point of a restore and finish, on every kernel backend (issue 13, items 1
and 2): before each open-for-write, rename and unlink of the agent's record files and on both
sides of every kernel call, in the agent's first life after a live-update boot
(``crash_scenario``).  A second life then runs on the same machine, state and kept session fds,
as systemd would restart the agent.

After every kill the history must hold exactly one entry for the update, matching what the
kernel and the participant reached: ``success`` iff the participant confirmed its bytes (and
those bytes were equal), otherwise ``finished-with-losses``; never a missing entry, never
``aborted`` for an update the kernel finished.  The kernel is normal afterwards and no record
file is left behind.

The same is done for the life before a reboot (prepare, then cancel): one entry once the update
is on disk, ``cancelled`` if the dead agent had recorded the cancel, else ``aborted``; nothing
left preserved in the kernel."""

from __future__ import annotations

import array
import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from luo_agent import phase as ph
from luo_agent.kernel.device import Abi
from luo_agent.kernel.emulator import EmulatedMachine
from luo_agent.kernel.uapi import rfc_v2
from luo_agent.persist import History
from tests.agent_host import AgentHost, memfd_with, until
from tests.fakes.gate import FakeGate

from .crash_scenario import SESSION, TOKEN

FD_PRESERVE, PREPARE = rfc_v2.LIVEUPDATE_IOCTL_FD_PRESERVE, rfc_v2.LIVEUPDATE_IOCTL_EVENT_PREPARE

REPO = Path(__file__).resolve().parents[2]
DATA = os.urandom(1 << 16)
EXPECTED = hashlib.sha256(DATA).hexdigest()
UPDATE_ID = "crash-1"
ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO)}


class FdKeeper:
    """The parent's side of ``crash_scenario.Keeper``: systemd's fd store, for the session ABI."""

    def __init__(self) -> None:
        self.kept: dict[str, int] = {}

    def life(self, argv: list[str], log: Path) -> subprocess.CompletedProcess[str]:
        """Run one life of the agent; its log goes to ``log`` (stderr is the log)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        kept = dict(self.kept)
        try:
            with open(log, "a") as stderr:
                proc = subprocess.Popen(
                    [*argv, "--keeper", str(theirs.fileno())],
                    cwd=REPO,
                    env=ENV | {"LUO_KEPT_FDS": json.dumps(kept)},
                    pass_fds=(theirs.fileno(), *kept.values()),
                    stdout=subprocess.PIPE,
                    stderr=stderr,
                    text=True,
                )
            theirs.close()
            # The child owns the fds it inherited; the store keeps its own until told to drop.
            while True:
                readable, _, _ = select.select([ours], [], [], 0.05)
                if readable and not self._receive(ours):
                    break  # the child's end is closed: it exited
            out, _ = proc.communicate(timeout=60)
            return subprocess.CompletedProcess(proc.args, proc.returncode, out, log.read_text())
        finally:
            ours.close()
            theirs.close()

    def _receive(self, sock: socket.socket) -> bool:
        fds = array.array("i")
        msg, ancdata, _, _ = sock.recvmsg(256, socket.CMSG_SPACE(4 * fds.itemsize))
        if not msg:
            return False
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
        op, name = msg.decode().split(" ", 1)
        self.drop(name)
        if op == "keep":
            self.kept[name] = fds[0]
        return True

    def drop(self, name: str) -> None:
        if name in self.kept:
            os.close(self.kept.pop(name))

    def close(self) -> None:
        for name in list(self.kept):
            self.drop(name)


async def kexec_into_the_update(tmp: Path, abi: str) -> Path:
    """A whole first boot up to the kexec; returns the powered-down machine's directory (with
    the handover image, the agent's state and the kernel image), to copy for every life."""
    host = AgentHost(tmp, abi, EmulatedMachine(tmp / "machine", abi))
    host.machine.boot()
    fd = memfd_with(DATA, 0)
    async with host.agent(FakeGate()) as agent:
        agent.preserve(fd, SESSION, TOKEN, [], owner="uid=0")
        os.close(fd)
        kfd = host.kernel_image()
        await agent.load_kernel(kfd, -1, "console=ttyS0")
        os.close(kfd)
        await agent.prepare(UPDATE_ID, caller="test")
        await until(agent, lambda: agent.phase is ph.Phase.PREPARED)
        await agent.execute(UPDATE_ID)
        await asyncio.to_thread(host.machine.wait_down, 10)
    shutil.rmtree(tmp / "run")  # /run is a tmpfs: no reboot keeps it
    return tmp


def live_update_boot(snapshot: Path, tmp: Path, abi: str) -> AgentHost:
    """A copy of the machine after the kexec, booted: the new kernel with the handover."""
    shutil.copytree(snapshot, tmp, ignore=_sockets)
    host = AgentHost(tmp, abi, EmulatedMachine(tmp / "machine"))
    host.machine.boot()
    return host


def _sockets(directory: str, names: list[str]) -> list[str]:
    return [n for n in names if stat.S_ISSOCK(os.lstat(os.path.join(directory, n)).st_mode)]


def scenario(host: AgentHost, *extra: str) -> list[str]:
    return [
        *(sys.executable, "-m", "tests.faults.crash_scenario", "--abi", host.abi),
        *("--machine", str(host.machine.root), "--work", str(host.workdir)),
        *("--expected", EXPECTED, *extra),
    ]


@contextlib.contextmanager
def keeper() -> Iterator[FdKeeper]:
    store = FdKeeper()
    try:
        yield store
    finally:
        store.close()


def crash_points(snapshot: Path, tmp: Path, abi: str) -> list[str]:
    host = live_update_boot(snapshot, tmp, abi)
    try:
        with keeper() as store:
            trace = tmp / "trace"
            done = store.life(scenario(host, "--trace", str(trace)), tmp / "agent.log")
            assert done.returncode == 0, done.stderr
            assert json.loads(done.stdout)["last"]["result"] == "success"
            return trace.read_text().splitlines()
    finally:
        host.machine.poweroff()


# On the session ABI, a kill between RETRIEVE_SESSION of the agent's own session (the first
# device ioctl) and its push to the fd store: the kernel finishes that session with the process,
# the participants' sessions stay carried, and the next agent takes the update from
# in-flight.json (docs/reliability.md): nothing may be lost there.
NO_LOSS = {(Abi.SESSION, "1 after ioctl 0xba01")}


def check_outcome(host: AgentHost, point: str) -> None:
    confirmed = host.workdir / "participant-confirmed"
    entries = [e for e in History(host.workdir / "state").load() if e["id"] == UPDATE_ID]
    assert len(entries) == 1, (point, entries)
    (entry,) = entries
    if (host.abi, point) in NO_LOSS:
        assert confirmed.exists(), (point, entry)
    if confirmed.exists():
        assert confirmed.read_text() == EXPECTED
        assert entry["result"] == "success", (point, entry)
    else:
        assert entry["result"] == "finished-with-losses", (point, entry)
        assert f"{SESSION}/{TOKEN}" in entry["message"], (point, entry)
    assert host.kernel_state() == "normal", (point, host.machine.inspect())
    if abi_has_incoming(host):
        assert host.machine.inspect()["incoming_sessions"] == [], point
    leftovers = [
        p.name
        for p in (host.workdir / "run" / "current.json", host.workdir / "state" / "in-flight.json")
        if p.exists()
    ]
    assert leftovers == [], (point, leftovers)


def abi_has_incoming(host: AgentHost) -> bool:
    return host.abi == Abi.SESSION


def kill_and_restart(snapshot: Path, tmp: Path, abi: str, index: int, point: str) -> str:
    """Kill the agent's first life at point ``index``, run a second; "" or what went wrong."""
    host = live_update_boot(snapshot, tmp, abi)
    try:
        with keeper() as store:
            killed = store.life(scenario(host, "--kill-at", str(index)), tmp / "agent.log")
            if killed.returncode != -signal.SIGKILL:
                return f"{point}: not killed ({killed.returncode}): {killed.stderr[-2000:]}"
            again = store.life(scenario(host), tmp / "agent.log")
            if again.returncode != 0:
                return f"{point}: the restarted agent failed: {again.stderr[-3000:]}"
            try:
                check_outcome(host, point)
            except AssertionError as exc:
                return f"{point}: {exc}"
            return ""
    finally:
        host.machine.poweroff()


async def test_sigkill_at_every_crash_point_of_restore_and_finish(tmp_path: Path, abi: str) -> None:
    snapshot = await kexec_into_the_update(tmp_path / "first-boot", abi)
    points = crash_points(snapshot, tmp_path / "trace-run", abi)
    assert any("rename history.json" in p for p in points), points
    assert any("unlink current.json" in p for p in points), points
    assert any("before ioctl" in p for p in points), points
    # Each point on its own copy of the machine: two at a time.
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        outcomes = pool.map(
            lambda item: kill_and_restart(snapshot, tmp_path / f"kill-{item[0]}", abi, *item),
            enumerate(points),
        )
        failures = [failure for failure in outcomes if failure]
    assert failures == [], "\n".join(failures)


def cold_machine(tmp: Path, abi: str) -> Path:
    """A machine that was never booted: the snapshot for the lives before a reboot."""
    EmulatedMachine(tmp / "machine", abi)
    return tmp


def on_disk_before_restart(host: AgentHost) -> tuple[str, bool]:
    """What the killed agent left: the phase in current.json ("" if none), and whether the
    history already has the update."""
    try:
        phase = json.loads((host.workdir / "run" / "current.json").read_text())["phase"]
    except FileNotFoundError:
        phase = ""
    recorded = any(e["id"] == UPDATE_ID for e in History(host.workdir / "state").load())
    return phase, recorded


def unrecorded_tokens_window(abi: str, points: list[str]) -> range:
    """Known limit (docs/reliability.md): rfc-v2 makes its own tokens and has no call to list
    them, so from the first FD_PRESERVE's return until current.json records the tokens (after
    EVENT_PREPARE) a killed agent leaves files preserved that no later agent can name."""
    if abi != Abi.RFC_V2:
        return range(0)
    first = next(i for i, p in enumerate(points) if p.endswith(f"after ioctl {FD_PRESERVE:#x}"))
    prepared = next(i for i, p in enumerate(points) if p.endswith(f"after ioctl {PREPARE:#x}"))
    recorded = next(i for i in range(prepared, len(points)) if "rename current.json" in points[i])
    return range(first, recorded + 1)


def kill_prepare_and_cancel(
    snapshot: Path, tmp: Path, abi: str, index: int, point: str, limit: range
) -> str:
    host = live_update_boot(snapshot, tmp, abi)
    try:
        with keeper() as store:
            first = scenario(host, "--prepare-and-cancel", UPDATE_ID, "--kill-at", str(index))
            killed = store.life(first, tmp / "agent.log")
            if killed.returncode != -signal.SIGKILL:
                return f"{point}: not killed ({killed.returncode}): {killed.stderr[-2000:]}"
            phase, recorded = on_disk_before_restart(host)
            again = store.life(scenario(host), tmp / "agent.log")
            if again.returncode != 0:
                return f"{point}: the restarted agent failed: {again.stderr[-3000:]}"
        entries = [e for e in History(host.workdir / "state").load() if e["id"] == UPDATE_ID]
        if recorded or phase:
            # Recorded, or under way on disk: exactly one entry, cancelled if the dead agent
            # had begun cancelling, otherwise aborted.
            wanted = "cancelled" if recorded or phase == "cancelling" else "aborted"
            results = [e["result"] for e in entries]
            if results != [wanted]:
                return f"{point}: current.json said {phase!r}: {results}, not [{wanted!r}]"
        elif entries:
            return f"{point}: nothing on disk, yet recorded: {entries}"
        if host.kernel_state() != "normal":
            return f"{point}: kernel not normal: {host.machine.inspect()}"
        if host.kernel_files() != 0 and index not in limit:
            return f"{point}: files left preserved: {host.machine.inspect()}"
        left = [
            p for p in ("run/current.json", "state/in-flight.json") if (host.workdir / p).exists()
        ]
        return f"{point}: left behind: {left}" if left else ""
    finally:
        host.machine.poweroff()


async def test_sigkill_at_every_crash_point_of_prepare_and_cancel(tmp_path: Path, abi: str) -> None:
    snapshot = cold_machine(tmp_path / "cold", abi)
    host = live_update_boot(snapshot, tmp_path / "trace-run", abi)
    try:
        with keeper() as store:
            trace = tmp_path / "trace"
            done = store.life(
                scenario(host, "--prepare-and-cancel", UPDATE_ID, "--trace", str(trace)),
                tmp_path / "trace-run" / "agent.log",
            )
            assert done.returncode == 0, done.stderr
            assert json.loads(done.stdout)["last"]["result"] == "cancelled"
            points = trace.read_text().splitlines()
    finally:
        host.machine.poweroff()
    assert any("rename history.json" in p for p in points), points
    assert any("rename in-flight.json" in p for p in points), points
    limit = unrecorded_tokens_window(abi, points)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        outcomes = pool.map(
            lambda item: kill_prepare_and_cancel(
                snapshot, tmp_path / f"kill-{item[0]}", abi, *item, limit
            ),
            enumerate(points),
        )
        failures = [failure for failure in outcomes if failure]
    assert failures == [], "\n".join(failures)
