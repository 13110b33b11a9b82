"""The memfd file handler (``mm/memfd_luo.c`` as seen from userspace) and taking fds from callers.

The server holds the caller's own open file description (``pidfd_getfd``), so the file position
and every write up to the kexec are what gets carried, exactly like the kernel's file reference.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import itertools
import logging
import os
import resource
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final

from luo_agent.errors import HandoverCorrupt
from luo_agent.fdkind import TMPFS_MAGIC, fs_magic

from .handover import BlobSink, CarriedFile, Image

log = logging.getLogger("luo_emu.memfd")

_SYS_pidfd_getfd: Final = {"x86_64": 438, "aarch64": 438, "riscv64": 438}
_CHUNK: Final = 1 << 20
_MFD_EXEC: Final = 0x0010  # <linux/memfd.h>, Linux 6.3+
# From this size on a kexec holds a memfd in place rather than copying it through the image
# (smaller ones cost nothing to copy and keep the image self-contained).
HOLD_MIN_BYTES: Final = 1 << 20

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def take_fd(pid: int, target_fd: int) -> int:
    """The caller's fd ``target_fd`` as a new O_CLOEXEC fd in this process (same open file).

    A dead caller or a closed fd is EBADF, which is what ``fget()`` reports to the caller.
    """
    if target_fd < 0:
        raise OSError(errno.EBADF, "negative fd")
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError as exc:
        raise OSError(errno.EBADF, "caller has exited") from exc
    try:
        nr = _SYS_pidfd_getfd[os.uname().machine]
        got = int(_libc.syscall(nr, pidfd, target_fd, 0))
        if got < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return got
    finally:
        os.close(pidfd)


def caller_has_free_fd(pid: int) -> bool:
    """Would ``get_unused_fd_flags()`` succeed in process ``pid``: is its lowest free fd below
    its RLIMIT_NOFILE?  Unknown (the caller raced away) counts as yes: delivery then decides."""
    try:
        soft, _hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        used = {int(name) for name in os.listdir(f"/proc/{pid}/fd")}
    except (OSError, ValueError):
        return True
    lowest = next(n for n in itertools.count() if n not in used)
    return soft == resource.RLIM_INFINITY or lowest < soft


def can_preserve(fd: int) -> bool:
    """memfd_luo's ``can_preserve``: a shmem file with no links.  Hugetlb memfds (hugetlbfs),
    pipes, sockets, device nodes and linked files are refused."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 0:
        return False
    return fs_magic(fd) == TMPFS_MAGIC


def file_identity(fd: int) -> tuple[int, int]:
    """What "the same file" means for G6's double-preservation check: the inode."""
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino)


@dataclass(eq=False, slots=True)
class PreservedFile:
    """One file LUO holds a reference on (outgoing), or one carried into this boot (incoming).

    ``frozen_size`` is the size at PRESERVE: the kernel refuses resizes of a preserved memfd; the
    emulator cannot stop a resize, so it carries exactly this size (truncated or zero-extended).
    ``seals`` are F_GET_SEALS at PRESERVE (7.2 memfd_luo_preserve records them there, once).
    """

    token: int
    fd: int
    frozen_size: int
    identity: tuple[int, int] = (0, 0)
    seals: int = 0
    retrieved: bool = False
    extra: dict[str, int] = field(default_factory=dict)

    def snapshot(self) -> dict[str, object]:
        try:
            size = os.fstat(self.fd).st_size
            pos = os.lseek(self.fd, 0, os.SEEK_CUR)
        except OSError:
            size, pos = -1, -1
        return {
            "token": self.token,
            "size": size,
            "frozen_size": self.frozen_size,
            "pos": pos,
            "retrieved": self.retrieved,
        }

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def preserve(pid: int, caller_fd: int, token: int) -> PreservedFile:
    """Take the caller's fd and check it with the memfd handler: EBADF, then ENOENT."""
    fd = take_fd(pid, caller_fd)
    try:
        if not can_preserve(fd):
            raise OSError(errno.ENOENT, "no file handler accepts this file")
        size = os.fstat(fd).st_size
        return PreservedFile(
            token=token,
            fd=fd,
            frozen_size=size,
            identity=file_identity(fd),
            seals=fcntl.fcntl(fd, fcntl.F_GET_SEALS),
        )
    except BaseException:
        os.close(fd)
        raise


