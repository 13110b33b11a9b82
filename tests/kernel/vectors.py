"""Raw-byte differential vectors for the session ABI: the emulator's g6 profile against Linux 7.2.

A vector is a named list of steps on symbolic handles (``dev``, ``s1``, ``m1``...): open the
device, make a memfd (bytes, size, seals, position), issue an ioctl whose argument bytes are
spelled out here (an ``Fd(handle)`` segment becomes that handle's fd number), close, dup...
``run_vector`` executes one against any ``Syscalls`` and returns a JSON-able trace per step:
return value, errno, the argument bytes after the call (fd numbers shown as ``<handle>``, since
numbers differ between runs) and, for every fd the kernel returned, a normalised description
(kind, size, seals, position, close-on-exec, access mode, sha256 of a memfd's bytes).

Two runs of the same vectors on two kernels must give equal traces (``compare``).  Every vector
opens and closes the device itself (single open) and leaves no session behind, except the
stage-1 half of a kexec vector: its sessions stay open across ``kexec_file_load`` +
``reboot(LINUX_REBOOT_CMD_KEXEC)``, and its stage-2 half retrieves, inspects and finishes them
in the next boot.

Rules that keep the vectors meaningful on both kernels:

* No argument buffer is shorter than its ``size`` field, and none is shorter than 4 bytes:
  ``fcntl.ioctl`` copies buffers of up to 1024 bytes into an uninitialised stack buffer, so the
  real kernel would read garbage where the emulator reports EFAULT.
* Nothing resizes a preserved memfd: 7.2 refuses with EPERM (shmem_freeze), which a userspace
  emulator cannot enforce (docs/emulator.md).

CLI (run it as root on the kernel under test; stage 2 in the boot after the kexec)::

    python -m tests.kernel.vectors run --stage {1,2,all} --out FILE.json \\
        [--emulated ROOT [--profile g6]] [--kexec BZIMAGE --append CMDLINE]
    python -m tests.kernel.vectors compare A.json[,A2.json] B.json[,B2.json]
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import hashlib
import json
import os
import resource
import socket
import stat
import struct
import sys
import tempfile
import termios
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from luo_agent.fdkind import TMPFS_MAGIC, fs_magic
from luo_agent.kernel.device import Abi
from luo_agent.kernel.syscalls import DEVICE_PATH, RealSyscalls, Syscalls
from luo_agent.kernel.uapi import _IO, _IOW, _IOWR
from luo_agent.kernel.uapi import session as uapi

FORMAT: Final = 1
CREATE: Final = uapi.LIVEUPDATE_IOCTL_CREATE_SESSION
RETRIEVE: Final = uapi.LIVEUPDATE_IOCTL_RETRIEVE_SESSION
PRESERVE: Final = uapi.LIVEUPDATE_SESSION_PRESERVE_FD
RETRIEVE_FD: Final = uapi.LIVEUPDATE_SESSION_RETRIEVE_FD
FINISH: Final = uapi.LIVEUPDATE_SESSION_FINISH
GET_NAME: Final = uapi.LIVEUPDATE_SESSION_GET_NAME
OPEN_FLAGS: Final = os.O_RDWR | os.O_CLOEXEC
NOT_OPEN_FD: Final = 0x7FFFFFF0  # beyond any fd table: fget() fails, EBADF
OK: Final = "OK"
PAGE: Final = 4096
# <linux/fcntl.h>; Python's fcntl module lacks the newer two.
F_SEAL_FUTURE_WRITE: Final = 0x0010
F_SEAL_EXEC: Final = 0x0020
MFD_EXEC: Final = 0x0010  # <linux/memfd.h>, Linux 6.3+
SEAL_ALL: Final = (
    fcntl.F_SEAL_SEAL
    | fcntl.F_SEAL_SHRINK
    | fcntl.F_SEAL_GROW
    | fcntl.F_SEAL_WRITE
    | F_SEAL_FUTURE_WRITE
)


# ---------------------------------------------------------------------------- the step model


@dataclass(frozen=True, slots=True)
class Fd:
    """Inside an ioctl argument: the 4-byte (s32, little-endian) fd number of ``handle``."""

    handle: str


Segment = bytes | Fd


@dataclass(frozen=True, slots=True)
class OpenDevice:
    handle: str
    expect: str = OK


@dataclass(frozen=True, slots=True)
class Ioctl:
    """``ioctl(handle, request, arg)``.  ``out_fd=(offset, new_handle)``: on success the s32 at
    ``offset`` is a new fd, bound to ``new_handle``.  ``no_free_fd``: RLIMIT_NOFILE is lowered to
    the lowest free fd for the call (every new fd is refused)."""

    handle: str
    request: int
    arg: tuple[Segment, ...]
    what: str
    expect: str = OK
    out_fd: tuple[int, str] | None = None
    no_free_fd: bool = False


@dataclass(frozen=True, slots=True)
class Close:
    handle: str


@dataclass(frozen=True, slots=True)
class Dup:
    handle: str
    new: str


@dataclass(frozen=True, slots=True)
class Memfd:
    """A memfd holding ``data``, then ftruncate'd to ``size`` (if given), sealed, positioned."""

    handle: str
    data: bytes = b""
    size: int | None = None
    pos: int = 0
    seals: int = 0
    sealing: bool = True  # MFD_ALLOW_SEALING (without it F_GET_SEALS is F_SEAL_SEAL)


@dataclass(frozen=True, slots=True)
class Write:
    """pwrite on a memfd (never past its size once preserved)."""

    handle: str
    data: bytes
    offset: int


@dataclass(frozen=True, slots=True)
class Seek:
    handle: str
    pos: int


@dataclass(frozen=True, slots=True)
class AddSeals:
    handle: str
    seals: int


@dataclass(frozen=True, slots=True)
class OtherFd:
    """A file no LUO handler accepts: ``dev-null``, ``pipe``, ``socket`` or ``regular``."""

    handle: str
    kind: str


@dataclass(frozen=True, slots=True)
class Reopen:
    """open("/proc/self/fd/N"): a new open file of the same inode."""

    handle: str
    new: str


