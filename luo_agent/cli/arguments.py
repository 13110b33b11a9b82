"""liveupdatectl's command line: the parser (every command, option and help text) and the checks
of argument values that argparse cannot make."""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn

from .. import __version__
from .fleet import add_fleet_commands
from .output import ExitCode


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on a usage error; 2 is reserved here, so usage errors are INVALID."""

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
        epilog="Exit codes: 0 done, 1 failed, 3 busy, 4 blocked (not possible "
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
        ("cancel", "cancel the update before the kexec (exit 4 when there is none)"),
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
    s = command("unpreserve", "take a handed-in fd back before the update (idle or preparing)")
    s.add_argument("--session", required=True, help="the session it was handed in to")
    s.add_argument("--token", type=int, required=True, help="its token there")
    s = command(
        "keep",
        "run COMMAND with a memfd (fd 3) that survives live updates: the carried one after a "
        "live-update boot, else a new one; handed in again after every cancel; READY=1 once held",
    )
    s.add_argument("--session", required=True, help="the session to keep it in (your service)")
    s.add_argument("--token", type=int, default=1, help="its token there (default 1)")
    s.add_argument(
        "--size", type=int, default=4096, help="a new memfd's size in bytes (default 4096)"
    )
    s.add_argument(
        "program",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND [ARG...]",
        help="the workload; it finds the memfd as $LIVEUPDATE_FD and $LIVEUPDATE_FILE, and "
        "$LIVEUPDATE_UPDATE is the update's id after a live-update boot (empty otherwise)",
    )
    s = command("retrieve", "after a live-update boot: take a carried fd back")
    s.add_argument("--session", required=True, help="the session it was preserved in")
    s.add_argument("--token", type=int, required=True, help="its token there")
    s.add_argument("--output", help="write its contents to this file")
    command("sessions", "list the preserved file descriptors")
    s = command(
        "watch",
        "follow the agent: each phase, progress and participants change (during a slow gate: "
        "the units it waits for, failures first), until Ctrl-C",
    )
    s.add_argument(
        "--until-finished",
        action="store_true",
        help="end when an update ends (exit 0 on success, 1 otherwise)",
    )
    s = command("history", "list past updates, oldest first")
    s.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    add_fleet_commands(
        command("fleet", "the fleet's coordinator: status, release --force, halt, resume, set-max"),
        [after],
    )
    return p


class UsageError(Exception):
    """A bad argument found by liveupdatectl itself (before or instead of a call)."""


def check_arguments(args: argparse.Namespace) -> None:
    if args.command == "keep":
        if args.program[:1] == ["--"]:
            args.program = args.program[1:]
        if not args.program:
            raise UsageError("keep: give the COMMAND to run after --")
        if args.size < 1:
            raise UsageError("--size must be at least 1")
    token = getattr(args, "token", None)
    if token is not None and not 0 <= token < 2**64:
        raise UsageError("--token must be 0..2^64-1")
    for dep in getattr(args, "depends_on", None) or []:
        session, _, token_text = dep.rpartition(":")
        if not session or not token_text.isdigit() or int(token_text) >= 2**64:
            raise UsageError(f"--depends-on {dep!r}: want SESSION:TOKEN")
