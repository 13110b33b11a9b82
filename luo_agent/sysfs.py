"""Watch a kernel state file: the LUO sysfs ``state`` attribute, or the emulator's copy of it.

``watch_state(path)`` is an async iterator of the file's text (one trailing newline stripped): the
current value first, then each change.  Two notification mechanisms sit behind it, chosen by the
filesystem the path lives on; neither polls on a timer and neither uses a thread.

**Pseudo-filesystem attributes** (sysfs, procfs, cgroup2): the kernel announces a change as
EPOLLPRI|EPOLLERR, while the fd always looks readable (EPOLLIN), so ``loop.add_reader`` on the
attribute itself would spin.  The protocol (Documentation/filesystems/sysfs.rst, fs/kernfs/file.c,
kernel-abi.md §5.4): open, read once (for kernfs the read arms the notification), wait for
EPOLLPRI, then ``lseek(0)`` and read again.  The attribute fd sits in a private ``select.epoll``
registered for EPOLLPRI|EPOLLERR only; the loop watches that epoll fd, which becomes readable
exactly when the attribute has news.  Kernel files that share this protocol:

* sysfs attributes a driver notifies with ``sysfs_notify()``: ``/sys/kernel/liveupdate/state``
  (LUO G1-G3), md's ``/sys/block/mdX/md/array_state`` and ``sync_action``;
* cgroup v2 ``cgroup.events``, ``memory.events`` (``kernfs_notify``, same kernfs poll hook);
* ``/proc/self/mounts`` and ``/proc/self/mountinfo`` (``mounts_poll``: any change of the mount
  table of the reader's namespace);
* ``/proc/sys/kernel/hostname`` and ``domainname`` (``proc_sys_poll``; the wait queue is shared by
  all UTS namespaces, so a watcher in another namespace wakes and re-reads an unchanged value,
  which is not reported);
* ``/proc/mdstat`` and ``/proc/swaps``.

The test suite proves the mechanism on ``/proc/self/mounts`` and ``/proc/sys/kernel/hostname``
(tests/unit/test_sysfs.py), since no machine here has the LUO sysfs file.

**Regular files replaced by rename** (the emulated kernel publishes ``state`` under its root with
write-temp-then-rename): inotify on the *directory* for IN_MOVED_TO|IN_CLOSE_WRITE|IN_CREATE, and a
fresh read of the file on every event for its name.  A watch on the file itself would die with
the first replaced inode.  If the directory goes away the iteration ends.

Every wake re-reads the file and reports the value only if it differs from the last one reported:
spurious wake-ups cost a read, never a duplicate value.  Like sysfs notifications themselves,
changes faster than the reader coalesce (the reader sees the latest value).
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import ctypes.util
import errno
import os
import select
import struct
from enum import StrEnum
from types import TracebackType
from typing import Final, Protocol, Self

# statfs(2) f_type values of the pseudo-filesystems whose attributes use the POLLPRI protocol.
SYSFS_MAGIC: Final = 0x62656572
PROC_SUPER_MAGIC: Final = 0x9FA0
CGROUP2_SUPER_MAGIC: Final = 0x63677270
_POLLPRI_FILESYSTEMS: Final = frozenset({SYSFS_MAGIC, PROC_SUPER_MAGIC, CGROUP2_SUPER_MAGIC})

# <sys/inotify.h>
IN_CLOSE_WRITE: Final = 0x00000008
IN_MOVED_TO: Final = 0x00000080
IN_CREATE: Final = 0x00000100
IN_DELETE_SELF: Final = 0x00000400
IN_MOVE_SELF: Final = 0x00000800
IN_Q_OVERFLOW: Final = 0x00004000
IN_IGNORED: Final = 0x00008000
IN_ONLYDIR: Final = 0x01000000
IN_NONBLOCK: Final = os.O_NONBLOCK
IN_CLOEXEC: Final = os.O_CLOEXEC
_INOTIFY_EVENT: Final = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name
_WATCH_MASK: Final = IN_MOVED_TO | IN_CLOSE_WRITE | IN_CREATE | IN_DELETE_SELF | IN_MOVE_SELF
_READ_CHUNK: Final = 1 << 16

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class Mechanism(StrEnum):
    POLLPRI = "pollpri"  # pseudo-filesystem attribute: private epoll for EPOLLPRI, seek + re-read
    INOTIFY = "inotify"  # regular file replaced by rename: inotify on its directory


def _oserror(what: str, path: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}", path)


def filesystem_type(path: str) -> int:
    """statfs(2) ``f_type`` of the filesystem holding ``path``."""
    # struct statfs begins with f_type (a long) on every Linux ABI; 256 bytes covers the rest.
    buf = ctypes.create_string_buffer(256)
    if _libc.statfs(os.fsencode(path), buf) != 0:
        raise _oserror("statfs", path)
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def mechanism_for(path: str | os.PathLike[str]) -> Mechanism:
    """How changes of ``path`` are announced, judged by the filesystem it lives on."""
    if filesystem_type(os.fspath(path)) in _POLLPRI_FILESYSTEMS:
        return Mechanism.POLLPRI
    return Mechanism.INOTIFY


def _text(raw: bytes) -> str:
    return raw.decode(errors="replace").removesuffix("\n")


class _Source(Protocol):
    initial: str
    ended: bool

    def fileno(self) -> int: ...

    def read_after_wake(self) -> str | None:
        """Consume the pending notifications; the file's value, or None if nothing to report."""
        ...

    def close(self) -> None: ...


