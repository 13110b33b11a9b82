"""One life of the agent after a live-update boot, as its own process, for the crash-point tests
(test_faults_crash_points): the real Agent on the emulated kernel, the recording FakeGate, and a
participant whose restore hook retrieves its fd, checks every byte and then confirms (writes a
file; a participant that confirmed in an earlier life keeps what it has and retrieves nothing).

Crash points are counted at the system-call boundary: every ``open`` for writing, ``rename`` and
``unlink`` of the agent's record files (``current.json``, ``history.json``, ``in-flight.json``,
seen through a ``sys.addaudithook`` hook, which runs right before the call) and every call into
the kernel (before and after each ioctl).  ``--kill-at N`` SIGKILLs the process at the Nth point;
``--trace FILE`` writes the list of points.  Session fds kept for a restart (systemd's fd store
on a real system) are kept by the parent: ``--keeper FD`` is a SOCK_SEQPACKET socket to it, and
``LUO_KEPT_FDS`` (JSON, name → inherited fd) hands them back.

Without ``--kill-at`` the agent finishes what it finds (Restore, and Finish if the restore gate
failed, as an operator would) and prints one JSON line: the phases it saw and its last record.
With ``--prepare-and-cancel ID`` it is the life before a reboot instead: it hands in an fd,
prepares update ID and cancels it.

    python -m tests.faults.crash_scenario --abi ABI --machine ROOT --work DIR --keeper FD \
        [--kill-at N | --trace FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from luo_agent import phase as ph
from luo_agent.agent import Agent
from luo_agent.kernel.emulator import EmulatedMachine, EmulatedSyscalls
from luo_agent.log import configure_logging
from luo_agent.persist import write_atomic
from tests.agent_host import AgentHost, build_agent, until
from tests.fakes.gate import FakeGate

RECORD_FILES = ("current.json", "history.json", "in-flight.json")
SESSION, TOKEN = "vm-1", 7
RESTORE = ph.SPECS[ph.Phase.RESTORING].target


class CrashPoints:
    def __init__(self, kill_at: int | None, trace: Path | None) -> None:
        self.count = 0
        self.kill_at = kill_at
        self.trace = open(trace, "a") if trace is not None else None  # noqa: SIM115

    def reached(self, what: str) -> None:
        if self.trace is not None:
            self.trace.write(f"{self.count} {what}\n")
            self.trace.flush()
        if self.count == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        self.count += 1

    def audit(self, event: str, args: tuple[Any, ...]) -> None:
        if event == "open":
            path, _, flags = args
            if isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR):
                name = os.path.basename(str(path))
                if name.startswith(".") and name.removeprefix(".").removesuffix(".tmp") in (
                    RECORD_FILES
                ):
                    self.reached(f"open-for-write {name}")
        elif event == "os.rename":
            target = os.path.basename(str(args[1]))
            if target in RECORD_FILES:
                self.reached(f"rename {target}")
        elif event == "os.remove":
            target = os.path.basename(str(args[0]))
            if target in RECORD_FILES:
                self.reached(f"unlink {target}")


class CrashingSyscalls(EmulatedSyscalls):
    """The emulated kernel's entry point, with a crash point on each side of every ioctl."""

    points: CrashPoints

    def ioctl(self, fd: int, request: int, buf: bytearray) -> int:
        self.points.reached(f"before ioctl {request:#x}")
        result = super().ioctl(fd, request, buf)
        self.points.reached(f"after ioctl {request:#x}")
        return result


class Keeper:
    """``FdCustody`` over the parent process (the stand-in for systemd's fd store)."""

    def __init__(self, sock: socket.socket, kept: dict[str, int]) -> None:
        self.sock = sock
        self.kept = kept

    def inherited(self) -> dict[str, int]:
        kept, self.kept = self.kept, {}
        return kept

    def keep(self, name: str, fd: int) -> None:
        socket.send_fds(self.sock, [f"keep {name}".encode()], [fd])

    def drop(self, name: str) -> None:
        self.sock.send(f"drop {name}".encode())

    def keep_outgoing(self, name: str, fd: int) -> None:
        raise OSError("not with the direct reboot strategy")

    def drop_outgoing(self, name: str) -> None:
        pass


def participant(agent: Agent, work: Path, expected: str) -> Any:
    confirmed = work / "participant-confirmed"

    async def restore() -> None:
        if confirmed.exists():
            return  # restored in an earlier life: it keeps what it has
        fd = await agent.retrieve(SESSION, TOKEN)
        try:
            digest = hashlib.sha256(os.pread(fd, os.fstat(fd).st_size, 0)).hexdigest()
        finally:
            os.close(fd)
        if digest != expected:
            raise RuntimeError(f"restored bytes differ: {digest}")
        # Whole or not at all: the agent's threads (the in-flight write at restoring) may be
        # killed while this hook, in the same process, writes.
        write_atomic(confirmed, digest.encode())

    return restore


async def one_life(args: argparse.Namespace, points: CrashPoints) -> dict[str, Any]:
    host = AgentHost(args.work, args.abi, EmulatedMachine(args.machine))
    config = host.config()
    syscalls = CrashingSyscalls(args.machine)
    syscalls.points = points
    keeper = Keeper(
        socket.socket(fileno=args.keeper), json.loads(os.environ.get("LUO_KEPT_FDS", "{}"))
    )
    gate = FakeGate()
    agent = build_agent(config, syscalls, gate, keeper)
    gate.hooks[RESTORE] = participant(agent, args.work, args.expected)
    phases: list[str] = []

    class Seen:
        def phase_changed(self, record: object, phase: ph.Phase) -> None:
            phases.append(str(phase))

        def update_finished(self, record: object) -> None:
            pass

        def kernel_state_changed(self, value: str) -> None:
            pass

    agent.listeners.append(Seen())
    runner = asyncio.create_task(agent.run())
    try:
        await agent.start()
        await agent.resume()
        await until(agent, lambda: agent.phase in (ph.Phase.IDLE, ph.Phase.UPDATED), 20)
        if args.prepare_and_cancel:
            fd = os.memfd_create("participant", os.MFD_CLOEXEC)
            os.write(fd, b"participant state")
            agent.preserve(fd, SESSION, TOKEN, [], owner="uid=0")
            os.close(fd)
            await agent.prepare(args.prepare_and_cancel, caller="test")
            await until(agent, lambda: agent.phase is ph.Phase.PREPARED, 20)
            await agent.cancel()
            await until(agent, lambda: agent.phase is ph.Phase.IDLE, 20)
        if agent.phase is ph.Phase.UPDATED:  # the restore gate failed: the operator finishes
            await agent.finish()
            await until(agent, lambda: agent.phase is ph.Phase.IDLE, 20)
        last = agent.last
        return {"phases": phases, "last": last.to_json() if last else None}
    finally:
        await agent.stop()
        runner.cancel()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--abi", required=True)
    parser.add_argument("--machine", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--keeper", type=int, required=True)
    parser.add_argument("--expected", required=True, help="sha256 of the participant's bytes")
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--trace", type=Path)
    parser.add_argument("--prepare-and-cancel", metavar="ID", default="")
    args = parser.parse_args()
    configure_logging("console", "info")  # to stderr: stdout is the result
    points = CrashPoints(args.kill_at, args.trace)
    sys.addaudithook(points.audit)
    print(json.dumps(asyncio.run(one_life(args, points))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
