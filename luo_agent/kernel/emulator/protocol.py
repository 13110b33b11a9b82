"""Wire formats and on-disk layout shared by the emulated kernel's server and its clients.

Every emulator channel is an AF_UNIX SOCK_SEQPACKET socket, so one message is one system call:
- device / session sockets: the client sends ``IOCTL_REQUEST`` + the caller's buffer; the server
  answers ``IOCTL_REPLY`` + the bytes copied back, optionally with one fd (SCM_RIGHTS).
- a new device connection first receives ``OPEN_REPLY`` (0 or an errno) before anything else.
- the control socket carries JSON objects (fds for kexec_file_load ride along as SCM_RIGHTS).
"""

from __future__ import annotations

import array
import json
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

# pid of the caller (the kernel's "current"), request number.
IOCTL_REQUEST: Final = struct.Struct("<iI")
# return value (>= 0) or -errno, offset in the caller's buffer where the passed fd's number goes
# (-1: no fd), number of bytes copied back to the start of the caller's buffer.
IOCTL_REPLY: Final = struct.Struct("<iiI")
# 0 or an errno; the open's flags go the other way.
OPEN_REPLY: Final = struct.Struct("<i")
OPEN_REQUEST: Final = struct.Struct("<i")

# Largest caller buffer the emulator accepts; bigger buffers get EFAULT (the kernel's
# copy_struct_from_user would scan them, which no real caller needs).
MAX_IOCTL_BUFFER: Final = 1 << 16
RECV_SIZE: Final = MAX_IOCTL_BUFFER + 64
CONTROL_RECV_SIZE: Final = 1 << 20

# Session sockets are socketpairs; the server binds its end to an abstract name with this prefix
# so a client can tell an emulator session fd from any other socket (getpeername).
SESSION_ADDRESS_PREFIX: Final = b"\0luo-emu/"
DEVICE_SOCKET_NAME: Final = "liveupdate"

# Cold-boot command line of the emulated kernel.
DEFAULT_CMDLINE: Final = "luo_emu liveupdate=1"


@dataclass(frozen=True, slots=True)
class Layout:
    """Where everything of one emulated machine lives under its root directory."""

    root: Path

    @property
    def dev_dir(self) -> Path:
        return self.root / "dev"

    @property
    def device(self) -> Path:
        return self.dev_dir / DEVICE_SOCKET_NAME

    @property
    def sysfs_dir(self) -> Path:
        return self.root / "sys" / "kernel" / "liveupdate"

    @property
    def sysfs_state(self) -> Path:
        return self.sysfs_dir / "state"

    @property
    def kexec_loaded(self) -> Path:
        """``/sys/kernel/kexec_loaded``: "1" while a kexec image is loaded, else "0"."""
        return self.root / "sys" / "kernel" / "kexec_loaded"

    @property
    def proc_cmdline(self) -> Path:
        return self.root / "proc" / "cmdline"

    @property
    def emu_dir(self) -> Path:
        return self.root / ".luo-emu"

    @property
    def machine_json(self) -> Path:
        return self.emu_dir / "machine.json"

    @property
    def control(self) -> Path:
        return self.emu_dir / "control"

    @property
    def pid_file(self) -> Path:
        return self.emu_dir / "server.pid"

    @property
    def handover(self) -> Path:
        return self.emu_dir / "handover.img"

    @property
    def handover_tmp(self) -> Path:
        return self.emu_dir / "handover.img.tmp"

    @property
    def handover_rejected(self) -> Path:
        return self.emu_dir / "handover.img.rejected"

    @property
    def kernel_log(self) -> Path:
        return self.emu_dir / "kernel.log"


def short_socket_path(path: Path) -> tuple[str, int]:
    """A path usable with bind/connect even when ``path`` exceeds sun_path's 108 bytes.

    Returns the address and an O_PATH fd on the parent directory that must stay open while the
    address is used (the address goes through ``/proc/self/fd``); the caller closes it.
    """
    dir_fd = os.open(path.parent, os.O_PATH | os.O_CLOEXEC)
    return f"/proc/self/fd/{dir_fd}/{path.name}", dir_fd


def connect_seqpacket(path: Path) -> socket.socket:
    """Connect to a listening SEQPACKET socket; the new socket is O_CLOEXEC (Python default)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        address, dir_fd = short_socket_path(path)
        try:
            sock.connect(address)
        finally:
            os.close(dir_fd)
    except BaseException:
        sock.close()
        raise
    return sock


def send_with_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sock.sendmsg([data], anc)
    else:
        sock.send(data)


def recv_with_fds(sock: socket.socket, size: int, max_fds: int = 4) -> tuple[bytes, list[int]]:
    """One message plus any fds passed with it; received fds are O_CLOEXEC."""
    data, ancdata, _flags, _addr = sock.recvmsg(
        size, socket.CMSG_SPACE(max_fds * 4), socket.MSG_CMSG_CLOEXEC
    )
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds.extend(array.array("i", payload[:usable]))
    return data, fds


def encode_json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def decode_json(raw: bytes) -> dict[str, Any]:
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise ValueError("control message is not a JSON object")
    return value
