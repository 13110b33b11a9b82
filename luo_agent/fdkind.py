"""What kind of file an fd refers to, whether the kernel can preserve it, and closing fds.

The kernel's memfd handler accepts shmem-backed files with no links (``memfd_luo``
``can_preserve``): memfds, and also O_TMPFILE files on a tmpfs.  The agent checks this when a
client hands an fd in, so the client gets a clear error at once instead of an ENOENT at prepare
time.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import stat
from typing import Final

from .errors import InvalidArgument

TMPFS_MAGIC: Final = 0x01021994
HUGETLBFS_MAGIC: Final = 0x958458F6


class _statfs(ctypes.Structure):
    # struct statfs on 64-bit Linux: f_type is the first long.
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 112)]


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def fs_magic(fd: int) -> int:
    buf = _statfs()
    if _libc.fstatfs(fd, ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(buf.f_type) & 0xFFFFFFFF


def describe(fd: int) -> str:
    """A short human description of an fd for error messages: 'memfd', 'regular file', 'pipe', …"""
    try:
        st = os.fstat(fd)
    except OSError:
        return "closed fd"
    mode = st.st_mode
    if stat.S_ISREG(mode):
        magic = fs_magic(fd)
        if magic == TMPFS_MAGIC and st.st_nlink == 0:
            return "memfd"
        if magic == HUGETLBFS_MAGIC:
            return "hugetlb memfd"
        return "regular file"
    for test, name in (
        (stat.S_ISFIFO, "pipe"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISDIR, "directory"),
    ):
        if test(mode):
            return name
    return "unknown file type"


def check_preservable(fd: int) -> None:
    """Raise InvalidArgument unless the kernel's LUO handlers accept ``fd`` (a memfd)."""
    kind = describe(fd)
    if kind != "memfd":
        raise InvalidArgument(f"only memfds can be preserved by this kernel, got a {kind}")


def close_fds(*fds: int) -> None:
    """Close each fd once, ignoring -1 (no fd) and errors: ``LoadKernel(0, 0)`` names one fd
    twice, and a second close could hit a reused number."""
    for fd in dict.fromkeys(fds):
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