@dataclass(frozen=True, slots=True)
class Inspect:
    handle: str


Step = (
    OpenDevice | Ioctl | Close | Dup | Memfd | Write | Seek | AddSeals | OtherFd | Reopen | Inspect
)


@dataclass(frozen=True, slots=True)
class Vector:
    name: str
    steps: tuple[Step, ...]
    after_kexec: tuple[Step, ...] = ()  # a kexec vector: steps == stage 1, these == stage 2

    @property
    def kexec(self) -> bool:
        return bool(self.after_kexec)


# ---------------------------------------------------------------------------- argument builders


def name_field(name: bytes, fill: bytes = b"\0") -> bytes:
    assert len(name) <= uapi.LIVEUPDATE_SESSION_NAME_LENGTH
    return name + fill * (uapi.LIVEUPDATE_SESSION_NAME_LENGTH - len(name))


def create(dev: str, new: str, name: bytes, expect: str = OK, size: int = 72) -> Ioctl:
    arg = (struct.pack("<Ii", size, -1) + name_field(name),)
    return Ioctl(dev, CREATE, arg, f"CREATE_SESSION {name!r}", expect, (4, new))


def retrieve(dev: str, new: str, name: bytes, expect: str = OK) -> Ioctl:
    arg = (struct.pack("<Ii", 72, -1) + name_field(name),)
    return Ioctl(dev, RETRIEVE, arg, f"RETRIEVE_SESSION {name!r}", expect, (4, new))


def preserve(sess: str, fd: str | int, token: int, expect: str = OK, size: int = 16) -> Ioctl:
    fd_seg: Segment = Fd(fd) if isinstance(fd, str) else struct.pack("<i", fd)
    arg = (struct.pack("<I", size), fd_seg, struct.pack("<Q", token))
    return Ioctl(sess, PRESERVE, arg, f"PRESERVE_FD {fd} token {token:#x}", expect)


def retrieve_fd(sess: str, new: str, token: int, expect: str = OK) -> Ioctl:
    arg = (struct.pack("<IiQ", 16, -1, token),)
    return Ioctl(sess, RETRIEVE_FD, arg, f"RETRIEVE_FD token {token:#x}", expect, (4, new))


def finish(sess: str, expect: str = OK, reserved: int = 0) -> Ioctl:
    return Ioctl(sess, FINISH, (struct.pack("<II", 8, reserved),), "FINISH", expect)


def get_name(sess: str, expect: str = OK, fill: bytes = b"\0", reserved: int = 0) -> Ioctl:
    arg = (struct.pack("<II", 72, reserved) + fill * 64,)
    return Ioctl(sess, GET_NAME, arg, "GET_NAME", expect)


def raw(handle: str, request: int, arg: bytes, what: str, expect: str) -> Ioctl:
    return Ioctl(handle, request, (arg,), what, expect)


def data(seed: str, length: int) -> bytes:
    """Deterministic bytes (sha256 in counter mode)."""
    out = bytearray()
    counter = 0
    while len(out) < length:
        out += hashlib.sha256(f"{seed}/{counter}".encode()).digest()
        counter += 1
    return bytes(out[:length])


# ---------------------------------------------------------------------------- the vectors


def _v(name: str, *steps: Step, after_kexec: Iterable[Step] = ()) -> Vector:
    return Vector(name, tuple(steps), tuple(after_kexec))


def _device_vectors() -> list[Vector]:
    d = "dev"
    vectors = [
        _v("device.open-close", OpenDevice(d), Close(d)),
        _v(
            "device.exclusive-open",
            OpenDevice(d),
            OpenDevice("dev2", expect="EBUSY"),
            Close(d),
            OpenDevice("dev3"),
            Close("dev3"),
        ),
        _v(
            "device.close-leaves-sessions",
            OpenDevice(d),
            create(d, "s", b"v-outlives-device"),
            Close(d),
            Memfd("m", b"still preservable"),
            preserve("s", "m", 1),
            OpenDevice(d),
            create(d, "x", b"v-outlives-device", "EEXIST"),
            Close("s"),
            create(d, "s2", b"v-outlives-device"),
            Close("s2"),
            Close(d),
            Inspect("m"),
            Close("m"),
        ),
    ]
    nr_steps: list[Step] = [OpenDevice(d)]
    for nr in (0x02, 0x03, 0x3F, 0x40, 0x41, 0x43, 0xFF):
        arg = struct.pack("<Ii", 72, -1) + name_field(b"v-nr-range")
        nr_steps.append(raw(d, _IO(0xBA, nr), arg, f"device nr {nr:#x}", "EINVAL"))
    for request, label in (
        (_IOWR(0xBA, 0, 72), "IOWR encoding"),
        (_IOW(0xBA, 0, 72), "IOW encoding"),
        (_IO(0xBB, 0), "other magic"),
        (_IO(0x00, 0), "magic 0"),
        (_IO(0xBA, 0) | (1 << 16), "size bits set"),
    ):
        arg = struct.pack("<Ii", 72, -1) + name_field(b"v-mismatch")
        nr_steps.append(raw(d, request, arg, f"CREATE_SESSION {label}", "ENOTTY"))
    nr_steps += [create(d, "s", b"v-mismatch"), Close("s"), Close(d)]
    vectors.append(_v("device.request-numbers", *nr_steps))
    vfs: list[Step] = [OpenDevice(d), create(d, "s", b"v-vfs-ioctls"), Close(d), OpenDevice(d)]
    for handle in (d, "s"):
        vfs += [
            raw(handle, termios.FIONCLEX, bytes(8), "FIONCLEX (answered by the VFS)", OK),
            Inspect(handle),
            raw(handle, termios.FIOCLEX, bytes(8), "FIOCLEX (answered by the VFS)", OK),
            Inspect(handle),
        ]
    vectors.append(_v("device.vfs-ioctls", *vfs, Close("s"), Close(d)))
    return vectors


