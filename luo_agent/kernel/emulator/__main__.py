"""``luo-emukernel`` (``python -m luo_agent.kernel.emulator``): boot, power off, check and inspect
an emulated machine's kernel server from a shell."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

from luo_agent.errors import HandoverCorrupt
from luo_agent.kernel.device import Abi

from .machine import EmulatedMachine

COMMANDS = {
    "boot": "start the kernel (after an emulated kexec: the new one, over the handover)",
    "poweroff": "stop the kernel without a handover (a power cycle: its state is lost)",
    "status": "print running or down (exit 3 when down)",
    "inspect": "print the kernel's state as JSON (sessions, preserved files, ...)",
}
DESCRIPTION = (
    "Run and inspect an emulated Live Update Orchestrator kernel: a stand-in for /dev/liveupdate "
    "that answers the same requests as the kernel does, for machines without a LUO kernel (the "
    "demo and the tests use it; luo-agent --emulate ROOT drives it).  The emulated machine lives "
    "in the directory ROOT; see docs/emulator.md."
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="luo-emukernel",
        description=textwrap.fill(DESCRIPTION, 78),
        formatter_class=argparse.RawDescriptionHelpFormatter,  # keeps the command table
        epilog="commands:\n" + "\n".join(f"  {n:9} {text}" for n, text in COMMANDS.items()),
    )
    p.add_argument(
        "command", choices=COMMANDS, metavar="COMMAND", help="what to do (commands below)"
    )
    p.add_argument("--root", required=True, type=Path, help="the emulated machine's directory")
    p.add_argument(
        "--abi",
        choices=tuple(Abi),
        help="the kernel's LUO ABI, recorded at the first boot (default: the recorded one)",
    )
    p.add_argument(
        "--profile",
        choices=("6.19", "g6"),
        help="session ABI only: 6.19 as merged (default) or g6 with the later additions",
    )
    p.add_argument(
        "--foreground", action="store_true", help="boot: run the kernel server in this process"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="boot: how long to wait for the kernel to come up (default %(default)g)",
    )
    p.add_argument("--ready-fd", type=int, default=-1, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    if args.command == "boot" and args.foreground:
        from .process import serve

        if args.abi is not None:
            EmulatedMachine(args.root, args.abi, args.profile)  # records abi/profile
        return serve(args.root.absolute(), args.ready_fd)

    try:
        machine = EmulatedMachine(args.root, args.abi, args.profile)
    except ValueError as exc:  # no machine at --root yet, and no --abi to make one
        print(f"luo-emukernel: {exc}", file=sys.stderr)
        return 2
    match args.command:
        case "boot":
            try:
                machine.boot(args.timeout)
            except HandoverCorrupt as exc:
                print(f"kernel panic: {exc}", file=sys.stderr)
                return 1
            print(f"booted {machine.abi} at {machine.root}")
        case "poweroff":
            machine.poweroff()
        case "status":
            print("running" if machine.running else "down")
            return 0 if machine.running else 3
        case "inspect":
            if not machine.running:
                print(f"luo-emukernel: the machine at {machine.root} is down", file=sys.stderr)
                return 3  # as status says "down"
            json.dump(machine.inspect(), sys.stdout, indent=2, sort_keys=True)
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
