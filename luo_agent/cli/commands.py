"""The commands of liveupdatectl: one coroutine each, calling the agent and printing one result.

Each takes the bus, the parsed arguments and the ``Output``, and returns its exit code; a D-Bus
error it does not handle itself propagates to ``program.run``, which prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from dbus_fast import Variant
from dbus_fast.aio import MessageBus

from ..client import bus_kind, call, get_all, get_property
from ..participant import Participant, notify
from .output import ExitCode, Output, jsonable
from .watch import Watcher, follow, outcome, prepared, rebooted, wait


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
            detail = f" ({last[3]})" if last[3] and last[3] != last[1] else ""
            print(f"Last update:    {last[0]}: {last[1]}{detail}")
        state, host, coordinator, error = props.get("Fleet") or ("", "", "", "")
        if coordinator:  # [fleet] is enabled
            print(f"Fleet slot:     {state or 'none'} (host {host}, {coordinator})")
            if error:
                print(f"  last error: {error}")
        if props["Participants"]:
            print("Participants:   " + _participants_title(str(props["Phase"])))
        for unit, active, sub, result in props["Participants"]:
            print(f"  {unit:40} {active}/{sub} result={result or '-'}{_mark(active, result)}")
        for unit in failed_units(props["Participants"]):
            _print_tail(unit, _user_manager(args))

    out.result({"status": jsonable(props)}, human)
    return ExitCode.OK


UNIT_LOGS_ENV: Final = "LUO_AGENT_UNIT_LOGS"  # a directory of <unit>.log where no journal is


def unit_log_tail(unit: str, user: bool, lines: int = 5) -> list[str]:
    """The unit's last log lines: from ``$LUO_AGENT_UNIT_LOGS/<unit>.log`` if set (the sandbox
    has no journald), else ``journalctl``; [] if neither has any."""
    directory = os.environ.get(UNIT_LOGS_ENV)
    if directory:
        try:
            text = (Path(directory) / f"{unit}.log").read_text(errors="replace")
        except OSError:
            return []
        return text.splitlines()[-lines:]
    command = ["journalctl", "--user" if user else "--system", "-u", unit]
    command += ["-n", str(lines), "-o", "cat", "--no-pager", "-q"]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return proc.stdout.splitlines()[-lines:] if proc.returncode == 0 else []


def failed_units(rows: list[list[str]]) -> list[str]:
    return [unit for unit, active, _sub, result in rows if _mark(active, result).endswith("failed")]


async def show_failed_logs(bus: MessageBus, out: Output, user: bool) -> None:
    """After a failed update (human output): the failing participants' last log lines."""
    if out.as_json:
        return
    for unit in failed_units(await get_property(bus, "Participants")):
        _print_tail(unit, user)


def _print_tail(unit: str, user: bool) -> None:
    tail = unit_log_tail(unit, user)
    if tail:
        print(f"  last log lines of {unit}:")
        for line in tail:
            print(f"    {line}")


def _participants_title(phase: str) -> str:
    if phase in ("preparing", "freezing", "cancelling", "restoring", "finishing"):
        return "the units this phase's gate waits for, failures first"
    return "the last gate's units, failures first"


