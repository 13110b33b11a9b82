"""Values shared by the typed device layer (``rfc_v2``, ``v3``, ``session``) and the fd-owning
handle they are built on.

Every device runs on any ``Syscalls`` (the real kernel or the emulated one) and sends exactly the
uapi request numbers and struct bytes; errors come out as domain errors via ``errnomap``.
"""

from __future__ import annotations

import ctypes
import errno
import os
from enum import StrEnum
from types import TracebackType
from typing import Final, Self, TypeVar

from luo_agent.errors import KernelError

from .errnomap import Op, os_error, translate
from .syscalls import DEVICE_PATH, Syscalls
from .uapi import rfc_v2, v3

OPEN_FLAGS: Final = os.O_RDWR | os.O_CLOEXEC


class Abi(StrEnum):
    """The backends of design.md §2 (kernel-abi.md: rfc-v2 = G1, v3 = G3, session = G5/G6)."""

    RFC_V2 = "rfc-v2"
    V3 = "v3"
    SESSION = "session"


class GlobalState(StrEnum):
    """The global LUO state of the state-machine ABIs; values are the sysfs strings."""

    UNDEFINED = "undefined"
    NORMAL = "normal"
    PREPARED = "prepared"
    FROZEN = "frozen"
    UPDATED = "updated"

    @classmethod
    def from_rfc_v2(cls, number: int) -> GlobalState:
        """G1 numbers are 0-based (NORMAL 0 … UPDATED 3).  ValueError if unknown."""
        return cls(rfc_v2.STATE_STRINGS[rfc_v2.liveupdate_state(number)])

    @classmethod
    def from_v3(cls, number: int) -> GlobalState:
        """G2-G4 numbers are 1-based with UNDEFINED 0.  ValueError if unknown."""
        return cls(v3.STATE_STRINGS[v3.liveupdate_state(number)])


class GlobalEvent(StrEnum):
    """Global state-machine events (rfc-v2 EVENT_* ioctls, v3 SET_EVENT)."""

    PREPARE = "prepare"
    FREEZE = "freeze"
    CANCEL = "cancel"
    FINISH = "finish"


_Struct = TypeVar("_Struct", bound=ctypes.Structure)


def sized(struct: type[_Struct], **fields: int) -> _Struct:
    """A size-first (G3+) argument: ``size`` = ``sizeof(struct)``, the rest zero unless given."""
    return struct(size=ctypes.sizeof(struct), **fields)


class FdHandle:
    """One kernel fd (the device or a session) owned by this object until ``close``/``detach``.

    ``close`` is idempotent; after it every call raises ``KernelError`` (EBADF) without touching
    the fd number, which the process may already have reused for something else.
    """

    def __init__(self, syscalls: Syscalls, fd: int | None = None) -> None:
        self._syscalls = syscalls
        self._fd = fd

    @property
    def closed(self) -> bool:
        return self._fd is None

    def fileno(self) -> int:
        if self._fd is None:
            raise KernelError("fileno", errno.EBADF, "not open")
        return self._fd

    def detach(self) -> int:
        """Give up ownership: return the fd without closing it."""
        fd = self.fileno()
        self._fd = None
        return fd

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            self._syscalls.close(fd)
        except OSError as exc:
            raise translate(Op.CLOSE, exc) from exc

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _ioctl(self, op: Op, request: int, buf: bytearray, subject: str = "") -> int:
        """The one ioctl choke point: every failure leaves here as a domain error."""
        if self._fd is None:
            raise translate(op, os_error(errno.EBADF), subject or "not open")
        try:
            return self._syscalls.ioctl(self._fd, request, buf)
        except OSError as exc:
            raise translate(op, exc, subject) from exc

    def _call(self, op: Op, request: int, arg: _Struct, subject: str = "") -> _Struct:
        """ioctl with a uapi struct in, the struct as the kernel left it out."""
        buf = bytearray(arg)
        self._ioctl(op, request, buf, subject)
        return type(arg).from_buffer_copy(buf)


class DeviceFile(FdHandle):
    """``/dev/liveupdate`` (mapped through ``syscalls.path``).  Opened by ``open()`` or by
    entering the context manager; ``open()`` on an open device is a no-op."""

    def __init__(self, syscalls: Syscalls, path: str = DEVICE_PATH) -> None:
        super().__init__(syscalls)
        self.path = syscalls.path(path)

    def open(self) -> Self:
        if self._fd is None:
            try:
                self._fd = self._syscalls.open(self.path, OPEN_FLAGS)
            except OSError as exc:
                raise translate(Op.OPEN, exc, self.path) from exc
        return self

    def __enter__(self) -> Self:
        return self.open()


def unknown_state(number: int) -> KernelError:
    """A state number outside the generation's enum: the kernel speaks an ABI we do not."""
    return KernelError(Op.GET_STATE.value, errno.EPROTO, f"unknown state number {number}")
