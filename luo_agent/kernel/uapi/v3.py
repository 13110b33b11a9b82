"""G3: ``[PATCH v3 00/30]`` (2025-08-07) — size-first ``_IO`` requests, exclusive open
(kernel-abi.md §5).  Global 1-based states, user-chosen tokens, close drops every preserved fd.
"""

from __future__ import annotations

import ctypes
import enum
from typing import Final

from . import _IO, LIVEUPDATE_IOCTL_TYPE, IoctlOp, min_size_of

LIVEUPDATE_CMD_BASE: Final = 0x00


class liveupdate_ioctl_fd_preserve(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint32), ("fd", ctypes.c_int32), ("token", ctypes.c_uint64)]


class liveupdate_ioctl_fd_unpreserve(ctypes.Structure):
    # 4 bytes of implicit padding at offset 4: token is __aligned_u64.
    _fields_ = [("size", ctypes.c_uint32), ("token", ctypes.c_uint64)]


class liveupdate_ioctl_fd_restore(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint32), ("fd", ctypes.c_int32), ("token", ctypes.c_uint64)]


class liveupdate_ioctl_get_state(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint32), ("state", ctypes.c_uint32)]


class liveupdate_ioctl_set_event(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint32), ("event", ctypes.c_uint32)]


class liveupdate_state(enum.IntEnum):
    LIVEUPDATE_STATE_UNDEFINED = 0
    LIVEUPDATE_STATE_NORMAL = 1
    LIVEUPDATE_STATE_PREPARED = 2
    LIVEUPDATE_STATE_FROZEN = 3
    LIVEUPDATE_STATE_UPDATED = 4


class liveupdate_event(enum.IntEnum):
    LIVEUPDATE_PREPARE = 0
    LIVEUPDATE_FREEZE = 1
    LIVEUPDATE_FINISH = 2
    LIVEUPDATE_CANCEL = 3


LIVEUPDATE_IOCTL_FD_PRESERVE: Final = _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_BASE + 0)
LIVEUPDATE_IOCTL_FD_UNPRESERVE: Final = _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_BASE + 1)
LIVEUPDATE_IOCTL_FD_RESTORE: Final = _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_BASE + 2)
LIVEUPDATE_IOCTL_GET_STATE: Final = _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_BASE + 3)
LIVEUPDATE_IOCTL_SET_EVENT: Final = _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_BASE + 4)

# The device's dispatcher table, in nr order starting at LIVEUPDATE_CMD_BASE.
DEVICE_OPS: Final = (
    IoctlOp(
        "FD_PRESERVE",
        LIVEUPDATE_IOCTL_FD_PRESERVE,
        liveupdate_ioctl_fd_preserve,
        min_size_of(liveupdate_ioctl_fd_preserve, "token"),
    ),
    IoctlOp(
        "FD_UNPRESERVE",
        LIVEUPDATE_IOCTL_FD_UNPRESERVE,
        liveupdate_ioctl_fd_unpreserve,
        min_size_of(liveupdate_ioctl_fd_unpreserve, "token"),
    ),
    IoctlOp(
        "FD_RESTORE",
        LIVEUPDATE_IOCTL_FD_RESTORE,
        liveupdate_ioctl_fd_restore,
        min_size_of(liveupdate_ioctl_fd_restore, "token"),
    ),
    IoctlOp(
        "GET_STATE",
        LIVEUPDATE_IOCTL_GET_STATE,
        liveupdate_ioctl_get_state,
        min_size_of(liveupdate_ioctl_get_state, "state"),
    ),
    IoctlOp(
        "SET_EVENT",
        LIVEUPDATE_IOCTL_SET_EVENT,
        liveupdate_ioctl_set_event,
        min_size_of(liveupdate_ioctl_set_event, "event"),
    ),
)

STATE_STRINGS: Final = {
    liveupdate_state.LIVEUPDATE_STATE_UNDEFINED: "undefined",
    liveupdate_state.LIVEUPDATE_STATE_NORMAL: "normal",
    liveupdate_state.LIVEUPDATE_STATE_PREPARED: "prepared",
    liveupdate_state.LIVEUPDATE_STATE_FROZEN: "frozen",
    liveupdate_state.LIVEUPDATE_STATE_UPDATED: "updated",
}
