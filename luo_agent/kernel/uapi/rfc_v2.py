"""G1: the RFC v2 / ``luo/rfc-v2.1`` header (kernel-abi.md §3).

``_IOWR``-style size-encoded requests, global 0-based states, kernel-generated tokens.
"""

from __future__ import annotations

import ctypes
import enum
from typing import Final

from . import _IO, _IOR, _IOW, _IOWR, LIVEUPDATE_IOCTL_TYPE


class liveupdate_fd(ctypes.Structure):
    _fields_ = [
        ("fd", ctypes.c_int),  # in for PRESERVE, out for RESTORE
        ("flags", ctypes.c_uint32),  # "must be 0", not checked by the RFC v2 code
        ("token", ctypes.c_uint64),  # out for PRESERVE (kernel-made), in for RESTORE
    ]


class liveupdate_selftest(ctypes.Structure):
    _fields_ = [("cmd", ctypes.c_uint64), ("arg", ctypes.c_uint64)]


class liveupdate_state(enum.IntEnum):
    LIVEUPDATE_STATE_NORMAL = 0
    LIVEUPDATE_STATE_PREPARED = 1
    LIVEUPDATE_STATE_FROZEN = 2
    LIVEUPDATE_STATE_UPDATED = 3


LIVEUPDATE_IOCTL_FD_PRESERVE: Final = _IOWR(
    LIVEUPDATE_IOCTL_TYPE, 0x00, ctypes.sizeof(liveupdate_fd)
)
LIVEUPDATE_IOCTL_FD_UNPRESERVE: Final = _IOW(
    LIVEUPDATE_IOCTL_TYPE, 0x01, ctypes.sizeof(ctypes.c_uint64)
)
LIVEUPDATE_IOCTL_FD_RESTORE: Final = _IOWR(
    LIVEUPDATE_IOCTL_TYPE, 0x02, ctypes.sizeof(liveupdate_fd)
)
LIVEUPDATE_IOCTL_GET_STATE: Final = _IOR(
    LIVEUPDATE_IOCTL_TYPE, 0x03, ctypes.sizeof(ctypes.c_uint32)
)
LIVEUPDATE_IOCTL_EVENT_PREPARE: Final = _IO(LIVEUPDATE_IOCTL_TYPE, 0x04)
LIVEUPDATE_IOCTL_EVENT_FREEZE: Final = _IO(LIVEUPDATE_IOCTL_TYPE, 0x05)
LIVEUPDATE_IOCTL_EVENT_CANCEL: Final = _IO(LIVEUPDATE_IOCTL_TYPE, 0x06)
LIVEUPDATE_IOCTL_EVENT_FINISH: Final = _IO(LIVEUPDATE_IOCTL_TYPE, 0x07)
# Only in the soleen/linux header (debugfs luo_selftest file), not on /dev/liveupdate.
LIVEUPDATE_IOCTL_SELFTESTS: Final = _IOWR(
    LIVEUPDATE_IOCTL_TYPE, 0x08, ctypes.sizeof(liveupdate_selftest)
)

# sysfs /sys/kernel/liveupdate/state strings, indexed by liveupdate_state.
STATE_STRINGS: Final = {
    liveupdate_state.LIVEUPDATE_STATE_NORMAL: "normal",
    liveupdate_state.LIVEUPDATE_STATE_PREPARED: "prepared",
    liveupdate_state.LIVEUPDATE_STATE_FROZEN: "frozen",
    liveupdate_state.LIVEUPDATE_STATE_UPDATED: "updated",
}
