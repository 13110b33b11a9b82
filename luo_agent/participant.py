"""The participant kit: what a workload needs to keep state across live updates, in a few lines.

    async with await Participant.connect("myapp") as lu:
        fd = await lu.memfd(1, size=4096)  # the carried memfd after a live update, else a new one
        notify("READY=1")  # a Type=notify unit: the restore gate waits for this
        ...  # lu.live_update_boot, lu.update_id: whether and which update brought this boot

``memfd``/``keep`` hand the fd to the agent now (while it is idle) and again whenever the agent
has let go of it: after a cancelled update, an agent restart, and once the update that carried it
has finished in the new boot.  ``run_hooks`` lets one program serve every phase hook of the full
hook model; ``command_handler`` and ``ask`` connect such hooks to a long-running workload through
its control socket.  ``docs/participants.md`` is the guide.  Only the public D-Bus API is used
(``luo_agent.client``); the agent itself never imports this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import socket
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Final, Self

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from .client import CallError, call, connect, get_all, subscribe
from .dbus.names import BUS_NAME, IFACE_MANAGER

log = logging.getLogger("luo_agent.participant")

# Phases in which the agent hands carried fds back (Retrieve): only in a live-update boot.
RESTORE_PHASES: Final = frozenset({"updated", "restoring", "restored"})
# Phases in which the agent takes fds in (Preserve, Unpreserve).
HAND_IN_PHASES: Final = frozenset({"idle", "preparing"})
PHASES: Final = ("prepare", "freeze", "cancel", "restore", "finish")
CMDLINE_MARKER: Final = "luo_agent.update="
_ERROR_PREFIX: Final = "org.luoagent.LiveUpdate1.Error."


def notify(*states: str) -> bool:
    """sd_notify(3): send ``READY=1``, ``STATUS=...`` etc. to the service manager.  False when
    not run by one (no ``$NOTIFY_SOCKET``)."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.sendto("\n".join(states).encode(), address)
    return True


def kernel_update_id(cmdline: str | None = None) -> str:
    """The update this kernel was kexec'd for (``luo_agent.update=<id>`` on its command line,
    which the agent appends to the kernel it loads), or "" after an ordinary boot."""
    if cmdline is None:
        try:
            with open("/proc/cmdline") as f:
                cmdline = f.read()
        except OSError:
            return ""
    marked = [w for w in cmdline.split() if w.startswith(CMDLINE_MARKER)]
    return marked[-1][len(CMDLINE_MARKER) :] if marked else ""


def error_is(exc: CallError, name: str) -> bool:
    """Whether the agent answered with ``org.luoagent.LiveUpdate1.Error.<name>``."""
    return exc.name == _ERROR_PREFIX + name


