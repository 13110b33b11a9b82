"""What systemd >= 261's PID 1 does with a LUO agent's fd store around ``Manager.KExec``, on an
emulated machine (PR #41683, landscape.md §3): it keeps the stored fds open while it stops every
unit, calls ``reboot(KEXEC)`` with them open, and on the next boot RETRIEVE_SESSIONs each stored
LUO session by name and hands it back to the unit's store (so it arrives as inherited).

No systemd >= 261 runs here: this is the behaviour the agent relies on, emulated."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from luo_agent.kernel.emulator import EmulatedSyscalls
from luo_agent.kernel.session import SessionDevice


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


@dataclass
class FakeFdStore:
    """The ``FdCustody`` of one agent instance: the unit's fd store, holding its own copies."""

    handed_back: dict[str, int] = field(default_factory=dict)
    incoming: dict[str, int] = field(default_factory=dict)
    outgoing: dict[str, int] = field(default_factory=dict)

    def inherited(self) -> dict[str, int]:
        # systemd passes duplicates (LISTEN_FDS) and keeps its own until FDSTOREREMOVE.
        fds, self.handed_back = self.handed_back, {}
        for name, fd in fds.items():
            self.keep(name, fd)
        return fds

    def keep(self, name: str, fd: int) -> None:
        self.drop(name)
        self.incoming[name] = os.dup(fd)

    def drop(self, name: str) -> None:
        if name in self.incoming:
            _close(self.incoming.pop(name))

    def keep_outgoing(self, name: str, fd: int) -> None:
        self.drop_outgoing(name)
        self.outgoing[name] = os.dup(fd)

    def drop_outgoing(self, name: str) -> None:
        if name in self.outgoing:
            _close(self.outgoing.pop(name))

    def close(self) -> None:
        for fd in [*self.incoming.values(), *self.outgoing.values(), *self.handed_back.values()]:
            _close(fd)
        self.incoming.clear()
        self.outgoing.clear()
        self.handed_back.clear()


@dataclass
class FakeSystemd261:
    """PID 1 of the emulated machine at ``root``, for the agent's unit."""

    root: Path
    store: FakeFdStore = field(default_factory=FakeFdStore)
    _carried: list[str] = field(default_factory=list)

    def kexec(self) -> None:
        """The end of the orderly shutdown: units are stopped, the store's outgoing session fds
        are still open at reboot(KEXEC) (systemd-shutdown holds them)."""
        carried = list(self.store.outgoing)
        EmulatedSyscalls(self.root).reboot_kexec()
        self.store.close()  # the old boot's processes are gone
        self._carried = carried

    def boot(self) -> FakeFdStore:
        """The new boot's PID 1: retrieve each carried session by name, return it to the store."""
        store = FakeFdStore()
        dev = SessionDevice(EmulatedSyscalls(self.root))
        dev.open()
        with dev:
            for name in self._carried:
                store.handed_back[name] = dev.retrieve_session(name).detach()
        self.store = store
        return store
