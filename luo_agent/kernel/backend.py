"""The agent's view of the kernel: one phase-level backend per ABI generation (design.md §3 table).

| step     | rfc-v2                 | v3                      | session                      |
|----------|------------------------|-------------------------|------------------------------|
| preserve | FD_PRESERVE (kernel    | FD_PRESERVE (agent-made | CREATE_SESSION + PRESERVE_FD |
|          | makes the tokens)      | global tokens)          | per client session, + our own|
| prepare  | EVENT_PREPARE          | SET_EVENT(PREPARE)      | nothing: preserving is it    |
| freeze   | EVENT_FREEZE           | (inside reboot)         | barrier only                 |
| reboot   | reboot(KEXEC)          | reboot(KEXEC)           | reboot(KEXEC), sessions open |
| cancel   | EVENT_CANCEL +         | SET_EVENT(CANCEL) +     | close the outgoing sessions  |
|          | FD_UNPRESERVE          | FD_UNPRESERVE           |                              |
| finish   | EVENT_FINISH           | SET_EVENT(FINISH)       | FINISH + close each incoming |

The agent's own metadata (update id, (session, token) → kernel token, timings) travels in a memfd
preserved like any client file, so the new boot's agent learns the update from the kernel.  Backends
are synchronous (ioctls); the agent runs them on its kernel thread.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol

from ..errors import (
    DeviceBusy,
    HandoverCorrupt,
    KernelError,
    NoSuchSession,
    Unsupported,
    WrongKernelState,
)
from ..persist import write_atomic
from ..records import METADATA_CAPACITY, UpdateRecord, decode_metadata, encode_metadata
from .device import Abi, Event, KernelState
from .rfc_v2 import RfcV2Device
from .session import LuoSession, SessionDevice
from .syscalls import Syscalls, kexec_image_loaded
from .v3 import V3Device

AGENT_SESSION: Final = "luo-agent"  # the agent's own session on the session ABI
METADATA_TOKEN: Final = 0  # token of the metadata memfd in the agent's session / the v3 global list


@dataclass(frozen=True, slots=True)
class PreserveItem:
    session: str
    token: int
    fd: int


@dataclass(frozen=True, slots=True)
class BootState:
    """What the kernel says when the agent starts."""

    kernel_state: KernelState | None  # None on the session ABI (no global state)
    # The update this boot continues: set after a live-update boot that carried our metadata.
    incoming: UpdateRecord | None = None
    # A state-machine kernel left PREPARED/FROZEN with nothing of ours (the agent crashed).
    stale_prepared: bool = False
    notes: tuple[str, ...] = ()


class FdCustody(Protocol):
    """Somewhere session fds outlive the agent's process (systemd's fd store): see
    ``luo_agent.systemd.fdstore``."""

    def inherited(self) -> dict[str, int]:
        """Incoming session fds handed back, by session name: kept by a previous instance of
        the agent in this boot, or carried through the kexec by PID 1 (the systemd strategy)."""
        ...

    def keep(self, name: str, fd: int) -> None:
        """Keep an incoming session (best effort: the agent holds it too)."""
        ...

    def drop(self, name: str) -> None:
        """The incoming session is finished: forget it, under whichever name it was kept."""
        ...

    def keep_outgoing(self, name: str, fd: int) -> None:
        """Keep an outgoing session through the kexec (the systemd strategy); raises OSError if
        the fd could not be handed over, since the update would then be lost."""
        ...

    def drop_outgoing(self, name: str) -> None:
        """Take back an outgoing session kept for a kexec that did not happen."""
        ...

    def sync(self) -> None:
        """Return once the keeper has processed every fd handed to it so far (sd_notify's
        ``BARRIER=1``); raises OSError if it does not answer."""
        ...


class NoCustody:
    """Nothing outlives the process (tests, an agent not run by systemd)."""

    def inherited(self) -> dict[str, int]:
        return {}

    def keep(self, name: str, fd: int) -> None:
        pass

    def drop(self, name: str) -> None:
        pass

    def keep_outgoing(self, name: str, fd: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "no fd store to keep outgoing sessions in")

    def drop_outgoing(self, name: str) -> None:
        pass

    def sync(self) -> None:
        pass


class KernelBackend(Protocol):
    abi: Abi

    def start(self) -> BootState: ...

    def preserve(
        self, items: Sequence[PreserveItem], record: UpdateRecord
    ) -> dict[tuple[str, int], int]: ...

    def prepare(self) -> None: ...

    def freeze(self) -> None: ...

    def update_metadata(self, record: UpdateRecord) -> None: ...

    def reboot(self) -> None: ...

    def entrust_outgoing(self) -> int:
        """Hand every outgoing handle to the custody so it survives the agent through a kexec
        by PID 1 (the systemd strategy), and return how many; only the session ABI can."""
        ...

    def reclaim_outgoing(self) -> None:
        """Undo ``entrust_outgoing`` (the kexec was not done); the update stays prepared."""
        ...

    def cancel(self) -> None: ...

    def adopt(self, record: UpdateRecord) -> None:
        """Take over the kernel tokens of an update found in ``current.json`` after a restart."""
        ...

    def retrieve(self, session: str, token: int) -> int: ...

    def finish(self) -> list[str]:
        """Finish every carried item; return the problems that were left for the next cycle."""
        ...

    def load_kernel(self, kernel_fd: int, initrd_fd: int, cmdline: str) -> None: ...

    def kexec_image_loaded(self) -> bool:
        """Whether a kexec image is loaded (by anyone), i.e. ``reboot(KEXEC)`` can jump."""
        ...

    def describe_state(self) -> str: ...

    def close(self) -> None: ...


def _new_metadata_memfd(record: UpdateRecord) -> int:
    fd = os.memfd_create("luo-agent-metadata", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, METADATA_CAPACITY)
        _write_metadata(fd, record)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_metadata(fd: int, record: UpdateRecord) -> None:
    blob = encode_metadata(record)
    os.pwrite(fd, blob, 0)


def _read_metadata(fd: int) -> UpdateRecord:
    blob = os.pread(fd, METADATA_CAPACITY, 0)
    return decode_metadata(blob)


class _MetadataMixin:
    _meta_fd: int = -1

    def update_metadata(self, record: UpdateRecord) -> None:
        # The memfd stays writable after preservation; the kernel carries its bytes at the kexec.
        if self._meta_fd >= 0:
            _write_metadata(self._meta_fd, record)

    def _drop_metadata(self) -> None:
        if self._meta_fd >= 0:
            os.close(self._meta_fd)
            self._meta_fd = -1


@dataclass
class SessionBackend(_MetadataMixin):
    """Linux 6.19+.  The device is opened per operation and closed again (systemd >= 261 opens it
    too); the agent holds session fds instead."""

    syscalls: Syscalls
    abi: Abi = Abi.SESSION
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
                record = _read_metadata(self._meta_fd)
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
                for item in items:
                    session = self.outgoing.get(item.session)
                    if session is None:
                        session = self.outgoing[item.session] = dev.create_session(item.session)
                    session.preserve_fd(item.fd, item.token)
                own = self.outgoing[AGENT_SESSION] = dev.create_session(AGENT_SESSION)
                self._meta_fd = _new_metadata_memfd(record)
                own.preserve_fd(self._meta_fd, METADATA_TOKEN)
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
                self.custody.keep_outgoing(name, session.fd)
                self._entrusted.append(name)
            self.custody.sync()
        except BaseException:
            self.reclaim_outgoing()
            raise
        return len(self._entrusted)

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


class _GlobalListBackend(_MetadataMixin):
    """Shared by rfc-v2 and v3: one global preserved list behind a held device fd."""

    abi: Abi
    _meta_fd: int = -1

    def __init__(self, syscalls: Syscalls) -> None:
        self.syscalls = syscalls
        self.kernel_tokens: dict[tuple[str, int], int] = {}
        self.meta_kernel_token: int | None = None

    def reboot(self) -> None:
        self.syscalls.reboot_kexec()

    def entrust_outgoing(self) -> int:
        # The held device fd must stay open through the reboot, and PID 1 >= 261 needs the
        # device itself at shutdown: an fd store cannot carry a state-machine update.
        raise Unsupported(
            "entrust_outgoing", errno.EOPNOTSUPP, f"{self.abi} keeps the update in the device fd"
        )

    def reclaim_outgoing(self) -> None:
        pass

    def load_kernel(self, kernel_fd: int, initrd_fd: int, cmdline: str) -> None:
        self.syscalls.kexec_file_load(kernel_fd, initrd_fd, cmdline, 0)

    def kexec_image_loaded(self) -> bool:
        return kexec_image_loaded(self.syscalls)

    # Generation-specific primitives.
    def _state(self) -> KernelState:
        raise NotImplementedError

    def _preserve_one(self, fd: int, wanted_token: int) -> int:
        raise NotImplementedError

    def _unpreserve(self, token: int) -> None:
        raise NotImplementedError

    def _restore(self, token: int) -> int:
        raise NotImplementedError

    def _event_prepare(self) -> None:
        raise NotImplementedError

    def _event_cancel(self) -> None:
        raise NotImplementedError

    def _event_finish(self) -> None:
        raise NotImplementedError

    def _metadata_token_on_boot(self) -> int | None:
        raise NotImplementedError

    def _remember_metadata_token(self, token: int) -> None:
        pass

    def start(self) -> BootState:
        state = self._state()
        if state is KernelState.UPDATED:
            token = self._metadata_token_on_boot()
            if token is None:
                return BootState(state, notes=("no agent metadata token for this boot",))
            try:
                self._meta_fd = self._restore(token)
                record = _read_metadata(self._meta_fd)
            except (KernelError, HandoverCorrupt) as exc:
                return BootState(state, notes=(f"agent metadata unusable: {exc}",))
            self.meta_kernel_token = token
            self.kernel_tokens = {(p.session, p.token): p.kernel_token for p in record.preserved}
            return BootState(state, incoming=record)
        if state in (KernelState.PREPARED, KernelState.FROZEN):
            return BootState(state, stale_prepared=True)
        return BootState(state)

    def preserve(
        self, items: Sequence[PreserveItem], record: UpdateRecord
    ) -> dict[tuple[str, int], int]:
        try:
            self._meta_fd = _new_metadata_memfd(record)
            self.meta_kernel_token = self._preserve_one(self._meta_fd, METADATA_TOKEN)
            self._remember_metadata_token(self.meta_kernel_token)
            for index, item in enumerate(items, start=1):
                self.kernel_tokens[(item.session, item.token)] = self._preserve_one(item.fd, index)
        except BaseException:
            self._unpreserve_all()
            raise
        return dict(self.kernel_tokens)

    def _unpreserve_all(self) -> None:
        tokens: Iterable[int] = list(self.kernel_tokens.values())
        if self.meta_kernel_token is not None:
            tokens = [self.meta_kernel_token, *tokens]
        for token in tokens:
            with contextlib.suppress(KernelError):
                self._unpreserve(token)
        self.kernel_tokens.clear()
        self.meta_kernel_token = None
        self._drop_metadata()

    def prepare(self) -> None:
        self._event_prepare()

    def freeze(self) -> None:
        pass

    def cancel(self) -> None:
        if self._state() in (KernelState.PREPARED, KernelState.FROZEN):
            self._event_cancel()
        self._unpreserve_all()

    def adopt(self, record: UpdateRecord) -> None:
        self.kernel_tokens = {(p.session, p.token): p.kernel_token for p in record.preserved}
        self.meta_kernel_token = self._metadata_token_on_boot()

    def retrieve(self, session: str, token: int) -> int:
        kernel_token = self.kernel_tokens.get((session, token))
        if kernel_token is None:
            raise NoSuchSession(
                "FD_RESTORE", errno.ENOENT, f"nothing carried for {session!r}/{token}"
            )
        return self._restore(kernel_token)

    def finish(self) -> list[str]:
        try:
            self._event_finish()
        except KernelError as exc:
            return [str(exc)]
        self.kernel_tokens.clear()
        self.meta_kernel_token = None
        self._drop_metadata()
        return []

    def describe_state(self) -> str:
        return str(self._state())


class V3Backend(_GlobalListBackend):
    """PATCH v3: exclusive device held for the agent's lifetime; closing it drops every preserved
    file, so the kernel itself aborts the update if the agent dies."""

    abi = Abi.V3

    def __init__(self, syscalls: Syscalls) -> None:
        super().__init__(syscalls)
        self.device = V3Device(syscalls)
        self.device.open()

    def _state(self) -> KernelState:
        return self.device.get_state()

    def _preserve_one(self, fd: int, wanted_token: int) -> int:
        self.device.fd_preserve(fd, wanted_token)
        return wanted_token

    def _unpreserve(self, token: int) -> None:
        self.device.fd_unpreserve(token)

    def _restore(self, token: int) -> int:
        return self.device.fd_restore(token)

    def _event_prepare(self) -> None:
        self.device.set_event(Event.PREPARE)

    def _event_cancel(self) -> None:
        self.device.set_event(Event.CANCEL)

    def _event_finish(self) -> None:
        self.device.set_event(Event.FINISH)

    def _metadata_token_on_boot(self) -> int | None:
        return METADATA_TOKEN

    def close(self) -> None:
        self._drop_metadata()
        self.device.close()


class RfcV2Backend(_GlobalListBackend):
    """RFC v2: the kernel makes the tokens and nothing is dropped on close, so the agent cancels
    on stop and a restarted agent cancels a stale PREPARED.  The metadata memfd's kernel-made token
    cannot be known in advance: it is kept in the state directory (fsync'd) for the next boot."""

    abi = Abi.RFC_V2

    def __init__(self, syscalls: Syscalls, state_directory: Path) -> None:
        super().__init__(syscalls)
        self.token_file = state_directory / "rfc-v2-metadata-token"
        self.device = RfcV2Device(syscalls)
        self.device.open()

    def _state(self) -> KernelState:
        return self.device.get_state()

    def _preserve_one(self, fd: int, wanted_token: int) -> int:
        return self.device.fd_preserve(fd)

    def _unpreserve(self, token: int) -> None:
        self.device.fd_unpreserve(token)

    def _restore(self, token: int) -> int:
        return self.device.fd_restore(token)

    def _event_prepare(self) -> None:
        self.device.event_prepare()

    def _event_cancel(self) -> None:
        self.device.event_cancel()

    def _event_finish(self) -> None:
        self.device.event_finish()
        with contextlib.suppress(FileNotFoundError):
            self.token_file.unlink()

    def freeze(self) -> None:
        self.device.event_freeze()

    def _metadata_token_on_boot(self) -> int | None:
        try:
            return int(self.token_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def _remember_metadata_token(self, token: int) -> None:
        self.token_file.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.token_file, f"{token}\n".encode(), durable=True)

    def close(self) -> None:
        self._drop_metadata()
        self.device.close()
