"""Shared pieces of the fault-injection suite.

* ``FaultBed``: a ``Testbed`` (emulated machine + real systemd user manager running the project's
  units) with the suite's own participant (``fault_participant``) hooked into every phase target.
* ``AgentBus``: the test's own D-Bus connection to the sandbox's bus, subscribed to the agent's
  signals and to its bus name's owner changes *before* the agent starts; every wait is "check a
  condition, else wait for the next signal", bounded by a timeout (no polling, no blind sleep).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from luo_agent.client import CallError, call
from luo_agent.dbus.names import BUS_NAME, IFACE_MANAGER
from luo_agent.kernel.device import Abi
from luo_agent.sandbox import Sandbox, missing_requirements
from luo_agent.testbed import REPO, Testbed

T = TypeVar("T")

ABIS = (Abi.SESSION, Abi.V3, Abi.RFC_V2)
PHASES = ("prepare", "freeze", "cancel", "restore", "finish")
AGENT = "luo-agent.service"
SANDBOX_UNAVAILABLE = missing_requirements()
WAIT = 30.0  # generous bound for steps that take well under a second here


def hook_unit(phase: str, directory: Path) -> str:
    target = f"liveupdate-{phase}.target"
    return (
        "[Unit]\n"
        f"Description=fault suite: {phase} hook\n"
        "DefaultDependencies=no\n"
        f"Before={target}\n"
        f"PartOf={target}\n"
        "[Service]\n"
        "Type=oneshot\n"
        f"Environment=PYTHONPATH={REPO} LUO_AGENT_BUS=session\n"
        f"WorkingDirectory={REPO}\n"
        f"ExecStart={sys.executable} -m tests.faults.fault_participant {phase} --dir {directory}\n"
        "[Install]\n"
        f"RequiredBy={target}\n"
    )


class FaultBed:
    """One emulated host; ``boot()`` is one "boot" (machine must be running, sandbox fresh)."""

    def __init__(self, workdir: Path, abi: str, agent_config: str = "") -> None:
        self.bed = Testbed(workdir / "host", abi, agent_config=agent_config)
        self.abi = abi
        self.machine = self.bed.machine
        self.dir = workdir / "participant"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._releases: list[int] = []

    def units(self) -> dict[str, str]:
        return {f"fault-{phase}.service": hook_unit(phase, self.dir) for phase in PHASES}

    def boot(self, stack: contextlib.ExitStack) -> Sandbox:
        """A fresh sandbox with the hooks enabled and the agent *not yet started* (so that the
        test's bus connection hears everything the agent says), restarting fast after a kill."""
        box = self.bed.boot_sandbox(
            stack, extra_units=self.units(), enable=tuple(self.units()), start=()
        )
        box.install_units((), {f"{AGENT}.d/60-faults.conf": "[Service]\nRestartSec=100ms\n"})
        return box

    def mode(self, phase: str, mode: str) -> None:
        (self.dir / f"mode-{phase}").write_text(mode)
        if mode == "hang":
            fifo = self.dir / f"release-{phase}"
            if not fifo.exists():
                os.mkfifo(fifo)

    def release(self, phase: str) -> None:
        """Let a hanging hook go on (now or whenever it reaches its FIFO)."""
        fd = os.open(self.dir / f"release-{phase}", os.O_RDWR | os.O_CLOEXEC)
        os.write(fd, b"go\n")
        self._releases.append(fd)  # kept open: the line stays readable until the hook reads it

    async def hook_waiting(self, phase: str, limit: float = WAIT) -> None:
        """Until the hanging hook of ``phase`` is blocked on its FIFO: opening the FIFO's write
        end returns exactly when the hook opens the read end.  The write end is kept (closing
        it would let the hook go on)."""
        fifo = self.dir / f"release-{phase}"
        opening = asyncio.ensure_future(
            asyncio.to_thread(os.open, fifo, os.O_WRONLY | os.O_CLOEXEC)
        )
        try:
            async with asyncio.timeout(limit):
                self._releases.append(await asyncio.shield(opening))
        except TimeoutError:
            # Unblock the thread's open() with a reader of our own, then fail.
            reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            os.close(await opening)
            os.close(reader)
            raise AssertionError(f"the {phase} hook never started waiting") from None

    def close(self) -> None:
        for fd in self._releases:
            os.close(fd)
        self._releases.clear()

    def ran(self) -> list[str]:
        path = self.dir / "ran"
        return path.read_text().splitlines() if path.exists() else []

    def expected(self) -> dict[str, Any]:
        return dict(json.loads((self.dir / "expected.json").read_text()))

    def restored(self) -> dict[str, Any]:
        return dict(json.loads((self.dir / "restored.json").read_text()))

    def kill_agent(self, box: Sandbox) -> int:
        pid = main_pid(box, AGENT)
        assert pid > 0, "the agent is not running"
        os.kill(pid, signal.SIGKILL)
        return pid

    def kernel_clean(self) -> bool:
        """Nothing held for an outgoing update and nothing carried left unfinished."""
        view = self.machine.inspect()
        if view["generation"] == Abi.SESSION:
            return not view["outgoing_sessions"] and not view["incoming_sessions"]
        return bool(view["state"] == "normal" and not view["files"])


def main_pid(box: Sandbox, unit: str) -> int:
    out = box.systemctl("show", "--property=MainPID", "--value", unit).stdout
    return int(out.strip() or 0)


def unit_property(box: Sandbox, unit: str, prop: str) -> str:
    return str(box.systemctl("show", f"--property={prop}", "--value", unit).stdout.strip())


class AgentBus:
    """The test's connection to the sandbox bus."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.bus: MessageBus | None = None
        self.changed = asyncio.Event()
        self.signals: list[tuple[str, list[Any]]] = []
        self.owner = ""
        self.owners: list[str] = []  # every non-empty owner of the agent's name, in order

    async def __aenter__(self) -> AgentBus:
        self.bus = await MessageBus(bus_address=self.address, negotiate_unix_fd=True).connect()
        self.bus.add_message_handler(self._on_message)
        for rule in (
            f"type='signal',interface='{IFACE_MANAGER}'",
            "type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged',"
            f"arg0='{BUS_NAME}'",
        ):
            await self.dbus("AddMatch", "s", [rule])
        (owner,) = await self._name_owner()
        self._set_owner(owner)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.bus is not None:
            self.bus.disconnect()
            with contextlib.suppress(Exception):
                await self.bus.wait_for_disconnect()  # type: ignore[no-untyped-call]

    async def _name_owner(self) -> list[Any]:
        try:
            return await self.dbus("GetNameOwner", "s", [BUS_NAME])
        except CallError:
            return [""]

    def _set_owner(self, owner: str) -> None:
        self.owner = owner
        if owner:
            self.owners.append(owner)

    def _on_message(self, msg: Message) -> None:
        if msg.message_type != MessageType.SIGNAL:
            return
        if msg.member == "NameOwnerChanged" and msg.body and msg.body[0] == BUS_NAME:
            self._set_owner(str(msg.body[2]))
        elif msg.interface == IFACE_MANAGER:
            self.signals.append((str(msg.member), list(msg.body)))
        self.changed.set()

    async def dbus(self, member: str, signature: str, body: list[Any]) -> list[Any]:
        assert self.bus is not None
        return await call(
            self.bus,
            member,
            signature,
            body,
            interface="org.freedesktop.DBus",
            path="/org/freedesktop/DBus",
            destination="org.freedesktop.DBus",
        )

    async def agent(
        self, member: str, signature: str = "", body: list[Any] | None = None, **kw: Any
    ) -> list[Any]:
        assert self.bus is not None
        return await call(self.bus, member, signature, body, **kw)

    async def prop(self, name: str) -> Any:
        body = await self.agent(
            "Get",
            "ss",
            [IFACE_MANAGER, name],
            interface="org.freedesktop.DBus.Properties",
        )
        return body[0].value

    async def until(
        self, what: str, probe: Callable[[], Awaitable[T | None]], limit: float = WAIT
    ) -> T:
        """Return ``probe()``'s first truthy value; re-checked after every signal."""
        try:
            async with asyncio.timeout(limit):
                while True:
                    self.changed.clear()
                    value = await probe()
                    if value:
                        return value
                    await self.changed.wait()
        except TimeoutError:
            raise AssertionError(f"timed out after {limit:.0f} s waiting for {what}") from None

    async def _phase(self) -> str:
        if not self.owner:
            return ""
        try:
            return str(await self.prop("Phase"))
        except CallError:
            return ""

    async def until_phase(self, phase: str, limit: float = WAIT) -> None:
        async def probe() -> bool:
            return await self._phase() == phase

        await self.until(f"phase {phase}", probe, limit)

    async def until_saw(self, update_id: str, phases: list[str], limit: float = WAIT) -> None:
        """Until PhaseChanged has announced ``phases`` for ``update_id`` in this order."""

        async def probe() -> bool:
            seen = [b[1] for m, b in self.signals if m == "PhaseChanged" and b[0] == update_id]
            it = iter(seen)
            return all(p in it for p in phases)

        await self.until(f"phases {phases} of {update_id}", probe, limit)

    async def until_restarted(self, previous_owner: str, limit: float = WAIT) -> str:
        async def probe() -> str | None:
            return self.owner if self.owner and self.owner != previous_owner else None

        return await self.until("the agent back on the bus", probe, limit)

    async def until_ended(self, update_id: str, limit: float = WAIT) -> dict[str, Any]:
        """Until the agent is idle with ``update_id`` as its last result; its history entry."""

        async def probe() -> bool:
            if not self.owner:
                return False
            try:
                last = await self.prop("LastResult")
                return bool(last[0] == update_id and await self._phase() == "idle")
            except CallError:
                return False

        await self.until(f"update {update_id} to end", probe, limit)
        return await self.history_entry(update_id)

    async def history_entry(self, update_id: str) -> dict[str, Any]:
        (entries,) = await self.agent("GetHistory", "u", [50])
        mine = [{k: v.value for k, v in e.items()} for e in entries if e["id"].value == update_id]
        assert len(mine) == 1, f"expected one history entry for {update_id}: {mine}"
        return mine[0]

    async def load_kernel(self, image: Path) -> None:
        fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
        try:
            await self.agent(
                "LoadKernel",
                "hhsa{sv}",
                [0, 0, "console=ttyS0 liveupdate=1 kho=on", {"no-initrd": Variant("b", True)}],
                unix_fds=[fd],
            )
        finally:
            os.close(fd)

    async def prepare(self, update_id: str) -> None:
        await self.agent("Prepare", "a{sv}", [{"id": Variant("s", update_id)}])

    async def execute(self, update_id: str) -> None:
        await self.agent("Execute", "s", [update_id])
