"""The real Agent on an emulated machine with a FakeGate, served on D-Bus, as its own process (so
tests can run it inside a namespace, count its fds and see it survive hostile callers).

Prints ``ready <pid>`` once the bus name is owned; stops on SIGTERM, or by itself after a kexec
(like the daemon); exits 69 (EX_UNAVAILABLE, as the daemon does) if its bus connection is lost.
Run as ``python -m tests.security.agent_proc`` from the repository root.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from pathlib import Path

from luo_agent.config import load_config
from luo_agent.daemon import EX_OK, EX_UNAVAILABLE
from luo_agent.dbus.bus import wait_until_stopped
from luo_agent.dbus.server import serve
from luo_agent.kernel.emulator import EmulatedSyscalls
from luo_agent.log import configure_logging
from tests.fakes.agent_host import build_agent
from tests.fakes.gate import FakeGate


async def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    gate = FakeGate(hanging=set(args.hang))
    agent = build_agent(config, EmulatedSyscalls(args.machine), gate, on_rebooted=stop.set)
    runner = asyncio.create_task(agent.run())
    await agent.start()
    bus, _ = await serve(agent, config.bus)
    print(f"ready {agent.phase}", flush=True)
    await agent.resume()
    stopped = await wait_until_stopped(bus, stop)
    await agent.stop()
    with contextlib.suppress(Exception):
        bus.disconnect()
    runner.cancel()
    return EX_OK if stopped else EX_UNAVAILABLE


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--machine", type=Path, required=True)
    parser.add_argument("--hang", action="append", default=[], help="a gate target that hangs")
    args = parser.parse_args()
    configure_logging("console", "info")
    status = asyncio.run(run(args))
    sys.stderr.flush()
    sys.exit(status)


if __name__ == "__main__":
    main()
