"""``python -m luo_agent.kernel.emulator {boot,poweroff,status,inspect} --root R``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from luo_agent.errors import HandoverCorrupt

from .machine import EmulatedMachine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="luo-emukernel", description=__doc__)
    parser.add_argument("command", choices=("boot", "poweroff", "status", "inspect"))
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--abi", choices=("rfc-v2", "v3", "session"))
    parser.add_argument("--profile", choices=("6.19", "g6"))
    parser.add_argument(
        "--foreground", action="store_true", help="boot: run the kernel server in this process"
    )
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--ready-fd", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.command == "boot" and args.foreground:
        from .server import serve

        if args.abi is not None:
            EmulatedMachine(args.root, args.abi, args.profile)  # records abi/profile
        return serve(args.root.absolute(), args.ready_fd)

    machine = EmulatedMachine(args.root, args.abi, args.profile)
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
            json.dump(machine.inspect(), sys.stdout, indent=2, sort_keys=True)
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
