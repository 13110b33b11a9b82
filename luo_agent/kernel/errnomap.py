"""The one place where an ``OSError`` from ``open``/``ioctl``/a syscall on the LUO device becomes a
domain error (``luo_agent.errors``).

The same errno means different things per operation (ENOENT is "no such session" for
RETRIEVE_SESSION but "this file type cannot be preserved" for PRESERVE_FD), so the table is keyed
by ``(Op, errno)``; a small op-independent table covers what every ioctl shares, and anything not
listed is a plain ``KernelError``.  Meanings follow kernel-abi.md §1.2, §3, §5, §7 and §9.
"""

from __future__ import annotations

import errno as E
import os
from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import Final

from luo_agent.errors import (
    AlreadyExists,
    DeviceBusy,
    DeviceUnavailable,
    KernelError,
    NoSuchSession,
    NoSuchToken,
    Unsupported,
    WrongKernelState,
)


class Op(StrEnum):
    """Operations on the LUO device; the values are the uapi op names (as in the uapi tables and
    the emulator's fault-injection names), so errors read like the kernel's vocabulary."""

    OPEN = "open"
    CLOSE = "close"
    # rfc-v2 (G1) and v3 (G3): global fd list and global state machine
    FD_PRESERVE = "FD_PRESERVE"
    FD_UNPRESERVE = "FD_UNPRESERVE"
    FD_RESTORE = "FD_RESTORE"
    GET_STATE = "GET_STATE"
    EVENT_PREPARE = "EVENT_PREPARE"
    EVENT_FREEZE = "EVENT_FREEZE"
    EVENT_CANCEL = "EVENT_CANCEL"
    EVENT_FINISH = "EVENT_FINISH"
    SET_EVENT = "SET_EVENT"
    # session (G5/G6): /dev/liveupdate
    CREATE_SESSION = "CREATE_SESSION"
    RETRIEVE_SESSION = "RETRIEVE_SESSION"
    # session (G5/G6): session fds
    PRESERVE_FD = "PRESERVE_FD"
    RETRIEVE_FD = "RETRIEVE_FD"
    FINISH = "FINISH"
    GET_NAME = "GET_NAME"
    # syscalls
    KEXEC_FILE_LOAD = "kexec_file_load"
    REBOOT_KEXEC = "reboot"


TRANSITIONS: Final = frozenset(
    {Op.EVENT_PREPARE, Op.EVENT_FREEZE, Op.EVENT_CANCEL, Op.EVENT_FINISH, Op.SET_EVENT}
)
_IOCTLS: Final = frozenset(Op) - {Op.OPEN, Op.CLOSE, Op.KEXEC_FILE_LOAD, Op.REBOOT_KEXEC}

Meaning = tuple[type[KernelError], str]


def _each(ops: Iterable[Op], err: int, meaning: Meaning) -> dict[tuple[Op, int], Meaning]:
    return {(op, err): meaning for op in ops}


_WRONG_STATE: Final[Meaning] = (WrongKernelState, "not allowed in the current kernel state")

