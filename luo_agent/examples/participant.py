"""An example live-update participant of the full hook model, built on the participant kit
(``luo_agent.participant``): a small workload that keeps its data in a memfd, hands it to the agent
in the prepare phase and, after the live-update boot, retrieves it and verifies every byte.
units/luo-example-*.service run it; docs/participants.md walks through it.

    serve     the workload (long-running); listens on <runtime>/control.sock
    prepare   ExecStart of the prepare hook: asks the workload to preserve its memfd
    restore   ExecStart of the restore hook: asks the workload to retrieve and verify it
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..client import get_property
from ..participant import Participant, ask, command_handler, notify, run_hooks
from ..persist import write_atomic

SESSION = "example"
TOKEN = 1
CHUNK = 4 << 20


@dataclass
class Workload:
    state_dir: Path
    size: int
    bus_kind: str | None
    memfd: int = -1

    @property
    def expected_file(self) -> Path:
        return self.state_dir / "expected.json"

    @property
    def result_file(self) -> Path:
        return self.state_dir / "last-restore.json"

    def create(self) -> None:
        self.memfd = os.memfd_create("luo-example-data", os.MFD_CLOEXEC)
        # In chunks: a memfd of hundreds of MiB never has a copy of itself beside it.
        for offset in range(0, self.size, CHUNK):
            os.pwrite(self.memfd, secrets.token_bytes(min(CHUNK, self.size - offset)), offset)
        # A non-trivial file position: the kernel carries it too.
        os.lseek(self.memfd, self.size // 3, os.SEEK_SET)

    def describe(self) -> dict[str, Any]:
        size = os.fstat(self.memfd).st_size
        digest = hashlib.sha256()
        for offset in range(0, size, CHUNK):
            digest.update(os.pread(self.memfd, min(CHUNK, size - offset), offset))
        pos = os.lseek(self.memfd, 0, os.SEEK_CUR)
        return {"size": size, "pos": pos, "sha256": digest.hexdigest()}

    async def preserve(self) -> str:
        if self.memfd < 0:
            self.create()
        expected = self.describe()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.expected_file, json.dumps(expected).encode(), durable=True)
        async with await Participant.connect(SESSION, self.bus_kind) as agent:
            await agent.preserve(TOKEN, self.memfd)
        return f"preserved {expected['size']} bytes sha256={expected['sha256'][:16]}"

    async def restore(self) -> str:
        async with await Participant.connect(SESSION, self.bus_kind) as agent:
            fd = await agent.retrieve(TOKEN)
        if self.memfd >= 0:
            os.close(self.memfd)
        self.memfd = fd
        got = self.describe()
        expected = json.loads(self.expected_file.read_text())
        verified = got == expected
        write_atomic(
            self.result_file,
            json.dumps({"verified": verified, "expected": expected, "got": got}).encode(),
        )
        if not verified:
            raise RuntimeError(f"data mismatch after live update: expected {expected}, got {got}")
        return f"verified {got['size']} bytes sha256={got['sha256'][:16]} pos={got['pos']}"


async def serve(args: argparse.Namespace) -> int:
    workload = Workload(Path(args.state_dir), args.size, args.bus)
    last_id, last_result, last_message = "", "", ""
    try:
        async with await Participant.connect(SESSION, args.bus) as agent:
            live_update_boot = agent.live_update_boot
            last_id, last_result, _, last_message = await get_property(agent.bus, "LastResult")
    except Exception:  # no agent: an ordinary boot as far as this workload can tell
        live_update_boot = False
    if not live_update_boot:
        if last_result == "lost-in-reboot" and workload.expected_file.exists():
            # What it handed in was not carried: say so once, and start afresh.
            workload.expected_file.rename(workload.expected_file.with_suffix(".lost.json"))
            print(
                f"luo-example: started without the state it preserved: update {last_id} was "
                f"lost in the reboot ({last_message})",
                flush=True,
            )
        workload.create()
        print(f"luo-example: fresh data, {workload.describe()}", flush=True)
    else:
        print("luo-example: live-update boot, waiting for the restore phase", flush=True)
    sock = Path(args.runtime_dir) / "control.sock"
    sock.parent.mkdir(parents=True, exist_ok=True)
    sock.unlink(missing_ok=True)
    commands = {"preserve": workload.preserve, "restore": workload.restore}
    server = await asyncio.start_unix_server(
        command_handler(commands, "luo-example"), path=str(sock)
    )
    notify("READY=1")
    async with server:
        await server.serve_forever()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="luo-example-participant")
    parser.add_argument("command", choices=("serve", "prepare", "restore"))
    parser.add_argument("--state-dir", default="/var/lib/luo-example")
    parser.add_argument("--runtime-dir", default="/run/luo-example")
    parser.add_argument("--size", type=int, default=4 << 20)
    parser.add_argument("--bus", choices=("system", "session"), default=None)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return asyncio.run(serve(args))
    sock = Path(args.runtime_dir) / "control.sock"

    async def hook(command: str) -> None:
        print(await ask(sock, command), flush=True)

    hooks = {"prepare": lambda: hook("preserve"), "restore": lambda: hook("restore")}
    return run_hooks(hooks, [parser.prog, args.command])


if __name__ == "__main__":
    sys.exit(main())