def _create_vectors() -> list[Vector]:
    d = "dev"
    size_steps: list[Step] = [OpenDevice(d)]
    for size in (0, 4, 8, 64, 71):
        size_steps.append(create(d, "x", b"v-short", "EINVAL", size=size))
    size_steps += [
        raw(d, RETRIEVE, struct.pack("<Ii", 71, -1) + name_field(b"v-short"), "short", "EINVAL"),
        create(d, "s", b"v-short"),
        Inspect("s"),
        Close("s"),
        Close(d),
    ]
    tail = struct.pack("<Ii", 96, -1) + name_field(b"v-tail")
    beyond = struct.pack("<Ii", 72, -1) + name_field(b"v-beyond") + b"\xff" * 16
    return [
        _v(
            "create.basic-and-duplicate",
            OpenDevice(d),
            create(d, "a", b"v-a"),
            create(d, "b", b"v-b"),
            create(d, "x", b"v-a", "EEXIST"),
            retrieve(d, "x", b"v-a", "ENOENT"),  # outgoing names are not incoming ones
            retrieve(d, "x", b"v-never-preserved", "ENOENT"),
            get_name("a"),
            get_name("b"),
            Close("a"),
            create(d, "a2", b"v-a"),  # closed = removed: the name is free again
            Close("a2"),
            Close("b"),
            Close(d),
        ),
        _v("create.sizes", *size_steps),
        _v(
            "create.trailing-bytes",
            OpenDevice(d),
            Ioctl(d, CREATE, (tail + bytes(23) + b"\x01",), "tail byte 95 set", "E2BIG", (4, "x")),
            Ioctl(d, CREATE, (tail + bytes(24),), "zero tail", OK, (4, "s")),
            create(d, "y", b"v-tail", "EEXIST"),
            Ioctl(d, CREATE, (beyond,), "garbage past size", OK, (4, "s2")),
            Close("s"),
            Close("s2"),
            Close(d),
        ),
        _v(
            "create.names",
            OpenDevice(d),
            create(d, "x", b"", "EINVAL"),
            Ioctl(
                d,
                CREATE,
                (struct.pack("<Ii", 72, -1) + b"X" * 64,),
                "unterminated",
                "EINVAL",
                (4, "x"),
            ),
            create(d, "s63", b"A" * 63),
            get_name("s63"),
            Ioctl(
                d,
                CREATE,
                (struct.pack("<Ii", 72, -1) + b"v-nul\0junk" + bytes(54),),
                "CREATE_SESSION, bytes after the NUL",
                OK,
                (4, "nul"),
            ),
            get_name("nul"),
            create(d, "x2", b"v-nul", "EEXIST"),
            create(d, "utf", "v-é-ünïcode".encode()),
            create(d, "hi", b"v-\x01\xff\x7f"),
            get_name("utf"),
            get_name("hi"),
            Close("s63"),
            Close("nul"),
            Close("utf"),
            Close("hi"),
            Close(d),
        ),
        _v(
            "create.no-free-fd",
            OpenDevice(d),
            Ioctl(
                d,
                CREATE,
                (struct.pack("<Ii", 72, -1) + name_field(b"v-no-fd"),),
                "CREATE_SESSION with no free fd",
                "EMFILE",
                (4, "x"),
                no_free_fd=True,
            ),
            Ioctl(
                d,
                CREATE,
                (struct.pack("<Ii", 72, -1) + bytes(64),),
                "empty name, no free fd: the fd is taken first",
                "EMFILE",
                (4, "x"),
                no_free_fd=True,
            ),
            create(d, "s", b"v-no-fd"),  # the failed create left nothing behind
            Ioctl(
                d,
                CREATE,
                (struct.pack("<Ii", 72, -1) + name_field(b"v-no-fd"),),
                "duplicate, no free fd",
                "EMFILE",
                (4, "x"),
                no_free_fd=True,
            ),
            Ioctl(
                d,
                RETRIEVE,
                (struct.pack("<Ii", 72, -1) + name_field(b"v-no-such-session"),),
                "RETRIEVE_SESSION of no session, no free fd",
                "EMFILE",
                (4, "x"),
                no_free_fd=True,
            ),
            Close("s"),
            Close(d),
        ),
    ]


