"""Raw-byte drivers for every LUO generation, used by the kernel conformance suite.

Each helper builds the argument exactly as a C caller would (ctypes structs of
``luo_agent.kernel.uapi`` or ``struct.pack``), sends it through a ``Syscalls`` object and decodes
the bytes the kernel copied back.  Nothing here knows whether the kernel is real or emulated.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from luo_agent.kernel.device import Abi
from luo_agent.kernel.syscalls import DEVICE_PATH, SYSFS_STATE_PATH, Syscalls
from luo_agent.kernel.uapi import rfc_v2, session, v3

NAME_LEN = session.LIVEUPDATE_SESSION_NAME_LENGTH


@dataclass
class Target:
    """One kernel under test: an emulated generation/profile or the real device."""

    id: str
    abi: Abi
    profile: str | None  # "6.19" | "g6" for session, else None
    sc: Syscalls
    machine: Any = None  # EmulatedMachine, None for the real kernel
    opened: list[int] = field(default_factory=list)

    @property
    def real(self) -> bool:
        return self.machine is None

    @property
    def g6(self) -> bool:
        return self.profile == "g6"

    def open_device(self, flags: int = os.O_RDWR | os.O_CLOEXEC) -> int:
        fd = self.sc.open(self.sc.path(DEVICE_PATH), flags)
        self.opened.append(fd)
        return fd

    def close(self, fd: int) -> None:
        self.sc.close(fd)
        if fd in self.opened:
            self.opened.remove(fd)

    def track(self, fd: int) -> int:
        """Remember an fd the kernel returned so teardown closes it (exclusive open!)."""
        self.opened.append(fd)
        return fd

    def sysfs_state(self) -> str:
        with open(self.sc.path(SYSFS_STATE_PATH)) as f:
            return f.read()

    def close_all(self) -> None:
        while self.opened:
            fd = self.opened.pop()
            try:
                os.close(fd)
            except OSError:
                pass


def errno_of(fn: Callable[..., object], *args: Any) -> int:
    """The errno ``fn(*args)`` fails with; fails the test if it succeeds."""
    try:
        result = fn(*args)
    except OSError as exc:
        return exc.errno or 0
    raise AssertionError(f"{getattr(fn, '__name__', fn)}{args} succeeded ({result!r})")


def name_bytes(name: str | bytes) -> bytes:
    raw = name.encode() if isinstance(name, str) else name
    assert len(raw) <= NAME_LEN
    return raw + b"\0" * (NAME_LEN - len(raw))


def memfd(data: bytes = b"", name: str = "luo-test", flags: int = 0) -> int:
    fd = os.memfd_create(name, flags | os.MFD_CLOEXEC)
    if data:
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
    return fd


def read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    return os.pread(fd, size, 0) if size else b""


def cloexec(fd: int) -> bool:
    import fcntl

    return bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)


# ---------------------------------------------------------------- G5/G6: session ABI


def create_session_buf(name: str | bytes) -> bytearray:
    arg = session.liveupdate_ioctl_create_session()
    arg.size = ctypes.sizeof(arg)
    arg.fd = -1
    ctypes.memmove(arg.name, name_bytes(name), NAME_LEN)
    return bytearray(arg)


def create_session(sc: Syscalls, dev: int, name: str | bytes) -> int:
    buf = create_session_buf(name)
    assert sc.ioctl(dev, session.LIVEUPDATE_IOCTL_CREATE_SESSION, buf) == 0
    return int(session.liveupdate_ioctl_create_session.from_buffer(buf).fd)


def retrieve_session(sc: Syscalls, dev: int, name: str | bytes) -> int:
    # By hand this time: size u32 @0, fd s32 @4 (out), name u8[64] @8.
    buf = bytearray(struct.pack("<Ii64s", 72, -1, name_bytes(name)))
    assert sc.ioctl(dev, session.LIVEUPDATE_IOCTL_RETRIEVE_SESSION, buf) == 0
    fd: int = struct.unpack_from("<i", buf, 4)[0]
    return fd


def preserve_fd(sc: Syscalls, sess: int, fd: int, token: int) -> None:
    arg = session.liveupdate_session_preserve_fd(size=16, fd=fd, token=token)
    buf = bytearray(arg)
    assert sc.ioctl(sess, session.LIVEUPDATE_SESSION_PRESERVE_FD, buf) == 0


def retrieve_fd(sc: Syscalls, sess: int, token: int) -> int:
    buf = bytearray(struct.pack("<IiQ", 16, -1, token))
    assert sc.ioctl(sess, session.LIVEUPDATE_SESSION_RETRIEVE_FD, buf) == 0
    return int(session.liveupdate_session_retrieve_fd.from_buffer(buf).fd)


def finish(sc: Syscalls, sess: int, reserved: int = 0) -> None:
    buf = bytearray(struct.pack("<II", 8, reserved))
    assert sc.ioctl(sess, session.LIVEUPDATE_SESSION_FINISH, buf) == 0


def get_name(sc: Syscalls, sess: int) -> bytes:
    buf = bytearray(ctypes.sizeof(session.liveupdate_session_get_name))
    struct.pack_into("<I", buf, 0, len(buf))
    assert sc.ioctl(sess, session.LIVEUPDATE_SESSION_GET_NAME, buf) == 0
    return bytes(buf[8:72]).split(b"\0", 1)[0]


# ---------------------------------------------------------------- G3: v3


def v3_preserve(sc: Syscalls, dev: int, fd: int, token: int) -> None:
    buf = bytearray(v3.liveupdate_ioctl_fd_preserve(size=16, fd=fd, token=token))
    assert sc.ioctl(dev, v3.LIVEUPDATE_IOCTL_FD_PRESERVE, buf) == 0


def v3_unpreserve(sc: Syscalls, dev: int, token: int) -> None:
    buf = bytearray(struct.pack("<IIQ", 16, 0, token))
    assert sc.ioctl(dev, v3.LIVEUPDATE_IOCTL_FD_UNPRESERVE, buf) == 0


def v3_restore(sc: Syscalls, dev: int, token: int) -> int:
    buf = bytearray(struct.pack("<IiQ", 16, -1, token))
    assert sc.ioctl(dev, v3.LIVEUPDATE_IOCTL_FD_RESTORE, buf) == 0
    fd: int = struct.unpack_from("<i", buf, 4)[0]
    return fd


def v3_get_state(sc: Syscalls, dev: int) -> int:
    buf = bytearray(struct.pack("<II", 8, 0xFFFFFFFF))
    assert sc.ioctl(dev, v3.LIVEUPDATE_IOCTL_GET_STATE, buf) == 0
    return int(v3.liveupdate_ioctl_get_state.from_buffer(buf).state)


def v3_set_event(sc: Syscalls, dev: int, event: int) -> None:
    buf = bytearray(v3.liveupdate_ioctl_set_event(size=8, event=event))
    assert sc.ioctl(dev, v3.LIVEUPDATE_IOCTL_SET_EVENT, buf) == 0


# ---------------------------------------------------------------- G1: rfc-v2


def g1_preserve(sc: Syscalls, dev: int, fd: int, flags: int = 0) -> int:
    """Returns the kernel-made token."""
    buf = bytearray(rfc_v2.liveupdate_fd(fd=fd, flags=flags, token=0))
    assert sc.ioctl(dev, rfc_v2.LIVEUPDATE_IOCTL_FD_PRESERVE, buf) == 0
    return int(rfc_v2.liveupdate_fd.from_buffer(buf).token)


def g1_unpreserve(sc: Syscalls, dev: int, token: int) -> None:
    buf = bytearray(struct.pack("<Q", token))  # a bare __u64
    assert sc.ioctl(dev, rfc_v2.LIVEUPDATE_IOCTL_FD_UNPRESERVE, buf) == 0


def g1_restore(sc: Syscalls, dev: int, token: int) -> int:
    buf = bytearray(struct.pack("<iIQ", -1, 0, token))
    assert sc.ioctl(dev, rfc_v2.LIVEUPDATE_IOCTL_FD_RESTORE, buf) == 0
    fd: int = struct.unpack_from("<i", buf, 0)[0]
    return fd


def g1_get_state(sc: Syscalls, dev: int) -> int:
    buf = bytearray(struct.pack("<I", 0xFFFFFFFF))
    assert sc.ioctl(dev, rfc_v2.LIVEUPDATE_IOCTL_GET_STATE, buf) == 0
    state: int = struct.unpack("<I", buf)[0]
    return state


def g1_event(sc: Syscalls, dev: int, request: int) -> None:
    assert sc.ioctl(dev, request, bytearray(8)) == 0


G1_EVENTS = {
    "PREPARE": rfc_v2.LIVEUPDATE_IOCTL_EVENT_PREPARE,
    "FREEZE": rfc_v2.LIVEUPDATE_IOCTL_EVENT_FREEZE,
    "CANCEL": rfc_v2.LIVEUPDATE_IOCTL_EVENT_CANCEL,
    "FINISH": rfc_v2.LIVEUPDATE_IOCTL_EVENT_FINISH,
}


# ---------------------------------------------------------------- §12 detection


def probe_generation(sc: Syscalls) -> tuple[str, str | None] | str:
    """The §12 probe order, side-effect free.  Returns (abi, profile) or a reason string."""
    try:
        dev = sc.open(sc.path(DEVICE_PATH), os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"cannot open {DEVICE_PATH}: {os.strerror(exc.errno or 0)}"
    try:
        e3 = _probe_errno(sc, dev, v3.LIVEUPDATE_IOCTL_GET_STATE, struct.pack("<II", 8, 0))
        if e3 == 0:
            return (Abi.V3, None)
        if e3 == errno.ENOTTY:
            eg1 = _probe_errno(
                sc, dev, rfc_v2.LIVEUPDATE_IOCTL_FD_PRESERVE, struct.pack("<iIQ", -1, 0, 0)
            )
            return (Abi.RFC_V2, None) if eg1 == errno.EBADF else "G2 kernel (no backend)"
        e4 = _probe_errno(
            sc, dev, session.LIVEUPDATE_IOCTL_CREATE_SESSION, struct.pack("<II", 8, 0)
        )
        if e4 == 0:
            return "G4 kernel (no backend)"
        probe_name = name_bytes(b"luo-agent-conformance-probe-" + os.urandom(12).hex().encode())
        e5 = _probe_errno(
            sc,
            dev,
            session.LIVEUPDATE_IOCTL_RETRIEVE_SESSION,
            struct.pack("<Ii64s", 72, -1, probe_name),
        )
        if e5 != errno.ENOENT:
            return f"unknown generation (RETRIEVE_SESSION probe: errno {e5})"
        # G6 feature probe needs a session fd: an empty outgoing session, closed at once (= cancel).
        sess = create_session(sc, dev, probe_name)
        try:
            buf = bytearray(72)
            struct.pack_into("<I", buf, 0, 72)
            e7 = _probe_errno(sc, sess, session.LIVEUPDATE_SESSION_GET_NAME, bytes(buf))
        finally:
            sc.close(sess)
        return (Abi.SESSION, "g6" if e7 == 0 else "6.19")
    finally:
        sc.close(dev)


def _probe_errno(sc: Syscalls, fd: int, request: int, arg: bytes) -> int:
    try:
        sc.ioctl(fd, request, bytearray(arg))
    except OSError as exc:
        return exc.errno or 0
    return 0


def kexec_reboot(target: Target, image: Path, cmdline: str = "luo_emu liveupdate=1") -> None:
    """Load ``image`` and kexec the emulated machine, then boot it again (the "new kernel").

    Every fd of the old boot the test tracked is closed after the reboot: they belong to a kernel
    that no longer exists.
    """
    assert target.machine is not None
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        target.sc.kexec_file_load(fd, -1, cmdline, 0)
    finally:
        os.close(fd)
    target.sc.reboot_kexec()
    target.machine.wait_down(10.0)
    target.close_all()
    target.machine.boot()


def ioctl_errno(t: Target, fd: int, request: int, buf: bytes | bytearray) -> int:
    """The errno of one raw ioctl on target ``t`` (a copy of ``buf`` is passed, as C would)."""
    return errno_of(t.sc.ioctl, fd, request, bytearray(buf))