ERRNO_TABLE: Final[Mapping[tuple[Op, int], Meaning]] = {
    # open("/dev/liveupdate")
    (Op.OPEN, E.ENOENT): (DeviceUnavailable, "no /dev/liveupdate: LUO absent or disabled"),
    (Op.OPEN, E.ENODEV): (DeviceUnavailable, "no /dev/liveupdate: LUO absent or disabled"),
    (Op.OPEN, E.ENXIO): (DeviceUnavailable, "no /dev/liveupdate: LUO absent or disabled"),
    (Op.OPEN, E.EACCES): (DeviceUnavailable, "permission denied (root / CAP_SYS_ADMIN needed)"),
    (Op.OPEN, E.EPERM): (DeviceUnavailable, "permission denied (root / CAP_SYS_ADMIN needed)"),
    (Op.OPEN, E.EBUSY): (DeviceBusy, "another process holds the exclusive device"),
    (Op.OPEN, E.EIO): (
        DeviceUnavailable,
        "deserialization of the incoming live-update state failed, reboot normally",
    ),
    # global fd list (rfc-v2, v3)
    (Op.FD_PRESERVE, E.ENOENT): (Unsupported, "file type cannot be preserved"),
    (Op.FD_PRESERVE, E.EEXIST): (AlreadyExists, "token already in use"),
    (Op.FD_PRESERVE, E.EBUSY): (WrongKernelState, "preserve only in NORMAL or UPDATED"),
    (Op.FD_PRESERVE, E.EBADF): (KernelError, "fd is not open"),
    (Op.FD_UNPRESERVE, E.ENOENT): (NoSuchToken, "no preserved file with this token"),
    (Op.FD_UNPRESERVE, E.EBUSY): (WrongKernelState, "unpreserve only in NORMAL"),
    (Op.FD_UNPRESERVE, E.EINVAL): (WrongKernelState, "unpreserve only in NORMAL"),
    (Op.FD_RESTORE, E.ENOENT): (NoSuchToken, "no preserved file with this token"),
    (Op.FD_RESTORE, E.EBUSY): (WrongKernelState, "restore only in UPDATED"),
    (Op.FD_RESTORE, E.EINVAL): (WrongKernelState, "not restorable now (restored already?)"),
    # global state machine (rfc-v2 EVENT_*, v3 SET_EVENT)
    **_each(TRANSITIONS, E.EINVAL, (WrongKernelState, "transition not allowed in this state")),
    **_each(TRANSITIONS, E.EBUSY, _WRONG_STATE),
    **_each(TRANSITIONS, E.EAGAIN, (KernelError, "interrupted while waiting for the state lock")),
    # session ABI: /dev/liveupdate
    (Op.CREATE_SESSION, E.EEXIST): (AlreadyExists, "an outgoing session has this name"),
    (Op.CREATE_SESSION, E.ENOMEM): (KernelError, "session table full or out of memory"),
    (Op.CREATE_SESSION, E.EINVAL): (KernelError, "the kernel rejected the session name"),
    (Op.RETRIEVE_SESSION, E.ENOENT): (NoSuchSession, "no incoming session has this name"),
    (Op.RETRIEVE_SESSION, E.EINVAL): (
        WrongKernelState,
        "session already retrieved (its fd is open) or its finish failed",
    ),
    # session ABI: session fds.  EINVAL = wrong session kind on G6 (6.19 does not check).
    (Op.PRESERVE_FD, E.ENOENT): (Unsupported, "file type cannot be preserved"),
    (Op.PRESERVE_FD, E.EEXIST): (AlreadyExists, "token already in use in this session"),
    (Op.PRESERVE_FD, E.EBUSY): (
        AlreadyExists,
        "file already preserved (in this or another session)",
    ),
    (Op.PRESERVE_FD, E.ENOSPC): (KernelError, "session is full"),
    (Op.PRESERVE_FD, E.EBADF): (KernelError, "fd is not open"),
    (Op.PRESERVE_FD, E.EINVAL): (WrongKernelState, "PRESERVE_FD is valid on outgoing sessions"),
    (Op.RETRIEVE_FD, E.ENOENT): (NoSuchToken, "no file with this token in the session"),
    (Op.RETRIEVE_FD, E.EINVAL): (
        WrongKernelState,
        "RETRIEVE_FD is valid on incoming sessions (or the file handler refused)",
    ),
    (Op.FINISH, E.EBUSY): (WrongKernelState, "a preserved file cannot finish yet"),
    (Op.FINISH, E.EINVAL): (WrongKernelState, "FINISH is valid on incoming sessions"),
    # 6.19 has three session ops: nr 0x43 is out of range there -> EINVAL, not ENOTTY.
    (Op.GET_NAME, E.EINVAL): (Unsupported, "GET_NAME needs a kernel newer than 6.19"),
    # syscalls
    (Op.KEXEC_FILE_LOAD, E.ENOSYS): (Unsupported, "kexec_file_load is not available"),
    (Op.KEXEC_FILE_LOAD, E.EPERM): (KernelError, "not permitted (CAP_SYS_BOOT, lockdown?)"),
    (Op.REBOOT_KEXEC, E.EINVAL): (KernelError, "no kexec image loaded"),
    (Op.REBOOT_KEXEC, E.EAGAIN): (
        KernelError,
        "live-update serialization failed; sessions intact, retry or cancel",
    ),
}

# Meanings every ioctl shares (kernel-abi.md §1.2 "documented errno meanings").
ANY_IOCTL: Final[Mapping[int, Meaning]] = {
    E.ENOTTY: (Unsupported, "request not implemented by this kernel's LUO ABI"),
    E.EOPNOTSUPP: (Unsupported, "field value not supported by this kernel"),
    E.E2BIG: (KernelError, "kernel does not understand trailing bytes (ABI mismatch)"),
}


def translate(op: Op, error: OSError, subject: str = "") -> KernelError:
    """The domain error for ``error`` raised by ``op``.  ``subject`` (a session name, a token)
    is appended to the detail so the message says what was being worked on."""
    err = error.errno if error.errno is not None else E.EIO
    meaning = ERRNO_TABLE.get((op, err))
    if meaning is None and op in _IOCTLS:
        meaning = ANY_IOCTL.get(err)
    cls, detail = meaning if meaning is not None else (KernelError, "")
    if subject:
        detail = f"{detail} ({subject})" if detail else subject
    return cls(op.value, err, detail)


def os_error(err: int) -> OSError:
    """An ``OSError`` as the kernel would raise it, for checks made before a call reaches it."""
    return OSError(err, os.strerror(err))
