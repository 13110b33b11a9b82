"""A phase hook for the fault-injection suite, run by the sandboxed systemd as a oneshot unit.

    python -m tests.faults.fault_participant PHASE --dir DIR

What it does in PHASE is steered by the test through files in DIR (written before the phase):

* ``DIR/mode-PHASE``: ``ok`` (default), ``fail`` (exit 1 before doing anything) or ``hang``
  (block reading the FIFO ``DIR/release-PHASE`` until the test writes a line to it, then do the
  phase's work);
* ``prepare`` hands a memfd of random bytes (with a non-zero file position) to the agent and
  records what it handed in ``DIR/expected.json``; ``restore`` retrieves it and writes
  ``DIR/restored.json`` with what it got; every phase appends its name to ``DIR/ran``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from luo_agent.client import call, connect
from luo_agent.persist import write_atomic

SESSION = "fault"
TOKEN = 7
SIZE = 96 << 10


def describe(fd: int) -> dict[str, Any]:
    size = os.fstat(fd).st_size
    return {
        "size": size,
        "pos": os.lseek(fd, 0, os.SEEK_CUR),
        "sha256": hashlib.sha256(os.pread(fd, size, 0)).hexdigest(),
    }


async def prepare(directory: Path) -> None:
    fd = os.memfd_create("fault-participant", os.MFD_CLOEXEC)
    try:
        os.write(fd, secrets.token_bytes(SIZE))
        os.lseek(fd, SIZE // 5, os.SEEK_SET)
        write_atomic(directory / "expected.json", json.dumps(describe(fd)).encode(), durable=True)
        bus = await connect("session")
        try:
            await call(bus, "Preserve", "hsta{sv}", [0, SESSION, TOKEN, {}], unix_fds=[fd])
        finally:
            bus.disconnect()
    finally:
        os.close(fd)


async def restore(directory: Path) -> None:
    bus = await connect("session")
    try:
        (fd,) = await call(bus, "Retrieve", "st", [SESSION, TOKEN])
    finally:
        bus.disconnect()
    try:
        got = describe(fd)
    finally:
        os.close(fd)
    write_atomic(directory / "restored.json", json.dumps(got).encode(), durable=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("phase", choices=("prepare", "freeze", "cancel", "restore", "finish"))
    parser.add_argument("--dir", type=Path, required=True)
    args = parser.parse_args(argv)
    directory: Path = args.dir
    mode_file = directory / f"mode-{args.phase}"
    mode = mode_file.read_text().strip() if mode_file.exists() else "ok"
    with open(directory / "ran", "a") as ran:
        ran.write(f"{args.phase} {mode}\n")
    if mode == "fail":
        print(f"{args.phase}: failing as told", file=sys.stderr)
        return 1
    if mode == "hang":
        with open(directory / f"release-{args.phase}") as fifo:  # blocks until the test writes
            fifo.readline()
    if args.phase == "prepare":
        asyncio.run(prepare(directory))
    elif args.phase == "restore":
        asyncio.run(restore(directory))
    return 0


if __name__ == "__main__":
    sys.exit(main())