def _session_vectors() -> list[Vector]:
    d = "dev"
    out = [OpenDevice(d), create(d, "s", b"v-session"), Close(d)]
    session_nr: list[Step] = [*out]
    for nr in (0x00, 0x01, 0x3F, 0x44, 0x80, 0xFF):
        session_nr.append(
            raw("s", _IO(0xBA, nr), struct.pack("<I", 72) + bytes(68), "nr", "EINVAL")
        )
    session_nr += [
        Memfd("m", b"m"),
        Ioctl(
            "s", _IOWR(0xBA, 0x40, 16), (b"\x10\0\0\0", Fd("m"), b"\1" + bytes(7)), "IOWR", "ENOTTY"
        ),
        Ioctl(
            "s", _IOW(0xBA, 0x40, 16), (b"\x10\0\0\0", Fd("m"), b"\1" + bytes(7)), "IOW", "ENOTTY"
        ),
        Ioctl("s", _IO(0xBC, 0x40), (b"\x10\0\0\0", Fd("m"), b"\1" + bytes(7)), "magic", "ENOTTY"),
        preserve("s", "m", 1, size=15, expect="EINVAL"),
        preserve("s", "m", 1, size=0, expect="EINVAL"),
        Ioctl(
            "s",
            PRESERVE,
            (b"\x18\0\0\0", Fd("m"), b"\1" + bytes(7), b"\1" + bytes(7)),
            "tail",
            "E2BIG",
        ),
        Ioctl("s", PRESERVE, (b"\x18\0\0\0", Fd("m"), b"\1" + bytes(7), bytes(8)), "zero tail", OK),
        Ioctl(
            "s",
            PRESERVE,
            (b"\x10\0\0\0", Fd("m"), b"\2" + bytes(7), b"\xee" * 8),
            "past size",
            "EBUSY",
        ),
        Close("s"),
        Close("m"),
    ]
    return [
        _v("session.request-numbers-and-sizes", *session_nr),
        _v(
            "session.preserve-errnos",
            *out,
            OpenDevice(d),
            create(d, "o", b"v-session-other"),
            Close(d),
            Memfd("m", b"a"),
            Memfd("m2", b"b"),
            Memfd("m3", b"c"),
            preserve("s", "m", 0),  # token 0 is legal
            preserve("o", "m2", 0),  # tokens are per session
            preserve("s", "m2", 0, "EEXIST"),  # token checked before anything else
            preserve("s", -1, 0, "EEXIST"),
            preserve("s", NOT_OPEN_FD, 1, "EBADF"),
            preserve("s", -1, 1, "EBADF"),
            preserve("s", "m3", 2**64 - 1),  # any u64
            Inspect("m"),
            Close("s"),
            Close("o"),
            Close("m"),
            Close("m2"),
            Close("m3"),
        ),
        _v(
            "session.preserve-unsupported",
            *out,
            OtherFd("null", "dev-null"),
            OtherFd("pipe", "pipe"),
            OtherFd("sock", "socket"),
            OtherFd("reg", "regular"),
            preserve("s", "null", 1, "ENOENT"),
            preserve("s", "pipe", 1, "ENOENT"),
            preserve("s", "sock", 1, "ENOENT"),
            preserve("s", "reg", 1, "ENOENT"),
            preserve("s", "s", 1, "ENOENT"),  # a session fd is not preservable either
            Close("s"),
            Close("null"),
            Close("pipe"),
            Close("sock"),
            Close("reg"),
        ),
        _v(
            "session.double-preservation",
            *out,
            OpenDevice(d),
            create(d, "o", b"v-session-other"),
            Close(d),
            Memfd("m", b"once"),
            preserve("s", "m", 1),
            preserve("s", "m", 2, "EBUSY"),
            preserve("o", "m", 1, "EBUSY"),
            Dup("m", "dup"),
            preserve("o", "dup", 3, "EBUSY"),
            Reopen("m", "again"),  # another open file, same inode
            preserve("o", "again", 4, "EBUSY"),
            Close("s"),  # unpreserves: the file is free again
            preserve("o", "again", 4),
            Close("o"),
            Close("dup"),
            Close("again"),
            Inspect("m"),
            Close("m"),
        ),
        _v(
            "session.close-unpreserves",
            *out,
            Memfd("m", data("close-unpreserves", 2200), pos=7),
            preserve("s", "m", 0x1234),
            Close("s"),
            Inspect("m"),
            OpenDevice(d),
            create(d, "s2", b"v-session"),
            Close(d),
            preserve("s2", "m", 0x1234),
            Close("s2"),
            Close("m"),
        ),
        _v(
            "session.last-reference-counts",
            OpenDevice(d),
            create(d, "s", b"v-dup-ref"),
            Dup("s", "dup"),
            Close("s"),
            create(d, "x", b"v-dup-ref", "EEXIST"),
            Memfd("m", b"x"),
            preserve("dup", "m", 5),
            get_name("dup"),
            Close("dup"),
            create(d, "s2", b"v-dup-ref"),
            Close("s2"),
            Close(d),
            Close("m"),
        ),
        _v(
            "session.wrong-kind-on-outgoing",
            *out,
            Memfd("m", b"o"),
            preserve("s", "m", 1),
            raw("s", RETRIEVE_FD, struct.pack("<IiQ", 16, -1, 1), "RETRIEVE_FD outgoing", "EINVAL"),
            raw("s", FINISH, struct.pack("<II", 8, 0), "FINISH outgoing", "EINVAL"),
            raw("s", _IOWR(0xBA, 0x41, 16), struct.pack("<IiQ", 16, -1, 1), "enc", "ENOTTY"),
            raw("s", RETRIEVE_FD, struct.pack("<IiQQ", 24, -1, 1, 7), "kind<E2BIG", "EINVAL"),
            raw("s", FINISH, struct.pack("<II", 0, 0), "kind<size", "EINVAL"),
            Close("s"),
            Close("m"),
        ),
        _v(
            "session.get-name",
            *out,
            raw("s", GET_NAME, struct.pack("<II", 8, 0) + bytes(64), "size 8", "EINVAL"),
            raw("s", GET_NAME, struct.pack("<II", 16, 0) + bytes(64), "size 16", "EINVAL"),
            raw("s", GET_NAME, struct.pack("<II", 71, 0) + bytes(64), "size 71", "EINVAL"),
            get_name("s", "EINVAL", reserved=1),
            get_name("s", "EINVAL", fill=b"\xaa", reserved=0x80000000),
            raw("s", GET_NAME, struct.pack("<II", 80, 0) + bytes(71) + b"\1", "tail", "E2BIG"),
            get_name("s"),
            get_name("s", fill=b"\xaa"),
            raw("s", GET_NAME, struct.pack("<II", 80, 0) + b"\xbb" * 64 + bytes(8), "80", OK),
            raw("s", GET_NAME, struct.pack("<II", 72, 0) + b"\xcc" * 64 + b"\xdd" * 8, "past", OK),
            Close("s"),
        ),
    ]


