"""The kernel server's control socket (``root/.luo-emu/control``): the machine-level operations
that are not ioctls of /dev/liveupdate — kexec_file_load, reboot(KEXEC), fault injection,
inspect and ``readlink`` of a passed fd.  One JSON request and one JSON reply per message."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import socket
import stat
from typing import TYPE_CHECKING, Any

from luo_agent.kernel.syscalls import KEXEC_FILE_UNLOAD

from .dispatch import Errno
from .handover import BlobSink, write_image
from .protocol import CONTROL_RECV_SIZE, decode_json, encode_json, recv_with_fds

if TYPE_CHECKING:
    from .server import Conn, Server

log = logging.getLogger("luo_emu.server")

CONTROL_OPS = ("open", "reboot", "kexec_file_load")


def handle_control(server: Server, conn: Conn) -> None:
    if server.log_buffer is not None:
        # What happened before a control request is in the log when it is answered: a
        # power-off pings first, then kills the server.
        server.log_buffer.flush()
    try:
        data, fds = recv_with_fds(conn.sock, CONTROL_RECV_SIZE)
    except OSError:
        data, fds = b"", []
    if not data:
        server.close(conn)
        return
    try:
        request = decode_json(data)
        op = request.get("op")
        if op == "reboot":
            _reboot(server, conn)
            return
        reply: dict[str, Any] = {"ok": True, "result": _control_op(server, op, request, fds)}
    except Errno as exc:
        reply = {"ok": False, "errno": exc.code, "message": exc.why or str(exc)}
    except (ValueError, KeyError, TypeError) as exc:
        reply = {"ok": False, "errno": errno.EINVAL, "message": str(exc)}
    finally:
        for fd in fds:
            os.close(fd)
    with contextlib.suppress(OSError):
        conn.sock.send(encode_json(reply))


def _control_op(server: Server, op: object, request: dict[str, Any], fds: list[int]) -> Any:
    kernel = server.kernel
    match op:
        case "ping":
            return {"pid": os.getpid(), "abi": server.abi, "profile": kernel.profile}
        case "inspect":
            server.reap_all()
            return server.inspect()
        case "inject_fault":
            name, code, count = request["name"], int(request["errno"]), int(request["count"])
            if name not in {*CONTROL_OPS, *kernel.fault_names()}:
                raise ValueError(f"unknown fault op {name!r} for {server.abi}")
            kernel.faults.arm(name, code, count)
            log.info(
                "fault armed: next %d x %s -> %s", count, name, errno.errorcode.get(code, code)
            )
            return None
        case "kexec_file_load":
            _kexec_file_load(server, request, fds)
            return None
        case "fd_link":
            return _fd_link(server, fds)
    raise ValueError(f"unknown control op {op!r}")


def _kexec_file_load(server: Server, request: dict[str, Any], fds: list[int]) -> None:
    server.kernel.faults.check("kexec_file_load")
    flags = int(request["flags"])
    if flags & KEXEC_FILE_UNLOAD:
        server.kexec_image = None
        server.publish_kexec_loaded()
        log.info("kexec image unloaded")
        return
    has_initrd = bool(request.get("initrd"))
    if len(fds) != (2 if has_initrd else 1):
        raise Errno(errno.EBADF, "kernel/initrd fd missing")
    kernel_st = os.fstat(fds[0])
    if not stat.S_ISREG(kernel_st.st_mode) or kernel_st.st_size == 0:
        raise Errno(errno.EINVAL, "kernel image must be a non-empty regular file")
    initrd_size = -1
    if has_initrd:
        initrd_st = os.fstat(fds[1])
        if not stat.S_ISREG(initrd_st.st_mode):
            raise Errno(errno.EINVAL, "initrd must be a regular file")
        initrd_size = initrd_st.st_size
    hasher = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fds[0], 1 << 20, offset):
        hasher.update(chunk)
        offset += len(chunk)
    cmdline = str(request.get("cmdline", ""))
    server.kexec_image = {
        "size": offset,
        "sha256": hasher.hexdigest(),
        "cmdline": cmdline,
        "initrd_size": initrd_size,
    }
    server.publish_kexec_loaded()
    log.info("kexec image loaded: %d bytes, cmdline %r", offset, cmdline)


def _fd_link(server: Server, fds: list[int]) -> str:
    """What ``readlink(/proc/self/fd/N)`` shows for a passed fd: a session channel of this
    machine reads like the real anon inode, ``anon_inode:[luo_session] <name>``."""
    if len(fds) != 1:
        raise Errno(errno.EBADF, "one fd expected")
    with contextlib.suppress(OSError):
        peer = socket.socket(fileno=os.dup(fds[0]))
        with peer:
            address = peer.getpeername()
        session = server.session_bound_to(address)
        if session is not None:
            return "anon_inode:[luo_session] " + session.display_name()
    return os.readlink(f"/proc/self/fd/{fds[0]}")


def _reboot(server: Server, conn: Conn) -> None:
    """reboot(LINUX_REBOOT_CMD_KEXEC): carry what the generation carries, write the image,
    go down.  Any failure before the image is renamed into place leaves everything as it
    was and is returned to the caller."""
    kernel = server.kernel
    try:
        kernel.faults.check("reboot")
        image = server.kexec_image
        if image is None:
            raise Errno(errno.EINVAL, "no kexec image loaded")
        server.reap_all()  # closes that happened before this call count (last fput)
        carried = kernel.carries_luo_data()
        count = server.liveupdate_count + 1 if carried else 0

        def build(sink: BlobSink) -> dict[str, Any]:
            return {
                "generation": server.abi,
                "cmdline": image["cmdline"],
                "liveupdate_count": count,
                "kernel_image": image,
                "luo": kernel.serialize(sink),
            }

        try:
            write_image(server.layout, server.abi, build)
        except OSError as exc:
            log.error("kexec: writing the handover image failed: %s", exc)
            raise Errno(exc.errno or errno.EIO, str(exc)) from exc
    except Errno as exc:
        log.info("reboot(KEXEC) failed: %s", exc)
        with contextlib.suppress(OSError):
            conn.sock.send(encode_json({"ok": False, "errno": exc.code, "message": exc.why}))
        return
    log.info("kexec: handover image written, going down")
    server.go_down(keep=conn)
    with contextlib.suppress(OSError):
        conn.sock.send(encode_json({"ok": True, "result": None}))
    server.close(conn)
