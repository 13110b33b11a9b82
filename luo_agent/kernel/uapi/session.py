"""G5/G6: the session ABI merged in Linux 6.19, plus the post-6.19 additions (kernel-abi.md §7, §9).

``/dev/liveupdate`` creates and retrieves named sessions; preservation, retrieval and finish are
ioctls on the session fds.  No global state.
"""

from __future__ import annotations

import ctypes
from typing import Final

from . import _IO, LIVEUPDATE_IOCTL_TYPE, IoctlOp, min_size_of

LIVEUPDATE_SESSION_NAME_LENGTH: Final = 64  # including the NUL: at most 63 visible bytes
LIVEUPDATE_CMD_BASE: Final = 0x00
LIVEUPDATE_CMD_SESSION_BASE: Final = 0x40


class liveupdate_ioctl_create_session(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_uint32),
        ("fd", ctypes.c_int32),  # out, O_CLOEXEC
        ("name", ctypes.c_uint8 * LIVEUPDATE_SESSION_NAME_LENGTH),
    ]


class liveupdate_ioctl_retrieve_session(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_uint32),
        ("fd", ctypes.c_int32),  # out, O_CLOEXEC
        ("name", ctypes.c_uint8 * LIVEUPDATE_SESSION_NAME_LENGTH),
    ]


class liveupdate_session_preserve_fd(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint32), ("fd", ctypes.c_int32), ("token", ctypes.c_uint64)]


class liveupdate_session_retrieve_fd(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint32), ("fd", ctypes.c_int32), ("token", ctypes.c_uint64)]


class liveupdate_session_finish(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint32), ("reserved", ctypes.c_uint32)]


class liveupdate_session_get_name(ctypes.Structure):
    """G6 only (``include/uapi/linux/liveupdate.h`` of Linux 7.2)."""

    _fields_ = [
        ("size", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
        ("name", ctypes.c_uint8 * LIVEUPDATE_SESSION_NAME_LENGTH),
    ]


LIVEUPDATE_IOCTL_CREATE_SESSION: Final = _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_BASE + 0)
LIVEUPDATE_IOCTL_RETRIEVE_SESSION: Final = _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_BASE + 1)
LIVEUPDATE_SESSION_PRESERVE_FD: Final = _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_SESSION_BASE + 0)
LIVEUPDATE_SESSION_RETRIEVE_FD: Final = _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_SESSION_BASE + 1)
LIVEUPDATE_SESSION_FINISH: Final = _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_SESSION_BASE + 2)
LIVEUPDATE_SESSION_GET_NAME: Final = _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_SESSION_BASE + 3)

DEVICE_OPS: Final = (
    IoctlOp(
        "CREATE_SESSION",
        LIVEUPDATE_IOCTL_CREATE_SESSION,
        liveupdate_ioctl_create_session,
        min_size_of(liveupdate_ioctl_create_session, "name"),
    ),
    IoctlOp(
        "RETRIEVE_SESSION",
        LIVEUPDATE_IOCTL_RETRIEVE_SESSION,
        liveupdate_ioctl_retrieve_session,
        min_size_of(liveupdate_ioctl_retrieve_session, "name"),
    ),
)

# 6.19 (G5) session-fd table: three ops.
SESSION_OPS_G5: Final = (
    IoctlOp(
        "PRESERVE_FD",
        LIVEUPDATE_SESSION_PRESERVE_FD,
        liveupdate_session_preserve_fd,
        min_size_of(liveupdate_session_preserve_fd, "token"),
    ),
    IoctlOp(
        "RETRIEVE_FD",
        LIVEUPDATE_SESSION_RETRIEVE_FD,
        liveupdate_session_retrieve_fd,
        min_size_of(liveupdate_session_retrieve_fd, "token"),
    ),
    IoctlOp(
        "FINISH",
        LIVEUPDATE_SESSION_FINISH,
        liveupdate_session_finish,
        min_size_of(liveupdate_session_finish, "reserved"),
    ),
)

# G6 (Linux 7.2, luo_session.c luo_session_ioctl_ops[]) appends GET_NAME with its own struct:
# ksize 72, min_size offsetofend(name) = 72.
SESSION_OPS_G6: Final = (
    *SESSION_OPS_G5,
    IoctlOp(
        "GET_NAME",
        LIVEUPDATE_SESSION_GET_NAME,
        liveupdate_session_get_name,
        min_size_of(liveupdate_session_get_name, "name"),
    ),
)