# Stage-1/stage-2 pairs.  Each session name is used by one vector only.
def _kexec_vectors() -> list[Vector]:
    d = "dev"
    big = data("kexec-contents-big", 3 * PAGE + 123)
    contents = _v(
        "kexec.contents",
        OpenDevice(d),
        create(d, "s", b"v-k-contents"),
        Close(d),
        Memfd("empty"),
        Memfd("small", b"hello, next kernel", pos=5),
        Memfd("big", big, pos=len(big)),
        Memfd("sparse", size=5 * PAGE),
        Write("sparse", b"middle of nowhere", 2 * PAGE + 100),
        Memfd("late", bytes(2 * PAGE)),
        Memfd("closed", data("closed-after-preserve", 777), pos=3),
        preserve("s", "empty", 1),
        preserve("s", "small", 2),
        preserve("s", "big", 3),
        preserve("s", "sparse", 4),
        preserve("s", "late", 5),
        preserve("s", "closed", 6),
        Write("late", b"written after preserve", 100),  # carried: same pages
        Seek("late", 4321),  # the position is recorded at reboot (memfd_luo_freeze)
        Seek("small", 9),
        Close("closed"),  # LUO holds its own reference
        Inspect("late"),
        after_kexec=(
            OpenDevice(d),
            retrieve(d, "s", b"v-k-contents"),
            Close(d),
            retrieve_fd("s", "f6", 6),
            retrieve_fd("s", "f5", 5),
            retrieve_fd("s", "f4", 4),
            retrieve_fd("s", "f3", 3),
            retrieve_fd("s", "f2", 2),
            retrieve_fd("s", "f1", 1),
            finish("s"),
            Close("s"),
            *(Inspect(f"f{i}") for i in range(1, 7)),
            *(Close(f"f{i}") for i in range(1, 7)),
        ),
    )
    seal_memfds: list[Step] = []
    seal_retrieves: list[Step] = []
    seal_cases = [
        ("none", 0, True),
        ("no-sealing", 0, False),  # F_SEAL_SEAL
        ("grow-shrink", fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK, True),
        ("write", fcntl.F_SEAL_WRITE, True),
        ("future-write", F_SEAL_FUTURE_WRITE, True),
        ("exec", F_SEAL_EXEC, True),  # on the fresh (executable) inode it adds the write seals
        ("all", SEAL_ALL, True),
    ]
    for token, (label, seals, sealing) in enumerate(seal_cases, start=1):
        handle = f"m-{label}"
        seal_memfds += [
            Memfd(handle, f"sealed {label}".encode(), seals=seals, sealing=sealing),
            preserve("s", handle, token),
        ]
        seal_retrieves += [retrieve_fd("s", f"f-{label}", token), Inspect(f"f-{label}")]
    seals = _v(
        "kexec.seals",
        OpenDevice(d),
        create(d, "s", b"v-k-seals"),
        Close(d),
        *seal_memfds,
        Memfd("m-late-seal", b"sealed after preserve"),
        preserve("s", "m-late-seal", 99),
        AddSeals("m-late-seal", fcntl.F_SEAL_GROW),  # recorded at preserve: not carried
        after_kexec=(
            OpenDevice(d),
            retrieve(d, "s", b"v-k-seals"),
            Close(d),
            *seal_retrieves,
            retrieve_fd("s", "f-late", 99),
            Inspect("f-late"),
            finish("s"),
            Close("s"),
            *(Close(f"f-{label}") for label, _s, _a in seal_cases),
            Close("f-late"),
        ),
    )
    semantics = _v(
        "kexec.retrieve-semantics",
        OpenDevice(d),
        create(d, "s", b"v-k-files"),
        Close(d),
        Memfd("m10", b"file 10"),
        Memfd("m20", b"file 20"),
        Memfd("m30", b"file 30"),
        preserve("s", "m10", 10),
        preserve("s", "m20", 20),
        preserve("s", "m30", 30),
        after_kexec=(
            OpenDevice(d),
            retrieve(d, "s", b"v-k-files"),
            retrieve(d, "x", b"v-k-files", "EINVAL"),  # retrieved already
            create(d, "out", b"v-k-files"),  # incoming and outgoing names are separate
            Close(d),
            retrieve_fd("s", "x", 99, "ENOENT"),
            Ioctl(
                "s",
                RETRIEVE_FD,
                (struct.pack("<IiQ", 16, -1, 99),),
                "RETRIEVE_FD of no token, no free fd",
                "EMFILE",
                (4, "x"),
                no_free_fd=True,
            ),
            Ioctl(
                "s",
                RETRIEVE_FD,
                (struct.pack("<IiQ", 16, -1, 30),),
                "RETRIEVE_FD, no free fd",
                "EMFILE",
                (4, "x"),
                no_free_fd=True,
            ),
            retrieve_fd("s", "f30", 30),
            retrieve_fd("s", "f10", 10),
            retrieve_fd("s", "again", 10),  # the same open file again
            Seek("f10", 3),
            Inspect("again"),
            preserve("out", "f10", 1, "EBUSY"),  # retrieved files are LUO's until FINISH
            preserve("s", "f10", 1, "EINVAL"),  # PRESERVE_FD on an incoming session
            get_name("s"),
            raw("s", PRESERVE, struct.pack("<IiQ", 8, -1, 1), "kind<size", "EINVAL"),
            finish("s", "EINVAL", reserved=0xDEAD),
            finish("s"),
            finish("s"),  # repeating FINISH is fine
            retrieve_fd("s", "x", 10, "ENOENT"),  # nothing left after FINISH
            retrieve_fd("s", "x", 20, "ENOENT"),  # never retrieved: discarded
            preserve("out", "f10", 1),
            Inspect("f30"),
            Close("out"),
            Close("s"),
            OpenDevice(d),
            retrieve(d, "x", b"v-k-files", "ENOENT"),  # closed = gone
            Close(d),
            Close("f10"),
            Close("f30"),
            Close("again"),
        ),
    )
    close_without_finish = _v(
        "kexec.close-without-finish",
        OpenDevice(d),
        create(d, "s", b"v-k-close"),
        create(d, "e", b"v-k-empty"),
        create(d, "gone", b"v-k-closed-before"),
        Close("gone"),  # closed sessions are not carried
        Close(d),
        Memfd("m", b"finished by close"),
        preserve("s", "m", 1),
        after_kexec=(
            OpenDevice(d),
            retrieve(d, "x", b"v-k-closed-before", "ENOENT"),
            retrieve(d, "e", b"v-k-empty"),
            retrieve(d, "s", b"v-k-close"),
            Close(d),
            get_name("e"),
            finish("e"),
            Close("e"),
            retrieve_fd("s", "f", 1),
            Close("s"),  # implicit FINISH
            OpenDevice(d),
            retrieve(d, "x", b"v-k-close", "ENOENT"),
            retrieve(d, "x", b"v-k-empty", "ENOENT"),
            Close(d),
            Inspect("f"),
            Close("f"),
        ),
    )
    names = _v(
        "kexec.names",
        OpenDevice(d),
        create(d, "s63", b"N" * 63),
        create(d, "odd", b"v-k-\x01\xfe"),
        Close(d),
        after_kexec=(
            OpenDevice(d),
            Ioctl(
                d, RETRIEVE, (struct.pack("<Ii", 72, -1) + b"N" * 64,), "64 N", "ENOENT", (4, "x")
            ),
            retrieve(d, "s63", b"N" * 63),
            Ioctl(
                d,
                RETRIEVE,
                (struct.pack("<Ii", 72, -1) + b"v-k-\x01\xfe\0tail" + bytes(53),),
                "RETRIEVE_SESSION, bytes after the NUL",
                OK,
                (4, "odd"),
            ),
            Close(d),
            get_name("s63"),
            get_name("odd", fill=b"\x55"),
            finish("s63"),
            Close("s63"),
            Close("odd"),
        ),
    )
    return [contents, seals, semantics, close_without_finish, names]