class _PollPriSource:
    """The sysfs poll protocol on a private epoll (see the module docstring)."""

    def __init__(self, path: str) -> None:
        self.ended = False
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.initial = self._read()  # arms the notification (kernfs)
            self._epoll = select.epoll(1)
        except BaseException:
            os.close(self._fd)
            raise
        try:
            # A change between the read above and this registration is still reported: ADD
            # polls the file once and queues the event if the kernel already has news.
            self._epoll.register(self._fd, select.EPOLLPRI | select.EPOLLERR)
        except BaseException:
            self.close()
            raise

    def fileno(self) -> int:
        return self._epoll.fileno()

    def _read(self) -> str:
        os.lseek(self._fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(self._fd, _READ_CHUNK):
            chunks.append(chunk)
        return _text(b"".join(chunks))

    def read_after_wake(self) -> str:
        # The outer readiness check may already have consumed the event (procfs poll hooks reset
        # on report), so the result is not trusted: any wake means "re-read".
        self._epoll.poll(0)
        return self._read()

    def close(self) -> None:
        if not self._epoll.closed:
            self._epoll.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _InotifySource:
    """inotify on the directory of a file that is replaced by rename."""

    def __init__(self, path: str) -> None:
        self.ended = False
        self._path = path
        directory, name = os.path.split(os.path.abspath(path))
        self._name = os.fsencode(name)
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            raise _oserror("inotify_init1", path)
        self._fd: int = fd
        try:
            if _libc.inotify_add_watch(fd, os.fsencode(directory), _WATCH_MASK | IN_ONLYDIR) < 0:
                raise _oserror("inotify_add_watch", directory)
            # Read after the watch exists, so a rename in between is not lost.
            initial = self._read()
            if initial is None:
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
            self.initial = initial
        except BaseException:
            self.close()
            raise

    def fileno(self) -> int:
        return self._fd

    def _read(self) -> str | None:
        try:
            with open(self._path, "rb") as f:
                return _text(f.read())
        except FileNotFoundError:
            return None  # between an unlink and the next rename: nothing to report yet

    def read_after_wake(self) -> str | None:
        relevant = False
        while True:
            try:
                data = os.read(self._fd, _READ_CHUNK)
            except BlockingIOError:
                break
            offset = 0
            while offset < len(data):
                _wd, mask, _cookie, length = _INOTIFY_EVENT.unpack_from(data, offset)
                offset += _INOTIFY_EVENT.size
                name = data[offset : offset + length].rstrip(b"\0")
                offset += length
                if mask & (IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF):
                    self.ended = True
                elif mask & IN_Q_OVERFLOW or name == self._name:
                    relevant = True
        return self._read() if relevant and not self.ended else None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class StateWatcher:
    """The async iterator behind ``watch_state``.  Use it as an async context manager (or call
    ``close``) so its fds are released; ``close`` also ends a pending ``async for``.

    Cancelling a task waiting in ``async for`` leaves the watcher usable: notifications keep being
    collected until ``close``.  A read error ends the iteration by raising it."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.mechanism = mechanism_for(self.path)
        self._source: _Source = (
            _PollPriSource(self.path)
            if self.mechanism is Mechanism.POLLPRI
            else _InotifySource(self.path)
        )
        self._pending: collections.deque[str] = collections.deque([self._source.initial])
        self._last = self._source.initial
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._error: OSError | None = None
        self._closed = False

    def _on_readable(self) -> None:
        try:
            value = self._source.read_after_wake()
        except OSError as exc:
            self._error = exc
            self.close()
            return
        if self._source.ended:
            self.close()
            return
        if value is not None and value != self._last:
            self._last = value
            self._pending.append(value)
            self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> str:
        while True:
            if self._pending and not self._closed:
                return self._pending.popleft()
            if self._closed:
                if self._error is not None:
                    error, self._error = self._error, None
                    raise error
                raise StopAsyncIteration
            loop = asyncio.get_running_loop()
            if self._loop is None:
                self._loop = loop
                loop.add_reader(self._source.fileno(), self._on_readable)
            self._waiter = loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._source.fileno())
        self._source.close()
        self._wake()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def watch_state(path: str | os.PathLike[str]) -> StateWatcher:
    """Watch ``path`` (see the module docstring).  Raises OSError (FileNotFoundError) at once if
    it cannot be opened."""
    return StateWatcher(path)