def _mark(active: str, result: str) -> str:
    """Why a unit comes first: it failed, or the running gate waits for it."""
    if active == "failed" or result not in ("", "success"):
        return "  <- failed"
    if active in ("activating", "deactivating", "reloading"):
        return "  <- still running"
    return ""


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
    # Phases heard before Prepare's reply are printed after "started" (stream_from_now).
    watcher = Watcher(bus, out, update_id, stream=False)
    await watcher.subscribe()
    new_id, path = await call(bus, "Prepare", "a{sv}", [{"id": Variant("s", update_id)}])
    if not args.wait:
        out.result(
            {"update": new_id, "path": path, "phase": "preparing"},
            lambda: print(f"update {new_id} started ({path})"),
        )
        return ExitCode.OK
    out.line(f"update {new_id} started ({path})")
    watcher.stream_from_now()
    failed = await wait(watcher, prepared, args.timeout, out)
    return failed if failed is not None else await _outcome(bus, watcher, out, args)


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
    failed = await wait(watcher, rebooted, args.timeout, out)
    return failed if failed is not None else await _outcome(bus, watcher, out, args)


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
    failed = await wait(watcher, prepared, args.timeout, out)
    if failed is not None:
        return failed
    if watcher.phase != "prepared" or watcher.finished is not None:
        return await _outcome(bus, watcher, out, args)  # it ended (or the agent left) before
    await call(bus, "Execute", "s", [update_id])
    if not args.wait:
        out.result(
            {"update": update_id, "phase": "freezing", "result": "", "error": "", "message": ""},
            lambda: print(f"update {update_id}: prepared, executing"),
        )
        return ExitCode.OK
    failed = await wait(watcher, rebooted, args.timeout, out)
    return failed if failed is not None else await _outcome(bus, watcher, out, args)


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


async def cmd_unpreserve(bus: MessageBus, args: argparse.Namespace, out: Output) -> ExitCode:
    await call(bus, "Unpreserve", "st", [args.session, args.token])
    out.result(
        {"session": args.session, "token": args.token},
        lambda: print(f"took back {args.session}/{args.token}"),
    )
    return ExitCode.OK


async def cmd_keep(bus: MessageBus, args: argparse.Namespace, out: Output) -> int:
    """The participant kit for a shell: COMMAND runs with the memfd open (``$LIVEUPDATE_FD``,
    ``$LIVEUPDATE_FILE``) while this process keeps it handed in, and ends with it."""
    async with await Participant.on_bus(bus, args.session) as lu:
        fd = await lu.memfd(args.token, args.size)
        env = dict(
            os.environ,
            LIVEUPDATE_FD=str(fd),
            LIVEUPDATE_FILE=f"/proc/{os.getpid()}/fd/{fd}",
            LIVEUPDATE_UPDATE=lu.update_id if lu.live_update_boot else "",
        )
        child = await asyncio.create_subprocess_exec(*args.program, env=env, pass_fds=(fd,))
        loop = asyncio.get_running_loop()
        for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(number, child.send_signal, number)
        notify("READY=1")
        returncode = await child.wait()
        os.close(fd)
    code = returncode if returncode >= 0 else 128 - returncode
    out.result({"session": args.session, "token": args.token, "exit": code}, lambda: None)
    return code  # COMMAND's own exit code


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


async def cmd_watch(bus: MessageBus, args: argparse.Namespace, out: Output) -> ExitCode:
    return await follow(bus, out, args.until_finished)


async def cmd_history(bus: MessageBus, args: argparse.Namespace, out: Output) -> ExitCode:
    (rows,) = await call(bus, "GetHistory", "u", [args.limit])
    items = [{k: v.value for k, v in row.items()} for row in rows]

    def human() -> None:
        for i in items:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(i["started-at"]))
            print(f"{when}  {i['id']:28} {i['result']:10} {i['message']}")

    out.result({"history": jsonable(items)}, human)
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
    "unpreserve": cmd_unpreserve,
    "keep": cmd_keep,
    "retrieve": cmd_retrieve,
    "sessions": cmd_sessions,
    "history": cmd_history,
    "watch": cmd_watch,
}


async def _outcome(
    bus: MessageBus, watcher: Watcher, out: Output, args: argparse.Namespace
) -> ExitCode:
    """The wait's result, after the failing participants' last log lines if it failed."""
    if watcher.finished is not None and watcher.finished[0] != "success":
        await show_failed_logs(bus, out, _user_manager(args))
    return outcome(watcher, out)


def _user_manager(args: argparse.Namespace) -> bool:
    """An agent on the session bus gates on the user manager: its units log to the user journal."""
    return bus_kind("session" if args.session_bus else None) == "session"


def _new_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
