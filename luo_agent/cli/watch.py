"""Waiting for an update: the agent's signals, heard from before the call, until the wait is over.

``Watcher`` follows one update's phases (and the agent leaving the bus); ``prepared`` and
``rebooted`` say when a wait is over; ``outcome`` prints the one result (or error) of a wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from ..client import get_all, subscribe
from ..dbus.names import BUS_NAME, IFACE_MANAGER
from .output import ExitCode, Output


class Watcher:
    """Subscribes to the agent's signals *before* a call, so nothing is missed."""

    def __init__(self, bus: MessageBus, out: Output, update_id: str, stream: bool) -> None:
        self.bus, self.out, self.update_id = bus, out, update_id
        self.stream = stream  # print one line (one JSON event) per phase
        self.phase = ""
        self.phases: list[str] = []
        self._heard: list[tuple[str, float]] = []  # phases not printed yet (and when)
        self.finished: tuple[str, str, str] | None = None
        self.agent_gone = False
        self.changed = asyncio.Event()
        self.started = time.monotonic()

    async def subscribe(self) -> None:
        await subscribe(self.bus, f",interface='{IFACE_MANAGER}'")
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
            self._heard.append((self.phase, time.monotonic() - self.started))
            if self.stream:
                self._print_heard()
            self.changed.set()
        elif msg.member == "Finished" and msg.body[0] == self.update_id:
            self.finished = (msg.body[1], msg.body[2], msg.body[3])
            self.changed.set()
        return None

    def stream_from_now(self) -> None:
        """Print the phases heard so far, then every phase as it comes."""
        self.stream = True
        self._print_heard()

    def _print_heard(self) -> None:
        for phase, elapsed in self._heard:
            self.out.line(f"[{elapsed:7.3f}s] {self.update_id}: {phase}")
            self.out.event(
                event="phase", update=self.update_id, phase=phase, elapsed=round(elapsed, 6)
            )
        self._heard.clear()

    async def until(self, done: Callable[[], bool], timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while not done():
                self.changed.clear()
                if done():
                    return
                await self.changed.wait()


# When a wait is over.  A kexec that failed brings the agent back from rebooting (to prepared, or
# to cancelling on rfc-v2); a kexec that worked takes the agent (and, on a real machine, this
# process) away.
def prepared(w: Watcher) -> bool:
    return w.phase == "prepared" or w.finished is not None or w.agent_gone


def rebooted(w: Watcher) -> bool:
    kexec_failed = "rebooting" in w.phases and w.phase != "rebooting"
    return w.finished is not None or w.agent_gone or kexec_failed


async def wait(
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


def outcome(watcher: Watcher, out: Output) -> ExitCode:
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


async def follow(bus: MessageBus, out: Output, until_finished: bool) -> ExitCode:
    """``liveupdatectl watch``: one line per phase, progress and participants change (the
    participants failures first: during a slow gate, who holds it), until interrupted or, with
    ``until_finished``, until an update ends."""
    done: asyncio.Future[ExitCode] = asyncio.get_running_loop().create_future()
    started = time.monotonic()

    def stamp() -> str:
        return f"[{time.monotonic() - started:7.3f}s]"

    def participants(rows: list[list[str]]) -> None:
        for unit, active, sub, result in rows:
            out.line(f"{stamp()}   {unit} {active}/{sub} result={result or '-'}")
        out.event(event="participants", participants=[list(r) for r in rows])

    def on_message(msg: Message) -> None:
        if msg.message_type != MessageType.SIGNAL or done.done():
            return
        if msg.member == "NameOwnerChanged" and msg.body[:1] == [BUS_NAME]:
            if not msg.body[2]:
                out.line(f"{stamp()} the agent left the bus")
                out.event(event="agent-gone")
            return
        if msg.member == "PhaseChanged" and msg.interface == IFACE_MANAGER:
            update_id, phase = msg.body
            out.line(f"{stamp()} {update_id or '-'}: {phase}")
            out.event(event="phase", update=update_id, phase=phase)
        elif msg.member == "Finished" and msg.interface == IFACE_MANAGER:
            update_id, result, _error, message = msg.body
            out.line(f"{stamp()} {update_id}: {result}" + (f": {message}" if message else ""))
            out.event(event="finished", update=update_id, result=result, message=message)
            if until_finished:
                done.set_result(ExitCode.OK if result == "success" else ExitCode.FAILURE)
        elif msg.member == "PropertiesChanged" and msg.body[0] == IFACE_MANAGER:
            changed = msg.body[1]
            if "Progress" in changed:
                out.line(f"{stamp()} progress {changed['Progress'].value}%")
                out.event(event="progress", progress=changed["Progress"].value)
            if "Participants" in changed:
                out.line(f"{stamp()} participants (failures first):")
                participants(changed["Participants"].value)

    await subscribe(bus)
    bus.add_message_handler(on_message)
    props = await get_all(bus)
    out.line(
        f"{stamp()} phase {props['Phase']}, update {props['CurrentUpdate'] or '-'}, "
        f"progress {props['Progress']}%"
    )
    out.event(event="status", phase=props["Phase"], update=props["CurrentUpdate"])
    if props["Participants"]:
        participants(props["Participants"])
    code = await done
    out.result({"phase": props["Phase"]}, lambda: None)
    return code