class Participant:
    """One connection to the agent for one session (your service's name).  Use it as an async
    context manager; closing it stops keeping fds handed in (what is handed in stays so)."""

    def __init__(
        self, bus: MessageBus, session: str, phase: str, update_id: str, owns_bus: bool = True
    ) -> None:
        self.bus = bus
        self._owns_bus = owns_bus
        self.session = session
        self.phase = phase  # the agent's phase, kept current
        self.update_id = update_id  # the update under way when connected ("" if none)
        # This boot is a live update's and its restore is under way: carried fds can be retrieved.
        self.live_update_boot = phase in RESTORE_PHASES
        self._kept: dict[int, int] = {}  # token -> our own duplicate of the fd to keep handed in
        self._wake = asyncio.Event()
        self._keeper: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, session: str, bus: str | None = None) -> Participant:
        """Connect to the agent (the system bus; ``bus="session"`` or ``$LUO_AGENT_BUS=session``
        for the session bus) and learn whether this is a live-update boot."""
        conn = await connect(bus)
        try:
            return await cls.on_bus(conn, session, owns_bus=True)
        except BaseException:
            conn.disconnect()
            raise

    @classmethod
    async def on_bus(cls, bus: MessageBus, session: str, *, owns_bus: bool = False) -> Participant:
        """The same on a connection of your own (left open by ``close`` unless ``owns_bus``)."""
        await subscribe(bus, f",interface='{IFACE_MANAGER}',member='PhaseChanged'")
        props = await get_all(bus)
        self = cls(bus, session, str(props["Phase"]), str(props["CurrentUpdate"]), owns_bus)
        bus.add_message_handler(self._on_message)
        return self

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        for fd in self._kept.values():
            os.close(fd)
        self._kept.clear()
        self.bus.remove_message_handler(self._on_message)
        if self._owns_bus:
            self.bus.disconnect()

    # -------------------------------------------------------------------- the D-Bus calls

    async def preserve(
        self, token: int, fd: int, depends_on: Sequence[tuple[str, int]] = ()
    ) -> None:
        """Hand ``fd`` in once, for the next update (``Preserve``; while the agent is idle or
        preparing).  The agent keeps its own duplicate."""
        options = {"depends-on": Variant("a(st)", [list(d) for d in depends_on])}
        if not depends_on:
            options = {}
        await call(
            self.bus, "Preserve", "hsta{sv}", [0, self.session, token, options], unix_fds=[fd]
        )

    async def unpreserve(self, token: int) -> None:
        """Take a handed-in fd back (and stop keeping it)."""
        kept = self._kept.pop(token, None)
        if kept is not None:
            os.close(kept)
        await call(self.bus, "Unpreserve", "st", [self.session, token])

    async def retrieve(self, token: int) -> int:
        """The fd carried under ``token`` (while ``live_update_boot``); the caller owns it."""
        (fd,) = await call(self.bus, "Retrieve", "st", [self.session, token])
        return int(fd)

    # ------------------------------------------------------------------------ keeping fds

    async def memfd(self, token: int, size: int) -> int:
        """The memfd carried under ``token`` in a live-update boot, else a new zero-filled one of
        ``size`` bytes; kept handed in (``keep``) for every next update.  The caller owns it.
        Keep its size: once preserved, the kernel may refuse to resize it."""
        if self.live_update_boot:
            try:
                fd = await self.retrieve(token)
            except CallError as exc:
                if not error_is(exc, "NoSuchToken") and not error_is(exc, "NoSuchSession"):
                    raise
                log.warning(
                    "%s/%s was not carried by update %s", self.session, token, self.update_id
                )
            else:
                await self.keep(token, fd)
                return fd
        fd = os.memfd_create(f"{self.session}-{token}", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        await self.keep(token, fd)
        return fd

    async def keep(self, token: int, fd: int) -> None:
        """Keep ``fd`` handed in under ``token``: now if the agent takes fds in, and again
        whenever it has let go of it (a cancelled update, an agent restart, the end of the update
        that carried it).  An earlier registration of the same token (a previous run of this
        workload) is replaced."""
        previous = self._kept.pop(token, None)
        if previous is not None:
            os.close(previous)
        self._kept[token] = os.dup(fd)
        if self.phase in HAND_IN_PHASES:
            await self._hand_in(token, replace=True)
        if self._keeper is None:
            self._keeper = asyncio.create_task(self._keep_handed_in(), name="luo-participant-keep")

    async def _hand_in(self, token: int, *, replace: bool) -> None:
        fd = self._kept[token]
        try:
            await self.preserve(token, fd)
        except CallError as exc:
            if not (replace and error_is(exc, "AlreadyExists")):
                raise
            await call(self.bus, "Unpreserve", "st", [self.session, token])
            await self.preserve(token, fd)
        log.info("handed in %s/%s", self.session, token)

    async def _keep_handed_in(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                props = await get_all(self.bus)
                self.phase = str(props["Phase"])
                if self.phase not in HAND_IN_PHASES:
                    continue
                (rows,) = await call(self.bus, "ListSessions")
                have = {int(t) for s, t, _owner, _state in rows if s == self.session}
                for token in [t for t in self._kept if t not in have]:
                    await self._hand_in(token, replace=False)
            except CallError as exc:
                # WrongPhase: an update started meanwhile (it goes without this fd); the next idle
                # hands it in.  Anything else is reported and tried again then.
                log.warning("could not hand %s in again: %s", self.session, exc)
            except (ConnectionError, EOFError):
                log.warning("lost the bus; no longer keeping %s handed in", self.session)
                return

    def _on_message(self, msg: Message) -> None:
        if msg.message_type != MessageType.SIGNAL:
            return
        if msg.member == "PhaseChanged" and msg.interface == IFACE_MANAGER:
            self.phase = str(msg.body[1])
            if self.phase == "idle":
                self.live_update_boot = False
                self._wake.set()
        elif msg.member == "NameOwnerChanged" and msg.body[:1] == [BUS_NAME] and msg.body[2]:
            self._wake.set()  # a (re)started agent: it holds nothing of ours


# ------------------------------------------------------------------------------- the hook model

Hook = Callable[[], Awaitable[object] | object]


def run_hooks(hooks: Mapping[str, Hook], argv: Sequence[str] | None = None) -> int:
    """One program for every phase hook: ``argv[1]`` (``%i`` of a ``myapp-liveupdate@.service``
    template) names the phase, the matching function runs; its exception fails the gate.  A phase
    without a function passes.  Returns the exit code (``sys.exit(run_hooks({...}))``)."""
    args = list(sys.argv if argv is None else argv)
    phase = args[1] if len(args) > 1 else ""
    if phase not in PHASES:
        print(f"usage: {args[0] if args else 'hook'} {{{','.join(PHASES)}}}", file=sys.stderr)
        return 2
    hook = hooks.get(phase)
    if hook is None:
        return 0
    try:
        result = hook()
        if inspect.isawaitable(result):
            asyncio.run(_awaited(result))
    except Exception as exc:  # the hook's failure fails the gate; its message goes to the log
        print(f"{phase} hook failed: {exc}", file=sys.stderr)
        return 1
    return 0


async def _awaited(result: Awaitable[object]) -> None:
    await result


# ---------------------------------------------------------------- a workload's control socket

Command = Callable[[], Awaitable[str]]
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def command_handler(commands: Mapping[str, Command], tag: str) -> Handler:
    """The workload's side of its hooks, for ``asyncio.start_unix_server``: one line in (a command
    name), one line out: ``ok TEXT`` (what the command returned) or ``error TEXT`` (what it
    raised; the hook then fails its gate).  Commands run one at a time; each answer is logged on
    stdout as ``TAG: COMMAND: ANSWER``."""
    lock = asyncio.Lock()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        command = (await reader.readline()).decode().strip()
        action = commands.get(command)
        try:
            if action is None:
                answer = f"error unknown command {command!r}"
            else:
                async with lock:
                    answer = "ok " + await action()
        except CallError as exc:
            answer = f"error {exc.name}: {exc.text}"
        except Exception as exc:  # reported to the hook, which fails its gate
            answer = f"error {exc or type(exc).__name__}"
        print(f"{tag}: {command}: {answer}", flush=True)
        writer.write(answer.encode() + b"\n")
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    return handle


async def ask(path: str | os.PathLike[str], command: str) -> str:
    """A hook's side: send ``command`` to the workload listening on ``path``; the text of its
    ``ok`` answer, else RuntimeError with its ``error`` text (OSError: nothing listens)."""
    reader, writer = await asyncio.open_unix_connection(os.fspath(path))
    try:
        writer.write(command.encode() + b"\n")
        await writer.drain()
        answer = (await reader.readline()).decode().strip()
    finally:
        writer.close()
    if not answer.startswith("ok"):
        raise RuntimeError(answer.removeprefix("error ") or "the workload did not answer")
    return answer.removeprefix("ok").strip()
