"""``EmulatedSyscalls``: the ``Syscalls`` seam, answered by the emulated kernel's server.

Machine down: ``open`` of the device raises OSError(ENOENT) (a kernel without LUO);
``kexec_file_load``/``reboot_kexec`` raise OSError(ENOENT) too.  An ioctl on a socket whose
server has gone (after a kexec or power-off) raises OSError(EIO).  Threads may share an fd, as
with the kernel: each ioctl's request and reply are one round trip, never interleaved.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
import termios
import threading
from pathlib import Path
from typing import Any

from .protocol import (
    DEVICE_SOCKET_NAME,
    IOCTL_REPLY,
    IOCTL_REQUEST,
    MAX_IOCTL_BUFFER,
    OPEN_REPLY,
    OPEN_REQUEST,
    RECV_SIZE,
    SESSION_ADDRESS_PREFIX,
    Layout,
    connect_seqpacket,
    decode_json,
    encode_json,
    recv_with_fds,
    send_with_fds,
)

# do_vfs_ioctl (fs/ioctl.c) answers these for every file before a driver's ioctl sees them; on
# the emulator's sockets the host kernel does exactly the same to the caller's fd.
_VFS_FD_FLAG_IOCTLS = frozenset({termios.FIOCLEX, termios.FIONCLEX})
_DOWN_ERRORS = (FileNotFoundError, ConnectionRefusedError)
_GONE_ERRORS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


def _oserror(code: int, detail: str = "") -> OSError:
    text = os.strerror(code)
    return OSError(code, f"{text} ({detail})" if detail else text)


def _is_emulator_peer(peer: object) -> bool:
    if isinstance(peer, bytes):
        return peer.startswith(SESSION_ADDRESS_PREFIX)
    return isinstance(peer, str) and peer.endswith("/" + DEVICE_SOCKET_NAME)


class EmulatedSyscalls:
    """Same calls, same request numbers, same bytes as ``RealSyscalls``; every fd it returns is
    O_CLOEXEC."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).absolute()
        self.layout = Layout(self.root)
        # The server answers one request at a time and none waits for another: one lock for
        # every round trip of this process is enough for each reply to reach its caller.
        self._round_trip = threading.Lock()

    def path(self, path: str) -> str:
        return str(self.root) + path

    def open(self, path: str, flags: int) -> int:
        if Path(path) != self.layout.device:
            return os.open(path, flags)
        try:
            sock = connect_seqpacket(self.layout.device)
        except _DOWN_ERRORS as exc:
            raise _oserror(errno.ENOENT, "emulated machine is down") from exc
        try:
            sock.send(OPEN_REQUEST.pack(flags))
            reply = sock.recv(OPEN_REPLY.size)
            if len(reply) < OPEN_REPLY.size:
                raise _oserror(errno.ENOENT, "emulated machine went down")
            (code,) = OPEN_REPLY.unpack(reply)
            if code:
                raise _oserror(code)
        except _GONE_ERRORS as exc:
            sock.close()
            raise _oserror(errno.ENOENT, "emulated machine went down") from exc
        except BaseException:
            sock.close()
            raise
        return sock.detach()

    def ioctl(self, fd: int, request: int, buf: bytearray) -> int:
        if request & 0xFFFFFFFF in _VFS_FD_FLAG_IOCTLS:
            return int(fcntl.ioctl(fd, request & 0xFFFFFFFF, 0))
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            if exc.errno == errno.EBADF:
                raise
            raise _oserror(errno.ENOTTY, "not an emulated LUO fd") from exc
        try:
            return self._ioctl(sock, request, buf)
        finally:
            sock.detach()

    def _ioctl(self, sock: socket.socket, request: int, buf: bytearray) -> int:
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET:
            raise _oserror(errno.ENOTTY, "not an emulated LUO fd")
        try:
            peer = sock.getpeername()
        except OSError as exc:
            if exc.errno == errno.ENOTCONN:
                raise _oserror(errno.EIO, "emulated machine is down") from exc
            raise
        if not _is_emulator_peer(peer):
            raise _oserror(errno.ENOTTY, "not an emulated LUO fd")
        if len(buf) > MAX_IOCTL_BUFFER:
            raise _oserror(errno.EFAULT, "buffer larger than the emulator accepts")
        # The kernel's ioctl cmd is an unsigned int.
        message = IOCTL_REQUEST.pack(os.getpid(), request & 0xFFFFFFFF) + bytes(buf)
        try:
            with self._round_trip:
                sock.send(message)
                data, fds = recv_with_fds(sock, RECV_SIZE, max_fds=1)
        except _GONE_ERRORS as exc:
            raise _oserror(errno.EIO, "emulated machine is down") from exc
        if len(data) < IOCTL_REPLY.size:
            for extra in fds:
                os.close(extra)
            raise _oserror(errno.EIO, "emulated machine is down")
        rc, fd_offset, out_len = IOCTL_REPLY.unpack_from(data)
        rc = int(rc)
        if rc < 0:
            for extra in fds:
                os.close(extra)
            raise _oserror(-rc)
        if fd_offset >= 0 and not fds:
            # The fd was dropped on receipt (RLIMIT_NOFILE): like get_unused_fd_flags() failing.
            # The server sees the dropped socket's EOF and undoes the session on its own.
            raise _oserror(errno.EMFILE)
        out = data[IOCTL_REPLY.size : IOCTL_REPLY.size + out_len]
        buf[: len(out)] = out
        for new_fd in fds:
            if fd_offset >= 0 and fd_offset + 4 <= len(out):
                struct.pack_into("<i", buf, fd_offset, new_fd)
                fd_offset = -1
            else:
                os.close(new_fd)
        return rc

    def close(self, fd: int) -> None:
        os.close(fd)

    # --- control socket ---------------------------------------------------------------------
    def control(self, request: dict[str, Any], fds: list[int] | None = None) -> Any:
        """One control request; OSError(errno) on failure, OSError(ENOENT) if the machine is
        down."""
        try:
            sock = connect_seqpacket(self.layout.control)
        except _DOWN_ERRORS as exc:
            raise _oserror(errno.ENOENT, "emulated machine is down") from exc
        with sock:
            try:
                send_with_fds(sock, encode_json(request), fds or [])
                raw = sock.recv(1 << 24)
            except _GONE_ERRORS as exc:
                raise _oserror(errno.EIO, "emulated machine went down") from exc
            if not raw:
                raise _oserror(errno.EIO, "emulated machine went down")
            reply = decode_json(raw)
            if not reply.get("ok"):
                raise _oserror(int(reply.get("errno", errno.EIO)), str(reply.get("message", "")))
            if request.get("op") == "reboot":
                # Returns once the machine is down: the server closes this socket last.
                while sock.recv(1):
                    pass
            return reply.get("result")

    def kexec_file_load(self, kernel_fd: int, initrd_fd: int, cmdline: str, flags: int) -> None:
        from luo_agent.kernel.syscalls import KEXEC_FILE_UNLOAD

        request: dict[str, Any] = {"op": "kexec_file_load", "cmdline": cmdline, "flags": flags}
        fds: list[int] = []
        if not flags & KEXEC_FILE_UNLOAD:
            os.fstat(kernel_fd)  # EBADF, as the syscall reports it
            fds.append(kernel_fd)
            if initrd_fd >= 0:
                os.fstat(initrd_fd)
                fds.append(initrd_fd)
                request["initrd"] = True
        self.control(request, fds)

    def reboot_kexec(self) -> None:
        self.control({"op": "reboot"})

    def fd_link(self, fd: int) -> str:
        """``readlink(/proc/self/fd/<fd>)`` as the emulated machine's processes would see it
        (session fds are sockets here, ``anon_inode:[luo_session] <name>`` on Linux)."""
        return str(self.control({"op": "fd_link"}, [fd]))