def all_vectors() -> list[Vector]:
    return [*_device_vectors(), *_create_vectors(), *_session_vectors(), *_kexec_vectors()]


# ---------------------------------------------------------------------------- describing fds


def _errname(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def _attempt(fn: Callable[[], int]) -> int | str:
    try:
        return fn()
    except OSError as exc:
        return _errname(exc)


def _socket_kind(fd: int) -> str:
    """The emulator's device and session fds are AF_UNIX sockets connected to its server."""
    from luo_agent.kernel.emulator.protocol import DEVICE_SOCKET_NAME, SESSION_ADDRESS_PREFIX

    sock = socket.socket(fileno=os.dup(fd))
    try:
        peer = sock.getpeername()
    except OSError:
        return "other"
    finally:
        sock.close()
    if isinstance(peer, bytes) and peer.startswith(SESSION_ADDRESS_PREFIX):
        return "luo-session"
    if isinstance(peer, str) and peer.endswith("/" + DEVICE_SOCKET_NAME):
        return "luo-device"
    return "other"


def fd_kind(fd: int) -> str:
    """memfd / luo-session / luo-device / other, the same word for the real and emulated kernel."""
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode) and st.st_nlink == 0 and fs_magic(fd) == TMPFS_MAGIC:
        return "memfd"
    if stat.S_ISSOCK(st.st_mode):
        return _socket_kind(fd)
    try:
        link = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "other"
    if link.startswith("anon_inode:[luo_session]"):
        return "luo-session"
    if stat.S_ISCHR(st.st_mode) and link == DEVICE_PATH:
        return "luo-device"
    return "other"


_ACCMODE: Final = {os.O_RDONLY: "O_RDONLY", os.O_WRONLY: "O_WRONLY", os.O_RDWR: "O_RDWR"}


def describe(fd: int) -> dict[str, Any]:
    st = os.fstat(fd)
    kind = fd_kind(fd)
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    out: dict[str, Any] = {
        "kind": kind,
        "size": st.st_size,
        "seals": _attempt(lambda: fcntl.fcntl(fd, fcntl.F_GET_SEALS)),
        "pos": _attempt(lambda: os.lseek(fd, 0, os.SEEK_CUR)),
        "cloexec": bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC),
        "accmode": _ACCMODE.get(flags & os.O_ACCMODE, str(flags & os.O_ACCMODE)),
    }
    if kind == "memfd":
        digest = hashlib.sha256()
        offset = 0
        while offset < st.st_size:
            chunk = os.pread(fd, min(1 << 20, st.st_size - offset), offset)
            if not chunk:
                break
            digest.update(chunk)
            offset += len(chunk)
        out["sha256"] = digest.hexdigest()
    return out


# ---------------------------------------------------------------------------- running


class Unbound(Exception):
    """A step names a handle no earlier step bound (its call failed)."""


@dataclass(slots=True)
class Live:
    fd: int


@contextmanager
def _no_free_fd() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    probe = os.dup(0)
    os.close(probe)
    resource.setrlimit(resource.RLIMIT_NOFILE, (probe, hard))  # every fd >= probe is refused
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _render(buf: bytes, marks: dict[int, tuple[str, int]]) -> str:
    """Hex of ``buf`` with the fd numbers at ``marks`` (offset -> (handle, fd)) as ``<handle>``."""
    parts: list[str] = []
    i = 0
    while i < len(buf):
        mark = marks.get(i)
        if mark is not None and i + 4 <= len(buf):
            handle, fd = mark
            if struct.unpack_from("<i", buf, i)[0] == fd:
                parts.append(f"<{handle}>")
                i += 4
                continue
        parts.append(f"{buf[i]:02x}")
        i += 1
    return "".join(parts)


