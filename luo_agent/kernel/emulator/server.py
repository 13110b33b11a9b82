"""The kernel server: one process per emulated boot, a single-threaded ``selectors`` loop.

Sockets it owns: the device node ``root/dev/liveupdate`` (one accepted connection = one open file
of /dev/liveupdate), one socketpair end per session fd, and the control socket
``root/.luo-emu/control`` (kexec_file_load, reboot, inspect, inject_fault; at the end).
A socket's EOF is the last fput of that file: the server sees it once every copy (dup, fork,
SCM_RIGHTS, process death) is gone.  The process around it (logging to
``root/.luo-emu/kernel.log``, the machine's dmesg; signals; the ready pipe): ``process.py``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import logging
import logging.handlers
import os
import selectors
import socket
import stat
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from luo_agent.errors import HandoverCorrupt
from luo_agent.kernel.syscalls import KEXEC_FILE_UNLOAD

from ..device import Abi
from .base import DeviceOpen, GenerationKernel
from .config import ABIS, read_config, write_atomic, write_config
from .dispatch import Errno, IoctlResult
from .g1 import RfcV2Kernel
from .g3 import V3Kernel
from .g5 import Session, SessionKernel
from .handover import BlobSink, read_image, write_image
from .protocol import (
    CONTROL_RECV_SIZE,
    DEFAULT_CMDLINE,
    IOCTL_REPLY,
    IOCTL_REQUEST,
    OPEN_REPLY,
    OPEN_REQUEST,
    RECV_SIZE,
    SESSION_ADDRESS_PREFIX,
    Layout,
    decode_json,
    encode_json,
    recv_with_fds,
    send_with_fds,
    short_socket_path,
)

log = logging.getLogger("luo_emu.server")

# How long the server must have been idle before it writes the kernel log's pending lines.
LOG_DELAY = 0.002


class ConnKind(StrEnum):
    DEVICE_LISTENER = "device-listener"
    CONTROL_LISTENER = "control-listener"
    DEVICE_PENDING = "device-pending"  # accepted, open() not answered yet
    DEVICE = "device"
    SESSION = "session"
    CONTROL = "control"


@dataclass(eq=False, slots=True)
class Conn:
    sock: socket.socket
    kind: ConnKind
    handle: DeviceOpen | Session | None = None
    closed: bool = False


def make_kernel(abi: str, host: Server, profile: str | None) -> GenerationKernel:
    match abi:
        case Abi.RFC_V2:
            return RfcV2Kernel(host, None)
        case Abi.V3:
            return V3Kernel(host, None)
        case Abi.SESSION:
            return SessionKernel(host, profile)
    raise ValueError(f"unknown abi {abi!r} (want one of {ABIS})")


class Server:
    def __init__(
        self, root: Path, log_buffer: logging.handlers.BufferingHandler | None = None
    ) -> None:
        self.layout = Layout(root)
        # The kernel log's lines wait here until the server is idle (see serve_forever).
        self.log_buffer = log_buffer
        config = read_config(self.layout)
        abi = config.get("abi")
        if not isinstance(abi, str):
            raise ValueError(f"{self.layout.machine_json}: no abi recorded")
        self.abi = abi
        self.kernel = make_kernel(abi, self, config.get("profile"))
        self.selector = selectors.DefaultSelector()
        self.conns: set[Conn] = set()
        self.by_handle: dict[int, Conn] = {}
        self.kexec_image: dict[str, Any] | None = None
        self.cmdline = DEFAULT_CMDLINE
        self.boot_count = 0
        self.liveupdate_count = 0
        self.running = False
        self._channel_ids = itertools.count(1)

    # --- boot -----------------------------------------------------------------------------------
    def boot(self) -> None:
        """Bring the machine up.  Raises HandoverCorrupt if a state-machine kernel must panic."""
        layout = self.layout
        for d in (layout.dev_dir, layout.root / "proc", layout.emu_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._load_handover()
        config = read_config(layout)
        self.boot_count = int(config.get("boot_count", 0)) + 1
        config["boot_count"] = self.boot_count
        write_config(layout, config)
        write_atomic(layout.proc_cmdline, self.cmdline + "\n")
        self.publish_kexec_loaded()
        if self.kernel.sysfs_state() is not None:
            layout.sysfs_dir.mkdir(parents=True, exist_ok=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                layout.sysfs_state.unlink()
        self.state_changed()
        self._listen(layout.control, ConnKind.CONTROL_LISTENER)
        self._listen(layout.device, ConnKind.DEVICE_LISTENER)
        write_atomic(layout.pid_file, f"{os.getpid()}\n")
        self.running = True
        log.info(
            "boot #%d: abi %s%s, cmdline %r, live-update number %d",
            self.boot_count,
            self.abi,
            f" profile {self.kernel.profile}" if self.kernel.profile else "",
            self.cmdline,
            self.liveupdate_count,
        )

    def _load_handover(self) -> None:
        layout = self.layout
        try:
            image = read_image(layout, self.abi)
            if image is None:
                return
            try:
                meta = image.meta
                if "luo" not in meta:
                    raise HandoverCorrupt("handover image rejected: no luo section")
                parsed = self.kernel.validate_handover(meta["luo"], image)
                self.kernel.load_handover(parsed, image)
            finally:
                image.close()
        except HandoverCorrupt as exc:
            with contextlib.suppress(FileNotFoundError):
                os.replace(layout.handover, layout.handover_rejected)
            log.error("%s (moved to %s)", exc, layout.handover_rejected)
            if isinstance(self.kernel, SessionKernel):
                # 6.19: LUO stays registered but every open of the device fails with EIO.
                self.kernel.handover_failed = True
                return
            log.critical("Kernel panic - not syncing: LUO: %s", exc)
            raise
        self.cmdline = meta["cmdline"]
        self.liveupdate_count = meta["liveupdate_count"]
        os.unlink(layout.handover)  # consumed: a later cold boot must not see it again
        log.info("handover image loaded and consumed")

    def _listen(self, path: Path, kind: ConnKind) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        address, dir_fd = short_socket_path(path)
        try:
            sock.bind(address)
        finally:
            os.close(dir_fd)
        sock.listen(socket.SOMAXCONN)
        self._register(Conn(sock, kind))

    # --- Host -------------------------------------------------------------------------------
    def open_session_channel(self, session: object) -> int:
        assert isinstance(session, Session)
        mine, theirs = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC
        )
        # The abstract address tells clients "this is an emulator session socket".
        mine.bind(SESSION_ADDRESS_PREFIX + f"{os.getpid()}/{next(self._channel_ids)}".encode())
        self._register(Conn(mine, ConnKind.SESSION, session))
        return theirs.detach()

    def reap_if_closed(self, handle: object) -> bool:
        conn = self.by_handle.get(id(handle))
        if conn is None or conn.closed:
            return True
        try:
            peeked = conn.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            peeked = b""
        if peeked:
            return False
        self.close(conn)
        return True

    def state_changed(self) -> None:
        state = self.kernel.sysfs_state()
        if state is not None:
            write_atomic(self.layout.sysfs_state, state + "\n")

    def session_bound_to(self, address: object) -> Session | None:
        """The open session whose channel has this socket address (see ``control._fd_link``)."""
        for conn in self.conns:
            mine = conn.kind is ConnKind.SESSION and not conn.closed
            if mine and conn.sock.getsockname() == address:
                assert isinstance(conn.handle, Session)
                return conn.handle
        return None

    def reap_all(self) -> None:
        for conn in list(self.conns):
            if conn.kind in (ConnKind.DEVICE, ConnKind.SESSION) and conn.handle is not None:
                self.reap_if_closed(conn.handle)

    # --- connections ------------------------------------------------------------------------
    def _register(self, conn: Conn) -> None:
        self.conns.add(conn)
        if conn.handle is not None:
            self.by_handle[id(conn.handle)] = conn
        self.selector.register(conn.sock, selectors.EVENT_READ, conn)

    def close(self, conn: Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        self.selector.unregister(conn.sock)
        conn.sock.close()
        self.conns.discard(conn)
        handle = conn.handle
        if handle is None:
            return
        self.by_handle.pop(id(handle), None)
        try:
            if isinstance(handle, DeviceOpen) and conn.kind is ConnKind.DEVICE:
                self.kernel.release_device(handle)
            elif isinstance(handle, Session):
                self.kernel.release_session(handle)
        except Exception:
            log.exception("release of %s failed", conn.kind)

    def serve_forever(self) -> None:
        while self.running:
            ready = self.selector.select(LOG_DELAY if self._log_pending() else None)
            if not ready and self.log_buffer is not None:
                # Idle: write the kernel log now.  A file write per line at once would sit on
                # the emulated syscalls' path, in the middle of a caller's series of ioctls.
                self.log_buffer.flush()
                continue
            for key, _events in ready:
                conn = key.data
                assert isinstance(conn, Conn)
                if conn.closed:
                    continue  # closed earlier in this batch (reaped)
                try:
                    self._readable(conn)
                except Exception:
                    log.exception("internal error on %s connection", conn.kind)
                    self.close(conn)
                if self._went_down():
                    break

    def _log_pending(self) -> bool:
        return self.log_buffer is not None and bool(self.log_buffer.buffer)

    def _went_down(self) -> bool:
        return not self.running

    def _readable(self, conn: Conn) -> None:
        match conn.kind:
            case ConnKind.DEVICE_LISTENER | ConnKind.CONTROL_LISTENER:
                sock, _addr = conn.sock.accept()  # accept4(SOCK_CLOEXEC): not inheritable
                kind = (
                    ConnKind.DEVICE_PENDING
                    if conn.kind is ConnKind.DEVICE_LISTENER
                    else ConnKind.CONTROL
                )
                self._register(Conn(sock, kind))
            case ConnKind.DEVICE_PENDING:
                self._open(conn)
            case ConnKind.DEVICE | ConnKind.SESSION:
                self._ioctl(conn)
            case ConnKind.CONTROL:
                handle_control(self, conn)

    def _open(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(OPEN_REQUEST.size)
        except OSError:
            data = b""
        if len(data) < OPEN_REQUEST.size:
            self.close(conn)
            return
        (flags,) = OPEN_REQUEST.unpack_from(data)
        try:
            dev = self.kernel.open_device(flags)
        except Errno as exc:
            log.debug("open: %s", exc)
            with contextlib.suppress(OSError):
                conn.sock.send(OPEN_REPLY.pack(exc.code))
            self.close(conn)
            return
        conn.kind = ConnKind.DEVICE
        conn.handle = dev
        self.by_handle[id(dev)] = conn
        try:
            conn.sock.send(OPEN_REPLY.pack(0))
        except OSError:
            self.close(conn)

    def _ioctl(self, conn: Conn) -> None:
        try:
            data, _anc, flags, _addr = conn.sock.recvmsg(RECV_SIZE)
        except OSError:
            data, flags = b"", 0
        if not data:
            self.close(conn)
            return
        result: IoctlResult | None = None
        code = 0
        if len(data) < IOCTL_REQUEST.size or flags & socket.MSG_TRUNC:
            code = errno.EFAULT
        else:
            pid, request = IOCTL_REQUEST.unpack_from(data)
            ubuf = data[IOCTL_REQUEST.size :]
            try:
                if isinstance(conn.handle, Session):
                    result = self.kernel.session_ioctl(conn.handle, pid, request, ubuf)
                else:
                    assert isinstance(conn.handle, DeviceOpen)
                    result = self.kernel.device_ioctl(conn.handle, pid, request, ubuf)
            except Errno as exc:
                code = exc.code
                log.debug("ioctl %#x from pid %d: %s", request, pid, exc)
            except OSError as exc:
                code = exc.errno or errno.EIO
                log.debug("ioctl %#x from pid %d: %s", request, pid, exc)
            except Exception:
                log.exception("ioctl %#x from pid %d: emulator bug", request, pid)
                code = errno.EIO
        if result is None:
            reply = IOCTL_REPLY.pack(-code, -1, 0)
            fds: list[int] = []
        else:
            reply = IOCTL_REPLY.pack(result.rc, result.fd_offset, len(result.out)) + result.out
            fds = [result.fd] if result.fd >= 0 else []
        try:
            send_with_fds(conn.sock, reply, fds)
        except OSError as exc:
            log.debug("reply lost (%s): caller is gone", exc)
        finally:
            if result is not None and result.close_after_send and result.fd >= 0:
                os.close(result.fd)

    def publish_kexec_loaded(self) -> None:
        self.layout.kexec_loaded.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.layout.kexec_loaded, "1\n" if self.kexec_image else "0\n")

    def go_down(self, keep: Conn | None = None) -> None:
        """Close every socket (clients see EOF), remove what only exists while running."""
        self.running = False
        for conn in list(self.conns):
            if conn is not keep:
                conn.handle = None  # no release callbacks: the machine is gone, not closing
                self.close(conn)
        self.kernel.shutdown()
        for path in (
            self.layout.device,
            self.layout.control,
            self.layout.sysfs_state,
            self.layout.kexec_loaded,
            self.layout.pid_file,
        ):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def inspect(self) -> dict[str, Any]:
        return {
            "generation": self.abi,
            "pid": os.getpid(),
            "boot_count": self.boot_count,
            "liveupdate_count": self.liveupdate_count,
            "cmdline": self.cmdline,
            "kexec_image": self.kexec_image,
            "faults": self.kernel.faults.snapshot(),
            "device_opens": sum(1 for c in self.conns if c.kind is ConnKind.DEVICE),
            "device_open": any(c.kind is ConnKind.DEVICE for c in self.conns),
            **self.kernel.inspect(),
        }


# ---------------------------------------------------------------------------- the control socket
# The machine-level operations that are not ioctls of /dev/liveupdate: kexec_file_load,
# reboot(KEXEC), fault injection, inspect and ``readlink`` of a passed fd.  One JSON request and
# one JSON reply per message (``root/.luo-emu/control``).

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
