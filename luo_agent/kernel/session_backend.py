"""The session ABI backend (Linux 6.19+, G5/G6): one named kernel session per client session plus
the agent's own, which carries the metadata memfd; the device is opened per operation."""

from __future__ import annotations

import contextlib
import errno
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from ..errors import DeviceBusy, HandoverCorrupt, KernelError, NoSuchSession, WrongKernelState
from ..records import UpdateRecord
from .backend import (
    AGENT_SESSION,
    METADATA_TOKEN,
    BootState,
    Capabilities,
    FdCustody,
    MetadataMemfd,
    NoCustody,
    PreserveItem,
    new_metadata_memfd,
    read_metadata,
)
from .device import Abi
from .session import LuoSession, SessionDevice
from .syscalls import KEXEC_FILE_UNLOAD, Syscalls, kexec_image_loaded

# readlink(/proc/self/fd/N) of a session fd (luo_session_getfile, kernel/liveupdate/luo_session.c).
SESSION_LINK_PREFIX = "anon_inode:[luo_session] "


@dataclass
class SessionBackend(MetadataMemfd):
    """Linux 6.19+.  The device is opened per operation and closed again (systemd >= 261 opens it
    too); the agent holds session fds instead."""

    syscalls: Syscalls
    abi: Abi = Abi.SESSION
    capabilities: ClassVar[Capabilities] = Capabilities(
        irreversible_freeze=False, pid1_can_carry=True, sysfs_state=False
    )
    outgoing: dict[str, LuoSession] = field(default_factory=dict)
    incoming: dict[str, LuoSession] = field(default_factory=dict)
    # Where incoming sessions outlive a crash of the agent (closing one finishes it).
    custody: FdCustody = field(default_factory=NoCustody)
    # EBUSY on open (systemd >= 261 holds the device briefly at boot and shutdown) is retried.
    busy_retry_seconds: float = 2.0
    _meta_fd: int = -1
    # Names of the outgoing sessions currently kept by the custody (the systemd strategy).
    _entrusted: list[str] = field(default_factory=list)

    def _device(self, *, retry_busy: bool = True) -> SessionDevice:
        """The device, opened; EBUSY retried briefly unless the caller retries itself."""
        deadline = time.monotonic() + (self.busy_retry_seconds if retry_busy else 0.0)
        delay = 0.02
        while True:
            dev = SessionDevice(self.syscalls)
            try:
                dev.open()
            except DeviceBusy:
                if time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)  # on the kernel thread, never on the loop
                delay = min(delay * 2, 0.5)
                continue
            return dev

    def _hold_incoming(self, name: str, session: LuoSession) -> None:
        self.incoming[name] = session
        self.custody.keep(name, session.fd)

    def start(self) -> BootState:
        for name, fd in self.custody.inherited().items():
            # A restart in the same boot, or a kexec by systemd >= 261 (PID 1 retrieved the
            # sessions and returned them to our fd store): the sessions are open, so
            # RETRIEVE_SESSION would be refused; use the fds themselves.
            self.incoming.setdefault(name, LuoSession(self.syscalls, fd, name, incoming=True))
        adopted = tuple(self.incoming)
        notes: list[str] = [f"adopted incoming sessions {sorted(adopted)}"] if adopted else []
        # The agent retries EBUSY here itself, with back-off and a service status.
        with self._device(retry_busy=False) as dev:
            own = self.incoming.get(AGENT_SESSION)
            if own is None:
                try:
                    own = dev.retrieve_session(AGENT_SESSION)
                except NoSuchSession:
                    return BootState(kernel_state=None, notes=tuple(notes))
                self._hold_incoming(AGENT_SESSION, own)
            try:
                self._meta_fd = own.retrieve_fd(METADATA_TOKEN)
                record = read_metadata(self._meta_fd)
            except (KernelError, HandoverCorrupt) as exc:
                notes.append(f"agent session unusable: {exc}")
                return BootState(kernel_state=None, notes=tuple(notes))
            for name in dict.fromkeys(p.session for p in record.preserved):
                if name in self.incoming:
                    continue
                try:
                    self._hold_incoming(name, dev.retrieve_session(name))
                except KernelError as exc:
                    notes.append(f"session {name!r} not carried: {exc}")
            return BootState(kernel_state=None, incoming=record, notes=tuple(notes))

    def preserve(
        self, items: Sequence[PreserveItem], record: UpdateRecord
    ) -> dict[tuple[str, int], int]:
        if self.outgoing:
            raise WrongKernelState("preserve", errno.EBUSY, "outgoing sessions already exist")
        try:
            with self._device() as dev:
                own = self.outgoing[AGENT_SESSION] = dev.create_session(AGENT_SESSION)
                self._meta_fd = new_metadata_memfd(record)
                own.preserve_fd(self._meta_fd, METADATA_TOKEN)
                for item in items:
                    session = self.outgoing.get(item.session)
                    if session is None:
                        session = self.outgoing[item.session] = dev.create_session(item.session)
                    session.preserve_fd(item.fd, item.token)
        except BaseException:
            self.cancel()
            raise
        return {(i.session, i.token): i.token for i in items}

    def prepare(self) -> None:
        pass

    def freeze(self) -> None:
        pass

    def reboot(self) -> None:
        self.syscalls.reboot_kexec()

    def entrust_outgoing(self) -> int:
        # The agent's own session (metadata) travels like the others; nothing is closed here:
        # the agent's copies go when PID 1 stops it, the custody's stay open to reboot(KEXEC).
        try:
            for name, session in self.outgoing.items():
                self._readable_by_pid1(name, session.fd)
                self.custody.keep_outgoing(name, session.fd)
                self._entrusted.append(name)
            self.custody.sync()
        except BaseException:
            self.reclaim_outgoing()
            raise
        return len(self._entrusted)

    def _readable_by_pid1(self, name: str, fd: int) -> None:
        """PID 1 maps a session back by the name its fd link shows (systemd's
        ``fd_get_luo_session_name``); one it cannot read is not carried as a session."""
        link = self.syscalls.fd_link(fd)
        if link != SESSION_LINK_PREFIX + name:
            raise KernelError(
                "hand-over",
                errno.EMEDIUMTYPE,
                f"session {name!r} reads back as {link!r}: PID 1 would not carry it",
            )

    def reclaim_outgoing(self) -> None:
        # Otherwise the store would keep the sessions open, preserved, into any later kexec.
        while self._entrusted:
            self.custody.drop_outgoing(self._entrusted.pop())

    def cancel(self) -> None:
        # Closing an outgoing session unpreserves its files: that is the session ABI's cancel.
        self.reclaim_outgoing()
        self._close_outgoing()

    def _close_outgoing(self) -> None:
        for session in self.outgoing.values():
            session.close()
        self.outgoing.clear()
        self._drop_metadata()

    def adopt(self, record: UpdateRecord) -> None:
        # Outgoing sessions die with the process that held them: nothing to take over.
        pass

    def take_over_carried(self, record: UpdateRecord) -> bool:
        # The agent's own session went with the agent that retrieved it (the kernel finished it,
        # the metadata memfd with it); the participants' sessions are still in the kernel,
        # under the names the in-flight record gives (tokens are the kernel's own here).  None
        # found: nothing was carried (someone else's kexec while the image was loaded).
        found = False
        with self._device() as dev:
            for name in dict.fromkeys(p.session for p in record.preserved):
                if name not in self.incoming:
                    with contextlib.suppress(NoSuchSession):
                        self._hold_incoming(name, dev.retrieve_session(name))
                        found = True
        return found

    def retrieve(self, session: str, token: int) -> int:
        held = self.incoming.get(session)
        if held is None or session == AGENT_SESSION:
            raise NoSuchSession(
                "RETRIEVE_SESSION", errno.ENOENT, f"no incoming session {session!r}"
            )
        return held.retrieve_fd(token)

    def finish(self) -> list[str]:
        problems: list[str] = []
        # The agent's own session last: if a client session cannot finish, the record survives.
        for name in sorted(self.incoming, key=lambda n: n == AGENT_SESSION):
            session = self.incoming[name]
            try:
                session.finish()
            except KernelError as exc:
                problems.append(f"{name}: {exc}")
                continue
            session.close()
            del self.incoming[name]
            self.custody.drop(name)
        if not problems:
            self._drop_metadata()
        return problems

    def load_kernel(self, kernel_fd: int, initrd_fd: int, cmdline: str) -> None:
        self.syscalls.kexec_file_load(kernel_fd, initrd_fd, cmdline, 0)

    def unload_kernel(self) -> None:
        self.syscalls.kexec_file_load(-1, -1, "", KEXEC_FILE_UNLOAD)

    def kexec_image_loaded(self) -> bool:
        return kexec_image_loaded(self.syscalls)

    def describe_state(self) -> str:
        return f"{len(self.outgoing)} outgoing, {len(self.incoming)} incoming sessions"

    def close(self) -> None:
        # Only the agent's own copies: entrusted sessions stay with the custody for the kexec
        # that PID 1 is carrying out (it stops the agent on the way).
        self._close_outgoing()
        for session in self.incoming.values():
            with contextlib.suppress(KernelError, OSError):
                session.close()
        self.incoming.clear()
        self._drop_metadata()