@dataclass
class Runner:
    """Runs vectors on one ``Syscalls``.  Handles are per vector."""

    sc: Syscalls
    handles: dict[str, Live] = field(default_factory=dict)

    def _fd(self, handle: str) -> int:
        live = self.handles.get(handle)
        if live is None:
            raise Unbound(handle)
        return live.fd

    def run(self, name: str, steps: Sequence[Step], keep: bool = False) -> list[dict[str, Any]]:
        """The trace of ``steps``.  Unless ``keep``, every handle still open is closed after."""
        self.handles = {}
        trace: list[dict[str, Any]] = []
        try:
            for step in steps:
                try:
                    entry = self._step(step)
                except Unbound as exc:
                    # An earlier call failed that should not have: record it, go on.
                    entry = {"op": type(step).__name__, "result": f"unbound handle {exc}"}
                expect = getattr(step, "expect", None)
                if expect is not None and entry["result"] != expect:
                    entry["unexpected"] = f"expected {expect}"
                trace.append(entry)
        finally:
            if not keep:
                self.close_all()
        return trace

    def close_all(self) -> None:
        for handle in reversed(list(self.handles)):
            self._close(handle)

    def kept(self) -> dict[str, Live]:
        kept, self.handles = self.handles, {}
        return kept

    def _close(self, handle: str) -> str:
        self._fd(handle)
        live = self.handles.pop(handle)
        try:
            self.sc.close(live.fd)
            return OK
        except OSError as exc:
            return _errname(exc)

    def _bind(self, handle: str, fd: int) -> dict[str, Any]:
        self.handles[self._unused(handle)] = Live(fd)
        return describe(fd)

    def _unused(self, handle: str) -> str:
        """``handle``, or ``handle'`` etc. when a call that should have failed returned an fd
        under a name already in use (it is still closed at the end)."""
        while handle in self.handles:
            handle += "'"
        return handle

    def _step(self, step: Step) -> dict[str, Any]:
        match step:
            case Ioctl():
                return self._ioctl(step)
            case OpenDevice(handle=h):
                try:
                    fd = self.sc.open(self.sc.path(DEVICE_PATH), OPEN_FLAGS)
                except OSError as exc:
                    return {"op": "open", "handle": h, "result": _errname(exc)}
                return {"op": "open", "handle": h, "result": OK, "fd": self._bind(h, fd)}
            case Close(handle=h):
                return {"op": "close", "handle": h, "result": self._close(h)}
            case Dup(handle=h, new=new):
                fd = self._bind(new, os.dup(self._fd(h)))
                return {"op": "dup", "handle": h, "new": new, "result": OK, "fd": fd}
            case Memfd():
                return self._memfd(step)
            case Write(handle=h, data=payload, offset=offset):
                written = os.pwrite(self._fd(h), payload, offset)
                return {"op": "pwrite", "handle": h, "result": OK, "written": written}
            case Seek(handle=h, pos=pos):
                os.lseek(self._fd(h), pos, os.SEEK_SET)
                return {"op": "seek", "handle": h, "result": OK, "pos": pos}
            case AddSeals(handle=h, seals=seals):
                try:
                    fcntl.fcntl(self._fd(h), fcntl.F_ADD_SEALS, seals)
                    result = OK
                except OSError as exc:
                    result = _errname(exc)
                return {"op": "add_seals", "handle": h, "seals": seals, "result": result}
            case OtherFd(handle=h, kind=kind):
                self._other(h, kind)
                return {"op": "other_fd", "handle": h, "kind": kind, "result": OK}
            case Reopen(handle=h, new=new):
                fd = os.open(f"/proc/self/fd/{self._fd(h)}", os.O_RDWR | os.O_CLOEXEC)
                return {
                    "op": "reopen",
                    "handle": h,
                    "new": new,
                    "result": OK,
                    "fd": self._bind(new, fd),
                }
            case Inspect(handle=h):
                return {"op": "inspect", "handle": h, "result": OK, "fd": describe(self._fd(h))}
        raise AssertionError(step)

    def _memfd(self, step: Memfd) -> dict[str, Any]:
        # MFD_EXEC: the same seals whatever vm.memfd_noexec (0 or 1) the machine runs with.
        flags = os.MFD_CLOEXEC | MFD_EXEC | (os.MFD_ALLOW_SEALING if step.sealing else 0)
        fd = os.memfd_create(f"vec-{step.handle}", flags)
        if step.data:
            os.pwrite(fd, step.data, 0)
        if step.size is not None:
            os.ftruncate(fd, step.size)
        if step.seals:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, step.seals)
        os.lseek(fd, step.pos, os.SEEK_SET)
        return {
            "op": "memfd",
            "handle": step.handle,
            "result": OK,
            "fd": self._bind(step.handle, fd),
        }

    def _other(self, handle: str, kind: str) -> None:
        if kind == "dev-null":
            self._bind(handle, os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC))
        elif kind == "pipe":
            r, w = os.pipe2(os.O_CLOEXEC)
            os.close(w)
            self._bind(handle, r)
        elif kind == "socket":
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            b.close()
            self._bind(handle, a.detach())
        elif kind == "regular":  # a linked file; read-only, so a read-only root will do
            self._bind(handle, os.open(sys.executable, os.O_RDONLY | os.O_CLOEXEC))
        else:
            raise ValueError(kind)

    def _ioctl(self, step: Ioctl) -> dict[str, Any]:
        buf = bytearray()
        marks: dict[int, tuple[str, int]] = {}
        for segment in step.arg:
            if isinstance(segment, Fd):
                fd = self._fd(segment.handle)
                marks[len(buf)] = (segment.handle, fd)
                buf += struct.pack("<i", fd)
            else:
                buf += segment
        entry: dict[str, Any] = {
            "op": "ioctl",
            "handle": step.handle,
            "what": step.what,
            "request": f"{step.request:#x}",
        }
        try:
            if step.no_free_fd:
                with _no_free_fd():
                    rc = self.sc.ioctl(self._fd(step.handle), step.request, buf)
            else:
                rc = self.sc.ioctl(self._fd(step.handle), step.request, buf)
        except OSError as exc:
            entry |= {"result": _errname(exc), "rc": -1, "arg": _render(bytes(buf), marks)}
            return entry
        entry |= {"result": OK, "rc": rc}
        if step.out_fd is not None:
            offset, new = step.out_fd
            fd = struct.unpack_from("<i", buf, offset)[0]
            new = self._unused(new)
            marks[offset] = (new, fd)
            entry["new"] = {new: self._bind(new, fd)}
        entry["arg"] = _render(bytes(buf), marks)
        return entry


# ---------------------------------------------------------------------------- stages and kexec


def _stage_names(vector: Vector) -> tuple[str, str]:
    return f"{vector.name}/1", f"{vector.name}/2"


def run_stage1(
    sc: Syscalls,
    vectors: Sequence[Vector],
    after_vector: Callable[[str], None] | None = None,
) -> tuple[dict[str, list[dict[str, Any]]], list[Live]]:
    """Every plain vector, then the first half of every kexec vector.  Returns the traces and
    the fds the kexec halves keep open (their sessions must live until the reboot)."""
    runner = Runner(sc)
    traces: dict[str, list[dict[str, Any]]] = {}
    for vector in vectors:
        if not vector.kexec:
            traces[vector.name] = runner.run(vector.name, vector.steps)
            if after_vector is not None:
                after_vector(vector.name)
    kept: list[Live] = []
    for vector in vectors:
        if vector.kexec:
            first, _second = _stage_names(vector)
            traces[first] = runner.run(first, vector.steps, keep=True)
            kept += runner.kept().values()
    return traces, kept


