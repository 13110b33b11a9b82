"""One run of liveupdatectl: parse, connect, run one command, and turn every failure (a bad
argument, no bus, a D-Bus error, a lost connection) into one error document and a stable exit
code."""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Final

from ..client import CallError, bus_kind, connect
from ..dbus.names import ERROR_PREFIX
from .arguments import UsageError, check_arguments, parser
from .commands import COMMANDS
from .fleet import cmd_fleet
from .output import ExitCode, Output

ERROR_EXIT: Final[dict[str, ExitCode]] = {
    f"{ERROR_PREFIX}.NotAuthorized": ExitCode.NOT_AUTHORIZED,
    "org.freedesktop.DBus.Error.AccessDenied": ExitCode.NOT_AUTHORIZED,
    f"{ERROR_PREFIX}.Busy": ExitCode.BUSY,
    f"{ERROR_PREFIX}.UpdateEnded": ExitCode.ENDED,
    f"{ERROR_PREFIX}.KernelBusy": ExitCode.BUSY,
    f"{ERROR_PREFIX}.WrongPhase": ExitCode.BLOCKED,
    f"{ERROR_PREFIX}.InvalidArgument": ExitCode.INVALID,
    "org.freedesktop.DBus.Error.InvalidArgs": ExitCode.INVALID,
    f"{ERROR_PREFIX}.NoSuchSession": ExitCode.INVALID,
    f"{ERROR_PREFIX}.NoSuchToken": ExitCode.INVALID,
    f"{ERROR_PREFIX}.AlreadyExists": ExitCode.INVALID,
    "org.freedesktop.DBus.Error.ServiceUnknown": ExitCode.UNAVAILABLE,
    "org.freedesktop.DBus.Error.NameHasNoOwner": ExitCode.UNAVAILABLE,
    "org.freedesktop.DBus.Error.NoReply": ExitCode.UNAVAILABLE,
}


AGENT_ABSENT: Final = (
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
)
NO_AGENT_HINT: Final = {
    "system": "luo-agent is not running on the system bus: start it with "
    "'systemctl start luo-agent.service'; for an agent on the session bus (the demo, tests) "
    "use --session-bus.",
    "session": "luo-agent is not running on the session bus named by DBUS_SESSION_BUS_ADDRESS.",
}
NO_BUS_HINT: Final = {
    "system": "is dbus running? For an agent on the session bus (the demo, tests) use "
    "--session-bus.",
    "session": "DBUS_SESSION_BUS_ADDRESS must name a running bus "
    "(./scripts/demo --keep prints one).",
}


def _bus_address(kind: str) -> str:
    """The bus's address for an error message (" at ADDRESS"), if the environment names it."""
    if kind == "session":
        address = os.environ.get("DBUS_SESSION_BUS_ADDRESS")
    else:
        address = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/run/dbus/system_bus_socket")
    return f" at {address}" if address else ""


async def run(args: argparse.Namespace) -> int:
    out = Output(args.json, args.command)
    try:
        check_arguments(args)
    except UsageError as exc:
        out.error("liveupdatectl.InvalidArgument", str(exc), ExitCode.INVALID)
        return ExitCode.INVALID
    if args.command == "fleet":  # the coordinator, not the agent: no bus
        return await cmd_fleet(args, out)
    kind = bus_kind("session" if args.session_bus else None)
    try:
        bus = await connect(kind)
    except Exception as exc:  # no bus at all
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        out.error(
            "org.freedesktop.DBus.Error.NoServer",
            f"cannot connect to the {kind} bus{_bus_address(kind)}: {reason}",
            ExitCode.UNAVAILABLE,
            hint=NO_BUS_HINT[kind],
        )
        return ExitCode.UNAVAILABLE
    try:
        return int(await COMMANDS[args.command](bus, args, out))
    except CallError as exc:
        code = ERROR_EXIT.get(exc.name, ExitCode.FAILURE)
        hint = NO_AGENT_HINT[kind] if exc.name in AGENT_ABSENT else ""
        out.error(exc.name, exc.text, code, hint=hint)
        return code
    except (EOFError, ConnectionError) as exc:  # the bus connection broke mid-command
        out.error("liveupdatectl.Disconnected", str(exc) or "lost the bus", ExitCode.UNAVAILABLE)
        return ExitCode.UNAVAILABLE
    except OSError as exc:  # a file named on the command line
        out.error("liveupdatectl.OSError", str(exc), ExitCode.INVALID)
        return ExitCode.INVALID
    finally:
        bus.disconnect()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(asyncio.run(run(args)))
