"""liveupdatectl: the operator's client of org.luoagent.LiveUpdate1 (the public D-Bus API only).

Human output by default; ``--json`` prints JSON lines: live ``event`` documents while it waits, then
exactly one ``result`` or ``error`` document (``"schema": "liveupdatectl/1"``, described by
docs/cli-schema.json; docs/cli.md).  Exit codes are stable (``ExitCode``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import json
import os
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, NoReturn

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from . import __version__
from .client import CallError, bus_kind, call, connect, get_all, get_property
from .dbus.names import BUS_NAME, ERROR_PREFIX, IFACE_MANAGER, OBJECT_PATH

SCHEMA: Final = "liveupdatectl/1"


class ExitCode(enum.IntEnum):
    OK = 0
    FAILURE = 1  # the operation ran and failed (a participant, the kernel)
    NOTHING_TO_DO = 2  # e.g. cancel with no update in progress
    BUSY = 3  # another update is in progress / the kernel device is held by someone else
    BLOCKED = 4  # check found blockers / wrong phase for this command
    NOT_AUTHORIZED = 5
    INVALID = 6  # a bad argument
    UNAVAILABLE = 69  # the agent is not running or not reachable (EX_UNAVAILABLE)


ERROR_EXIT: Final[dict[str, ExitCode]] = {
    f"{ERROR_PREFIX}.NotAuthorized": ExitCode.NOT_AUTHORIZED,
    "org.freedesktop.DBus.Error.AccessDenied": ExitCode.NOT_AUTHORIZED,
    f"{ERROR_PREFIX}.Busy": ExitCode.BUSY,
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


class Output:
    def __init__(self, as_json: bool, command: str) -> None:
        self.as_json = as_json
        self.command = command

    def line(self, text: str) -> None:
        if not self.as_json:
            print(text, flush=True)

    def event(self, **fields: Any) -> None:
        """Live progress: JSON lines with --json, text otherwise."""
        if self.as_json:
            print(
                json.dumps({"schema": SCHEMA, "type": "event", "command": self.command, **fields}),
                flush=True,
            )

    def result(self, data: dict[str, Any], human: Callable[[], None]) -> None:
        if self.as_json:
            document = {"schema": SCHEMA, "type": "result", "command": self.command, **data}
            print(json.dumps(document, default=str), flush=True)
        else:
            human()

    def error(self, name: str, message: str, code: ExitCode, hint: str = "") -> None:
        """The error document (--json), or the error and a hint for a person (systemd's style)."""
        if self.as_json:
            print(
                json.dumps(
                    {
                        "schema": SCHEMA,
                        "type": "error",
                        "command": self.command,
                        "error": name,
                        "message": message,
                        "exit": int(code),
                    }
                ),
                flush=True,
            )
        else:
            print(f"liveupdatectl: {message or name} ({name})", file=sys.stderr, flush=True)
            if hint:
                print(f"Hint: {hint}", file=sys.stderr, flush=True)


class Watcher:
    """Subscribes to the agent's signals *before* a call, so nothing is missed."""

    def __init__(self, bus: MessageBus, out: Output, update_id: str, stream: bool) -> None:
        self.bus, self.out, self.update_id = bus, out, update_id
        self.stream = stream  # print one line (one JSON event) per phase
        self.phase = ""
        self.phases: list[str] = []
        self.finished: tuple[str, str, str] | None = None
        self.agent_gone = False
        self.changed = asyncio.Event()
        self.started = time.monotonic()

    async def subscribe(self) -> None:
        for rule in (
            f"type='signal',sender='{BUS_NAME}',interface='{IFACE_MANAGER}',path='{OBJECT_PATH}'",
            f"type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged',arg0='{BUS_NAME}'",
        ):
            await call(
                self.bus,
                "AddMatch",
                "s",
                [rule],
                interface="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                destination="org.freedesktop.DBus",
            )
        self.bus.add_message_handler(self._on_message)

    def _on_message(self, msg: Message) -> None:
        if msg.message_type != MessageType.SIGNAL:
            return None
        if msg.member == "NameOwnerChanged" and msg.body and msg.body[0] == BUS_NAME:
            if not msg.body[2]:
                self.agent_gone = True
                self.changed.set()
            return None
        if msg.interface != IFACE_MANAGER:
            return None
        if msg.member == "PhaseChanged" and msg.body[0] == self.update_id:
            self.phase = msg.body[1]
            self.phases.append(self.phase)
            if self.stream:
                elapsed = time.monotonic() - self.started
                self.out.line(f"[{elapsed:7.3f}s] {self.update_id}: {self.phase}")
                self.out.event(
                    event="phase",
                    update=self.update_id,
                    phase=self.phase,
                    elapsed=round(elapsed, 6),
                )
            self.changed.set()
        elif msg.member == "Finished" and msg.body[0] == self.update_id:
            self.finished = (msg.body[1], msg.body[2], msg.body[3])
            self.changed.set()
        return None

    async def until(self, done: Callable[[], bool], timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while not done():
                self.changed.clear()
                if done():
                    return
                await self.changed.wait()


# ----------------------------------------------------------------------------- commands


async def cmd_status(bus: MessageBus, args: argparse.Namespace, out: Output) -> ExitCode:
    props = await get_all(bus)

    def human() -> None:
        print(f"Phase:          {props['Phase']}")
        print(f"Kernel ABI:     {props['KernelAbi']} ({props['KernelState']})")
        print(f"Kernel loaded:  {'yes' if props['KernelLoaded'] else 'no'}")
        print(f"Current update: {props['CurrentUpdate'] or '-'}")
        print(f"Progress:       {props['Progress']}%")
        last = props["LastResult"]
        if last[0]:
            print(f"Last update:    {last[0]}: {last[1]}" + (f" ({last[3]})" if last[3] else ""))
        for unit, active, sub, result in props["Participants"]:
            print(f"  {unit:40} {active}/{sub} result={result}")

    out.result({"status": _jsonable(props)}, human)
    return ExitCode.OK


async def cmd_check(bus: MessageBus, args: argparse.Namespace, out: Output) -> ExitCode:
    (report,) = await call(bus, "Check")
    data = {k: v.value for k, v in report.items()}

    def human() -> None:
        print("ready" if data["ready"] else "not ready")
        for blocker in data["blockers"]:
            print(f"  blocker: {blocker}")
        for warning in data.get("warnings", []):
            print(f"  warning: {warning}")

    out.result({"check": data}, human)
    return ExitCode.OK if data["ready"] else ExitCode.BLOCKED


async def _load_kernel(
    bus: MessageBus, kernel: str, initrd: str | None, cmdline: str | None, reuse: bool, out: Output
) -> str:
    if cmdline is None:
        cmdline = Path("/proc/cmdline").read_text().strip() if reuse else ""
    kfd = os.open(kernel, os.O_RDONLY | os.O_CLOEXEC)
    ifd = os.open(initrd or "/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    try:
        (full,) = await call(
            bus,
            "LoadKernel",
            "hhsa{sv}",
            [0, 1, cmdline, {"no-initrd": Variant("b", initrd is None)}],
            unix_fds=[kfd, ifd],
        )
    finally:
        os.close(kfd)
        os.close(ifd)
    return str(full)


async def cmd_load_kernel(bus: MessageBus, args: argparse.Namespace, out: Output) -> ExitCode:
    full = await _load_kernel(bus, args.kernel, args.initrd, args.cmdline, args.reuse_cmdline, out)
    out.result(
        {"kernel": args.kernel, "cmdline": full},
        lambda: print(f"kernel loaded: {args.kernel} cmdline: {full}"),
    )
    return ExitCode.OK


async def cmd_prepare(bus: MessageBus, args: argparse.Namespace, out: Output) -> ExitCode:
    update_id = args.id or _new_id()
    watcher = Watcher(bus, out, update_id, stream=args.wait)
    await watcher.subscribe()
    new_id, path = await call(bus, "Prepare", "a{sv}", [{"id": Variant("s", update_id)}])
    if not args.wait:
        out.result(
            {"update": new_id, "path": path, "phase": "preparing"},
            lambda: print(f"update {new_id} started ({path})"),
        )
        return ExitCode.OK
    out.line(f"update {new_id} started ({path})")
    failed = await _wait(watcher, _prepared, args.timeout, out)
    return failed if failed is not None else _outcome(watcher, out)


# When a wait is over.  A kexec that failed brings the agent back from rebooting (to prepared, or
# to cancelling on rfc-v2); a kexec that worked takes the agent (and, on a real machine, this
# process) away.
def _prepared(w: Watcher) -> bool:
    return w.phase == "prepared" or w.finished is not None or w.agent_gone


def _rebooted(w: Watcher) -> bool:
    kexec_failed = "rebooting" in w.phases and w.phase != "rebooting"
    return w.finished is not None or w.agent_gone or kexec_failed


async def _wait(
    watcher: Watcher, done: Callable[[Watcher], bool], timeout: float, out: Output
) -> ExitCode | None:
    """Wait until ``done``; an exit code only when the wait itself failed (timeout)."""
    try:
        await watcher.until(lambda: done(watcher), timeout)
    except TimeoutError:
        out.error(
            "liveupdatectl.Timeout",
            f"update {watcher.update_id}: still {watcher.phase or 'waiting'} after {timeout:g} s",
            ExitCode.FAILURE,
        )
        return ExitCode.FAILURE
    if watcher.finished is not None:
        # The agent sends Finished, then the PhaseChanged to idle: show that last phase too.
        with contextlib.suppress(TimeoutError):
            await watcher.until(lambda: watcher.phase == "idle" or watcher.agent_gone, 2.0)
    return None


def _outcome(watcher: Watcher, out: Output) -> ExitCode:
    """Print the one result (or error) of a wait and return its exit code."""
    update_id = watcher.update_id
    if watcher.finished is not None:
        result, error_name, message = watcher.finished
        out.result(
            {
                "update": update_id,
                "phase": "idle",
                "result": result,
                "error": error_name,
                "message": message,
            },
            lambda: print(f"update {update_id}: {result}" + (f": {message}" if message else "")),
        )
        return ExitCode.OK if result == "success" else ExitCode.FAILURE
    if watcher.agent_gone and watcher.phase == "rebooting":
        message = "kexec issued; the new kernel's agent finishes the update"
    elif watcher.agent_gone:
        out.error(
            "liveupdatectl.AgentGone",
            f"the agent left the bus in phase {watcher.phase or 'unknown'}",
            ExitCode.UNAVAILABLE,
        )
        return ExitCode.UNAVAILABLE
    elif "rebooting" in watcher.phases:
        out.error(
            "liveupdatectl.KexecFailed",
            f"update {update_id}: the kexec failed; the agent is back in phase {watcher.phase}",
            ExitCode.FAILURE,
        )
        return ExitCode.FAILURE
    else:
        message = ""
    out.result(
        {
            "update": update_id,
            "phase": watcher.phase,
            "result": "",
            "error": "",
            "message": message,
        },
        lambda: print(f"update {update_id}: {watcher.phase}" + (f": {message}" if message else "")),
    )
    return ExitCode.OK


async def cmd_execute(bus: MessageBus, args: argparse.Namespace, out: Output) -> ExitCode:
    update_id = args.id or (await get_all(bus))["CurrentUpdate"]
    watcher = Watcher(bus, out, update_id, stream=args.wait)
    await watcher.subscribe()
    await call(bus, "Execute", "s", [args.id or ""])
    if not args.wait:
        out.result(
            {"update": update_id, "phase": "freezing"},
            lambda: print(f"update {update_id}: freezing"),
        )
        return ExitCode.OK
    failed = await _wait(watcher, _rebooted, args.timeout, out)
    return failed if failed is not None else _outcome(watcher, out)


async def cmd_update(bus: MessageBus, args: argparse.Namespace, out: Output) -> ExitCode:
    """The whole update: load the kernel (if given), prepare, execute.  With --wait it streams
    every phase and ends with the update's result; without, it returns once Execute is accepted."""
    if args.from_environment:
        args.kernel = args.kernel or os.environ.get("LIVEUPDATE_KERNEL")
        args.initrd = args.initrd or os.environ.get("LIVEUPDATE_INITRD") or None
        args.cmdline = args.cmdline or os.environ.get("LIVEUPDATE_CMDLINE")
    update_id = args.id or _new_id()
    watcher = Watcher(bus, out, update_id, stream=args.wait)
    if args.kernel:
        full = await _load_kernel(
            bus, args.kernel, args.initrd, args.cmdline, args.cmdline is None, out
        )
        if args.wait:
            out.line(f"kernel loaded: {args.kernel} cmdline: {full}")
            out.event(event="kernel-loaded", kernel=args.kernel, cmdline=full)
    if not await get_property(bus, "KernelLoaded"):
        # Refused before Prepare: a prepare would have the kernel preserve every participant's fd
        # and then leave the update prepared when Execute is refused.
        out.error(
            "liveupdatectl.NoKernel",
            "no kernel loaded for the kexec: run load-kernel first or pass --kernel; "
            "nothing was started",
            ExitCode.BLOCKED,
        )
        return ExitCode.BLOCKED
    await watcher.subscribe()
    await call(bus, "Prepare", "a{sv}", [{"id": Variant("s", update_id)}])
    failed = await _wait(watcher, _prepared, args.timeout, out)
    if failed is not None:
        return failed
    if watcher.phase != "prepared" or watcher.finished is not None:
        return _outcome(watcher, out)  # it ended (or the agent left) before prepared
    await call(bus, "Execute", "s", [update_id])
    if not args.wait:
        out.result(
            {"update": update_id, "phase": "freezing", "result": "", "error": "", "message": ""},
            lambda: print(f"update {update_id}: prepared, executing"),
        )
        return ExitCode.OK
    failed = await _wait(watcher, _rebooted, args.timeout, out)
    return failed if failed is not None else _outcome(watcher, out)


async def cmd_simple(bus: MessageBus, args: argparse.Namespace, out: Output) -> ExitCode:
    member = {"cancel": "Cancel", "finish": "Finish", "restore": "Restore"}[args.command]
    await call(bus, member, "s", [args.id or ""])
    out.result({"update": args.id or ""}, lambda: print(f"{args.command}: requested"))
    return ExitCode.OK


async def cmd_preserve(bus: MessageBus, args: argparse.Namespace, out: Output) -> ExitCode:
    fd = os.open(args.file, os.O_RDWR | os.O_CLOEXEC) if args.file else args.fd
    depends = [[s, int(t)] for s, t in (d.rsplit(":", 1) for d in args.depends_on or [])]  # checked
    options = {"depends-on": Variant("a(st)", depends)} if depends else {}
    try:
        await call(
            bus, "Preserve", "hsta{sv}", [0, args.session, args.token, options], unix_fds=[fd]
        )
    finally:
        if args.file:
            os.close(fd)
    out.result(
        {"session": args.session, "token": args.token},
        lambda: print(f"handed in {args.session}/{args.token}"),
    )
    return ExitCode.OK


async def cmd_retrieve(bus: MessageBus, args: argparse.Namespace, out: Output) -> ExitCode:
    (fd,) = await call(bus, "Retrieve", "st", [args.session, args.token])
    try:
        size = os.fstat(fd).st_size
        if args.output:
            with open(args.output, "wb") as f:
                f.write(os.pread(fd, size, 0))
    finally:
        os.close(fd)
    out.result(
        {"session": args.session, "token": args.token, "size": size, "output": args.output},
        lambda: print(
            f"{args.session}/{args.token}: {size} bytes"
            + (f" written to {args.output}" if args.output else "")
        ),
    )
    return ExitCode.OK


async def cmd_sessions(bus: MessageBus, args: argparse.Namespace, out: Output) -> ExitCode:
    (rows,) = await call(bus, "ListSessions")
    items = [{"session": s, "token": t, "owner": o, "state": st} for s, t, o, st in rows]

    def human() -> None:
        if not items:
            print("no preserved file descriptors")
        for i in items:
            print(f"{i['session']:30} {i['token']:>20} {i['state']:10} {i['owner']}")

    out.result({"sessions": items}, human)
    return ExitCode.OK


async def cmd_history(bus: MessageBus, args: argparse.Namespace, out: Output) -> ExitCode:
    (rows,) = await call(bus, "GetHistory", "u", [args.limit])
    items = [{k: v.value for k, v in row.items()} for row in rows]

    def human() -> None:
        for i in items:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(i["started-at"]))
            print(f"{when}  {i['id']:28} {i['result']:10} {i['message']}")

    out.result({"history": _jsonable(items)}, human)
    return ExitCode.OK


COMMANDS: Final[dict[str, Callable[[MessageBus, argparse.Namespace, Output], Any]]] = {
    "status": cmd_status,
    "check": cmd_check,
    "update": cmd_update,
    "prepare": cmd_prepare,
    "execute": cmd_execute,
    "cancel": cmd_simple,
    "finish": cmd_simple,
    "restore": cmd_simple,
    "load-kernel": cmd_load_kernel,
    "preserve": cmd_preserve,
    "retrieve": cmd_retrieve,
    "sessions": cmd_sessions,
    "history": cmd_history,
}


def _jsonable(value: Any) -> Any:
    if isinstance(value, Variant):
        return _jsonable(value.value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _new_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


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


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on a usage error; 2 is NOTHING_TO_DO here, so usage errors are INVALID."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(int(ExitCode.INVALID), f"{self.prog}: error: {message}\n")


def _global_options(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument(
        "--json",
        action="store_true",
        default=default,
        help="print JSON lines (schema liveupdatectl/1, docs/cli.md) instead of text",
    )
    parser.add_argument(
        "--session-bus",
        action="store_true",
        default=default,
        help="talk to an agent on the session bus (the demo, tests) instead of the system bus",
    )


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="liveupdatectl",
        description="Drive Linux live updates through luo-agent (org.luoagent.LiveUpdate1): "
        "check, load the next kernel, prepare, execute; status and history.",
        epilog="Exit codes: 0 done, 1 failed, 2 nothing to do, 3 busy, 4 blocked (not possible "
        "now), 5 not authorized, 6 invalid argument, 69 agent not reachable.  See docs/cli.md.",
    )
    _global_options(p, default=False)
    # They are accepted after the command too, as systemctl's are; there, SUPPRESS keeps an
    # option that is absent from undoing one given before the command.
    after = _Parser(add_help=False)
    _global_options(after, default=argparse.SUPPRESS)
    p.add_argument("--version", action="version", version=f"liveupdatectl {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=summary, parents=[after])

    command("status", "show the phase, the kernel, the current and last update, the participants")
    command("check", "preflight: can a live update start now? (exit 4 with blockers)")
    for name, summary, timeout in (
        ("update", "the whole update: load the kernel (--kernel), prepare, then execute", 900.0),
        ("prepare", "start an update: run the prepare gate, participants hand their fds in", 900.0),
        ("execute", "freeze and kexec the prepared update", 300.0),
    ):
        s = command(name, summary)
        s.add_argument(
            "--id",
            help="the update's id (default: generated)"
            if name != "execute"
            else "the update's id (default: the current update)",
        )
        s.add_argument(
            "--wait",
            action="store_true",
            help="print each phase until the update is prepared (prepare) or the kexec is "
            "issued, then the result",
        )
        s.add_argument(
            "--timeout",
            type=float,
            default=timeout,
            metavar="SECONDS",
            help="how long --wait waits (default %(default)g)",
        )
        if name == "update":
            s.add_argument("--kernel", help="kernel image to load first")
            s.add_argument("--initrd", help="initrd to load with it")
            s.add_argument(
                "--cmdline", help="the new kernel's command line (default: /proc/cmdline)"
            )
            s.add_argument(
                "--from-environment",
                action="store_true",
                help="take --kernel, --initrd and --cmdline from LIVEUPDATE_KERNEL, "
                "LIVEUPDATE_INITRD and LIVEUPDATE_CMDLINE (what liveupdate.service passes)",
            )
    for name, summary in (
        ("cancel", "cancel the update before the kexec (exit 2 when there is none)"),
        ("restore", "after a live-update boot: run the restore gate (again)"),
        ("finish", "after a live-update boot: run the finish gate and finish in the kernel"),
    ):
        command(name, summary).add_argument(
            "--id", help="the update's id (default: the current update)"
        )
    s = command("load-kernel", "load the next kernel (kexec_file_load, by fd)")
    s.add_argument("kernel", help="the kernel image")
    s.add_argument("--initrd", help="initrd to load with it")
    s.add_argument("--cmdline", help="the new kernel's command line (default: empty)")
    s.add_argument(
        "--reuse-cmdline", action="store_true", help="use this kernel's command line instead"
    )
    s = command("preserve", "hand a memfd in, to be carried through the next update")
    s.add_argument("--session", required=True, help="the session to put it in")
    s.add_argument("--token", type=int, required=True, help="its token there (0..2^64-1)")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--file", help="a path to open (e.g. /proc/PID/fd/N of a memfd)")
    src.add_argument("--fd", type=int, help="an fd number this process inherited")
    s.add_argument(
        "--depends-on",
        action="append",
        metavar="SESSION:TOKEN",
        help="restore it only after this one (repeatable)",
    )
    s = command("retrieve", "after a live-update boot: take a carried fd back")
    s.add_argument("--session", required=True, help="the session it was preserved in")
    s.add_argument("--token", type=int, required=True, help="its token there")
    s.add_argument("--output", help="write its contents to this file")
    command("sessions", "list the preserved file descriptors")
    s = command("history", "list past updates, oldest first")
    s.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    return p


class UsageError(Exception):
    """A bad argument found by liveupdatectl itself (before or instead of a call)."""


def _check_arguments(args: argparse.Namespace) -> None:
    token = getattr(args, "token", None)
    if token is not None and not 0 <= token < 2**64:
        raise UsageError("--token must be 0..2^64-1")
    for dep in getattr(args, "depends_on", None) or []:
        session, _, token_text = dep.rpartition(":")
        if not session or not token_text.isdigit() or int(token_text) >= 2**64:
            raise UsageError(f"--depends-on {dep!r}: want SESSION:TOKEN")


async def run(args: argparse.Namespace) -> ExitCode:
    out = Output(args.json, args.command)
    try:
        _check_arguments(args)
    except UsageError as exc:
        out.error("liveupdatectl.InvalidArgument", str(exc), ExitCode.INVALID)
        return ExitCode.INVALID
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
        return ExitCode(await COMMANDS[args.command](bus, args, out))
    except CallError as exc:
        code = ERROR_EXIT.get(exc.name, ExitCode.FAILURE)
        if args.command == "cancel" and exc.name == f"{ERROR_PREFIX}.WrongPhase":
            code = ExitCode.NOTHING_TO_DO
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


if __name__ == "__main__":
    sys.exit(main())