def run_stage2(
    sc: Syscalls,
    vectors: Sequence[Vector],
    after_vector: Callable[[str], None] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    runner = Runner(sc)
    traces: dict[str, list[dict[str, Any]]] = {}
    for vector in vectors:
        if vector.kexec:
            _first, second = _stage_names(vector)
            traces[second] = runner.run(second, vector.after_kexec)
            if after_vector is not None:
                after_vector(second)
    return traces


def close_kept(sc: Syscalls, kept: Iterable[Live]) -> None:
    for live in reversed(list(kept)):
        try:
            sc.close(live.fd)
        except OSError:
            pass


def kexec(sc: Syscalls, image: str, cmdline: str) -> None:
    """kexec_file_load + reboot(LINUX_REBOOT_CMD_KEXEC).  On a real kernel this does not return."""
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        sc.kexec_file_load(fd, -1, cmdline, 0)
    finally:
        os.close(fd)
    sc.reboot_kexec()


def run_emulated_all(
    machine: Any,
    vectors: Sequence[Vector] | None = None,
    image: str | None = None,
    cmdline: str = "luo_emu liveupdate=1 vectors",
    after_vector: Callable[[str], None] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Stage 1, the emulated kexec (the machine goes down and boots again), stage 2."""
    vectors = all_vectors() if vectors is None else vectors
    sc = machine.syscalls
    traces, kept = run_stage1(sc, vectors, after_vector)
    with tempfile.TemporaryDirectory() as tmp:
        if image is None:
            image = str(Path(tmp) / "vmlinuz")
            Path(image).write_bytes(b"MZ not really a kernel\n" * 64)
        kexec(sc, image, cmdline)
    machine.wait_down(10.0)
    close_kept(sc, kept)  # the old boot's fds: that process would be gone
    machine.boot()
    traces |= run_stage2(sc, vectors, after_vector)
    return traces


# ---------------------------------------------------------------------------- comparing


def _vectors_of(trace: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    got = trace.get("vectors", trace)
    assert isinstance(got, dict)
    return got


def compare(trace_a: dict[str, Any], trace_b: dict[str, Any]) -> list[str]:
    """Human-readable differences between two traces (whole run documents or their "vectors")."""
    a, b = _vectors_of(trace_a), _vectors_of(trace_b)
    diffs: list[str] = []
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            diffs.append(f"{name}: only in {'A' if name in a else 'B'}")
            continue
        steps_a, steps_b = a[name], b[name]
        if len(steps_a) != len(steps_b):
            diffs.append(f"{name}: {len(steps_a)} steps in A, {len(steps_b)} in B")
        for index, (sa, sb) in enumerate(zip(steps_a, steps_b, strict=False)):
            label = f"{name} step {index} ({sa.get('op')} {sa.get('what', sa.get('handle', ''))})"
            diffs += [f"{label}: {d}" for d in _diff(sa, sb, "")]
    return diffs


def _diff(x: Any, y: Any, path: str) -> list[str]:
    if isinstance(x, dict) and isinstance(y, dict):
        out: list[str] = []
        for key in sorted(set(x) | set(y), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in x or key not in y:
                out.append(f"{where}: {x.get(key, '<absent>')!r} != {y.get(key, '<absent>')!r}")
            else:
                out += _diff(x[key], y[key], where)
        return out
    if x != y:
        return [f"{path or 'value'}: {x!r} != {y!r}"]
    return []


def _load(paths: str) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for path in paths.split(","):
        merged |= _vectors_of(json.loads(Path(path).read_text()))
    return merged


# ---------------------------------------------------------------------------- CLI


def _document(stage: str, emulated: bool, traces: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "stage": stage,
        "kernel": "emulated" if emulated else os.uname().release,
        "vectors": traces,
    }


def _write(path: str, document: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(document, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _emulated_machine(root: str, profile: str) -> Any:
    from luo_agent.kernel.emulator import EmulatedMachine

    known = (Path(root) / ".luo-emu" / "machine.json").exists()
    machine = EmulatedMachine(root, None if known else Abi.SESSION, None if known else profile)
    if not machine.running:
        machine.boot()
    return machine


def _run(args: argparse.Namespace) -> int:
    vectors = all_vectors()
    if args.emulated:
        machine = _emulated_machine(args.emulated, args.profile)
        if args.stage == "all":
            cmdline = args.append or "luo_emu liveupdate=1 vectors"
            traces = run_emulated_all(machine, vectors, args.kexec, cmdline)
            machine.poweroff()
            _write(args.out, _document("all", True, traces))
            return 0
        sc: Syscalls = machine.syscalls
    else:
        if args.stage == "all":
            print(
                "real kernel: run --stage 1 --kexec, then --stage 2 in the next boot",
                file=sys.stderr,
            )
            return 2
        machine = None
        sc = RealSyscalls()
    if args.stage == "2":
        _write(args.out, _document("2", machine is not None, run_stage2(sc, vectors)))
        if machine is not None:
            machine.poweroff()
        return 0
    traces, kept = run_stage1(sc, vectors)
    _write(args.out, _document("1", machine is not None, traces))
    if args.kexec is None:
        close_kept(sc, kept)
        if machine is not None:
            machine.poweroff()
        return 0
    cmdline = args.append or Path(sc.path("/proc/cmdline")).read_text().strip()
    kexec(sc, args.kexec, cmdline)  # the real kernel never returns from this
    if machine is not None:
        machine.wait_down(10.0)  # the next `--stage 2 --emulated ROOT` boots it again
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.kernel.vectors", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the vectors, write a JSON trace")
    run.add_argument("--stage", choices=["1", "2", "all"], required=True)
    run.add_argument("--out", required=True)
    run.add_argument("--emulated", metavar="ROOT", help="an emulated machine instead of the kernel")
    run.add_argument("--profile", default="g6", help="session profile of a new emulated machine")
    run.add_argument("--kexec", metavar="BZIMAGE", help="after stage 1: kexec into this kernel")
    run.add_argument("--append", help="its command line (default: this boot's /proc/cmdline)")
    cmp = commands.add_parser("compare", help="print the differences of two traces")
    cmp.add_argument("a", help="trace file(s), comma-separated (merged)")
    cmp.add_argument("b")
    args = parser.parse_args(argv)
    if args.command == "compare":
        diffs = compare(_load(args.a), _load(args.b))
        for line in diffs:
            print(line)
        return 1 if diffs else 0
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