def carry(pf: PreservedFile, sink: BlobSink, seals: int) -> CarriedFile:
    """What a kexec carries of ``pf``: its bytes as they are now, cut or zero-filled to the size
    frozen at PRESERVE, its position, and ``seals`` for the next boot's fresh memfd.

    A large file is held in place (the real kernel hands its pages over, no copy) when the next
    boot could not tell it from that fresh memfd: the same size, mode, owner and seals.  Its name
    and inode number stay the old ones (both show only in /proc).
    """
    current = os.fstat(pf.fd).st_size
    if current != pf.frozen_size:
        log.warning(
            "memfd token %#x: size changed from %d to %d after preservation "
            "(the kernel would have refused it); carrying %d bytes",
            pf.token,
            pf.frozen_size,
            current,
            pf.frozen_size,
        )
    pos = os.lseek(pf.fd, 0, os.SEEK_CUR)
    if current == pf.frozen_size >= HOLD_MIN_BYTES and _looks_fresh(pf.fd, seals):
        return CarriedFile(pf.token, pf.frozen_size, pos, 0, seals, held=sink.hold(pf.fd))
    offset, _length = sink.add(_frozen_chunks(pf.fd, pf.frozen_size, current))
    return CarriedFile(pf.token, pf.frozen_size, pos, offset, seals)


def _frozen_chunks(fd: int, size: int, current: int) -> Iterator[bytes]:
    offset = 0
    while offset < size:
        want = min(_CHUNK, size - offset)
        data = os.pread(fd, want, offset) if offset < current else b""
        yield data + bytes(want - len(data))
        offset += want


def _looks_fresh(fd: int, seals: int) -> bool:
    """Would ``fd`` pass for the memfd ``memfd_luo_retrieve`` makes, a fresh one of this process
    with ``seals`` added: its mode, owner and resulting seals (F_SEAL_EXEC's extra ones too)?"""
    fresh = _fresh_sealable_memfd()
    try:
        if seals:
            fcntl.fcntl(fresh, fcntl.F_ADD_SEALS, seals)
        want, got = os.fstat(fresh), os.fstat(fd)
        return (got.st_mode, got.st_uid, got.st_gid) == (
            want.st_mode,
            want.st_uid,
            want.st_gid,
        ) and fcntl.fcntl(fd, fcntl.F_GET_SEALS) == fcntl.fcntl(fresh, fcntl.F_GET_SEALS)
    finally:
        os.close(fresh)


def incoming_memfd(image: Image, cf: CarriedFile) -> int:
    """The next boot's memfd for ``cf``: a new open file on the held file, or a fresh memfd
    filled from the image."""
    if cf.held is None:
        return new_incoming_memfd(image.fd, image.blob_base + cf.offset, cf.size, cf.pos, cf.seals)
    want = image.held[cf.held]
    try:
        fd = take_fd(image.keeper, want.fd)
    except OSError as exc:
        raise HandoverCorrupt(
            f"handover image rejected: held file {cf.held} is gone ({exc.strerror}): "
            "its keeper exited"
        ) from exc
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino, st.st_size) != (want.dev, want.ino, cf.size):
            raise HandoverCorrupt(
                f"handover image rejected: held file {cf.held} is not the file it names"
            )
        # A new open file, as memfd_luo_retrieve's: not the old boot's position or flags.
        new = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
    finally:
        os.close(fd)
    os.lseek(new, cf.pos, os.SEEK_SET)
    return new


def _fresh_sealable_memfd() -> int:
    """``memfd_alloc_file("", MFD_ALLOW_SEALING)``: no seals, exec bits set (the kernel-internal
    call ignores vm.memfd_noexec; MFD_EXEC asks the host for the same)."""
    try:
        return os.memfd_create("", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING | _MFD_EXEC)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # a host kernel older than 6.3 has no MFD_EXEC
            raise
        return os.memfd_create("", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)


def new_incoming_memfd(
    source_fd: int, source_offset: int, size: int, pos: int, seals: int = 0
) -> int:
    """A fresh unnamed memfd (O_RDWR|O_LARGEFILE, O_CLOEXEC) holding ``size`` bytes copied from
    ``source_fd`` at ``source_offset``, positioned at ``pos``, with ``seals`` added
    (``memfd_luo_retrieve``: F_SEAL_EXEC on the fresh, executable inode also adds the write
    seals, exactly as the host's F_ADD_SEALS does)."""
    fd = _fresh_sealable_memfd()
    try:
        os.ftruncate(fd, size)
        offset = 0
        while offset < size:
            data = os.pread(source_fd, min(_CHUNK, size - offset), source_offset + offset)
            if not data:
                raise ValueError("handover data ends early")
            os.pwrite(fd, data, offset)
            offset += len(data)
        os.lseek(fd, pos, os.SEEK_SET)
        if seals:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    except BaseException:
        os.close(fd)
        raise
    return fd
