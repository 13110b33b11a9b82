"""``liveupdatectl fleet …``: the fleet's coordinator, asked directly with the agent's ``[fleet]``
configuration (the agent's own slot is in ``liveupdatectl status`` and the ``Fleet`` property).

It needs no agent and no bus: an operator may release a dead host's slot or halt a rollout from
any host that has the configuration and its credentials (root-only files, like the agent's).
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Final

from ..config import load_config
from ..errors import ConfigError, CoordinatorError, CoordinatorUnavailable, LuoError
from ..fleet import make_coordinator
from ..fleet.port import FleetStatus
from .output import ExitCode, Output

REQUEST_SECONDS: Final = 30.0


def add_fleet_commands(
    fleet: argparse.ArgumentParser, parents: list[argparse.ArgumentParser]
) -> None:
    fleet.add_argument(
        "--config",
        type=Path,
        default=None,
        help="the agent's configuration file (default /etc/luo-agent/config.toml)",
    )
    sub = fleet.add_subparsers(dest="fleet_command", required=True, metavar="FLEET_COMMAND")
    sub.add_parser(
        "status", parents=parents, help="each semaphore's slots and holders, the halt, failed hosts"
    )
    s = sub.add_parser("release", parents=parents, help="give back a slot (default: this host's)")
    s.add_argument("host", nargs="?", default="", help="the holder id (default: this host)")
    s.add_argument(
        "--force",
        action="store_true",
        required=True,
        help="required: the host must not be in a blackout (a failed host is forgiven too)",
    )
    s = sub.add_parser(
        "halt", parents=parents, help="stop the rollout: nobody takes a slot until resume"
    )
    s.add_argument("--reason", default="halted by an operator", help="shown to every host")
    sub.add_parser("resume", parents=parents, help="lift the halt and forget the failed hosts")
    s = sub.add_parser(
        "set-max", parents=parents, help="change the slot count of an existing semaphore"
    )
    s.add_argument("slots", type=int, help="the new count (>= 1); holders are kept")
    s.add_argument("--zone", action="store_true", help="this host's zone semaphore instead")


async def cmd_fleet(args: argparse.Namespace, out: Output) -> ExitCode:
    try:
        config = load_config(args.config)
        fleet = config.fleet
        if not fleet.enabled:
            raise ConfigError(str(args.config or "config"), "fleet.enabled", "the fleet is off")
        coordinator = make_coordinator(fleet)
    except ConfigError as exc:
        out.error("liveupdatectl.InvalidArgument", str(exc), ExitCode.INVALID)
        return ExitCode.INVALID
    try:
        async with asyncio.timeout(REQUEST_SECONDS):
            match args.fleet_command:
                case "status":
                    status = await coordinator.status()
                    out.result({"fleet": _status_json(status)}, lambda: _print_status(status))
                    return ExitCode.OK
                case "release":
                    await coordinator.force_release(args.host or coordinator.host_id)
                case "halt":
                    await coordinator.halt(args.reason)
                case "resume":
                    await coordinator.resume()
                case "set-max":
                    await coordinator.set_max(args.slots, zone=args.zone)
    except TimeoutError:
        out.error(
            "liveupdatectl.CoordinatorUnavailable",
            f"{coordinator.describe} did not answer within {REQUEST_SECONDS:g}s",
            ExitCode.UNAVAILABLE,
        )
        return ExitCode.UNAVAILABLE
    except CoordinatorUnavailable as exc:
        out.error("liveupdatectl.CoordinatorUnavailable", str(exc), ExitCode.UNAVAILABLE)
        return ExitCode.UNAVAILABLE
    except (CoordinatorError, LuoError) as exc:
        out.error("liveupdatectl.CoordinatorError", str(exc), ExitCode.FAILURE)
        return ExitCode.FAILURE
    out.result({"fleet": args.fleet_command}, lambda: print(f"fleet {args.fleet_command}: done"))
    return ExitCode.OK


def _status_json(status: FleetStatus) -> dict[str, object]:
    return {
        "host": status.host_id,
        "holding": status.holding,
        "halted": status.halted,
        "failed": list(status.failed),
        "semaphores": [
            {"group": s.group, "total_slots": s.total_slots, "holders": list(s.holders)}
            for s in status.semaphores
        ],
    }


def _print_status(status: FleetStatus) -> None:
    print(f"This host:  {status.host_id} ({'holding' if status.holding else 'not holding'})")
    print(f"Rollout:    {'HALTED: ' + status.halted if status.halted else 'running'}")
    if status.failed:
        print(f"Failed:     {', '.join(status.failed)}")
    for s in status.semaphores:
        print(f"Group {s.group}: {len(s.holders)}/{s.total_slots} slots")
        for holder in s.holders:
            print(f"  {holder}")
