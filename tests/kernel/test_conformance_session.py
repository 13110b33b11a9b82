"""G5 (Linux 6.19) and G6 session ABI conformance, raw bytes only (kernel-abi.md §1.2, §7, §9, §10).

``session_target`` runs on the emulated 6.19 and g6 kernels and on a real session kernel;
``session_machine`` (emulated only) is for everything that needs a kexec: reboot_kexec, then
boot() again is the "new kernel".
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import resource
import struct
from pathlib import Path

import pytest

from luo_agent.kernel.uapi import _IO, _IOW, _IOWR, session
from tests.kernel.luo_raw import (
    Target,
    cloexec,
    create_session,
    create_session_buf,
    errno_of,
    finish,
    get_name,
    ioctl_errno,
    kexec_reboot,
    memfd,
    name_bytes,
    preserve_fd,
    read_all,
    retrieve_fd,
    retrieve_session,
)

CREATE = session.LIVEUPDATE_IOCTL_CREATE_SESSION
RETRIEVE = session.LIVEUPDATE_IOCTL_RETRIEVE_SESSION
PRESERVE_FD = session.LIVEUPDATE_SESSION_PRESERVE_FD
RETRIEVE_FD = session.LIVEUPDATE_SESSION_RETRIEVE_FD
FINISH = session.LIVEUPDATE_SESSION_FINISH
GET_NAME = session.LIVEUPDATE_SESSION_GET_NAME


def new_session(t: Target, dev: int, name: str | bytes) -> int:
    return t.track(create_session(t.sc, dev, name))


# ------------------------------------------------------------------ open / close (§7.1)


def test_basic_open_close(session_target: Target) -> None:
    t = session_target
    t.close(t.open_device(os.O_RDWR))


def test_exclusive_open(session_target: Target) -> None:
    t = session_target
    dev = t.open_device()
    assert errno_of(t.open_device) == errno.EBUSY
    t.close(dev)
    t.close(t.open_device())  # free again once the holder closed


def test_closing_the_device_leaves_sessions_alone(session_target: Target) -> None:
    t = session_target
    dev = t.open_device()
    sess = new_session(t, dev, "outlives-device")
    t.close(dev)
    m = memfd(b"still preservable")
    try:
        preserve_fd(t.sc, sess, m, 1)
    finally:
        os.close(m)
    dev = t.open_device()
    assert ioctl_errno(t, dev, CREATE, create_session_buf("outlives-device")) == errno.EEXIST


def test_session_fd_is_cloexec(session_target: Target) -> None:
    t = session_target
    sess = new_session(t, t.open_device(), "cloexec")
    assert cloexec(sess)


# ------------------------------------------------------------------ CREATE_SESSION (§7.2)


def test_create_duplicate_session(session_target: Target) -> None:
    t = session_target
    dev = t.open_device()
    new_session(t, dev, "dup")
    assert ioctl_errno(t, dev, CREATE, create_session_buf("dup")) == errno.EEXIST


def test_create_distinct_sessions(session_target: Target) -> None:
    t = session_target
    dev = t.open_device()
    a, b = new_session(t, dev, "a"), new_session(t, dev, "b")
    assert a != b and a >= 0 and b >= 0


def test_closed_outgoing_session_name_is_free_again(session_target: Target) -> None:
    t = session_target
    dev = t.open_device()
    t.close(new_session(t, dev, "reuse"))
    new_session(t, dev, "reuse")


def test_session_survives_while_any_reference_is_open(session_target: Target) -> None:
    """Only the last close counts (dup here; fork and SCM_RIGHTS are the same reference)."""
    t = session_target
    dev = t.open_device()
    sess = create_session(t.sc, dev, "dup-ref")
    dup = t.track(os.dup(sess))
    os.close(sess)
    assert ioctl_errno(t, dev, CREATE, create_session_buf("dup-ref")) == errno.EEXIST
    m = memfd(b"x")
    try:
        preserve_fd(t.sc, dup, m, 5)
    finally:
        os.close(m)
    t.close(dup)
    new_session(t, dev, "dup-ref")  # last reference gone: the session was removed


def test_name_validation(session_target: Target) -> None:
    """6.19: no validation (empty accepted, unterminated truncated to 63); G6: EINVAL (§7.2, §9)."""
    t = session_target
    dev = t.open_device()
    if t.g6:
        assert ioctl_errno(t, dev, CREATE, create_session_buf(b"")) == errno.EINVAL
        assert ioctl_errno(t, dev, CREATE, create_session_buf(b"X" * 64)) == errno.EINVAL
        new_session(t, dev, b"A" * 63)
    else:
        new_session(t, dev, b"")
        new_session(t, dev, b"X" * 64)
        # strscpy truncated it to 63 'X': that name is now taken.
        assert ioctl_errno(t, dev, CREATE, create_session_buf(b"X" * 63)) == errno.EEXIST


# ------------------------------------------------------------------ PRESERVE_FD (§7.3)


def test_preserve_memfd_then_close_session(session_target: Target) -> None:
    """Selftest preserve_memfd: closing the session unpreserves; the memfd is intact."""
    t = session_target
    dev = t.open_device()
    sess = new_session(t, dev, "preserve_memfd")
    m = memfd(b"Live update test data " * 100)
    try:
        preserve_fd(t.sc, sess, m, 0x1234)
        t.close(sess)
        assert read_all(m) == b"Live update test data " * 100
        # Unpreserved: the same file can go into a new session (G6 would say EBUSY otherwise).
        preserve_fd(t.sc, new_session(t, dev, "again"), m, 0x1234)
    finally:
        os.close(m)


def test_preserve_multiple_memfds(session_target: Target) -> None:
    t = session_target
    sess = new_session(t, t.open_device(), "multi")
    m1, m2 = memfd(b"first memfd " * 10), memfd(b"second memfd " * 20)
    try:
        preserve_fd(t.sc, sess, m1, 0xAAAA)
        preserve_fd(t.sc, sess, m2, 0xBBBB)
        assert read_all(m1) == b"first memfd " * 10
        assert read_all(m2) == b"second memfd " * 20
    finally:
        os.close(m1)
        os.close(m2)


def test_preserve_complex_scenario(session_target: Target) -> None:
    t = session_target
    dev = t.open_device()
    fds: list[int] = []
    try:
        for name in ("complex-1", "complex-2"):
            sess = new_session(t, dev, name)
            empty, filled = memfd(), memfd(f"data of {name}".encode())
            fds += [empty, filled]
            preserve_fd(t.sc, sess, empty, 1)
            preserve_fd(t.sc, sess, filled, 2)
        for i, name in enumerate(("complex-1", "complex-2")):
            assert read_all(fds[2 * i]) == b""
            assert read_all(fds[2 * i + 1]) == f"data of {name}".encode()
        for fd in list(t.opened):
            t.close(fd)
    finally:
        for fd in fds:
            os.close(fd)


def _unsupported_fd(kind: str, tmp_path: Path) -> tuple[int, ...]:
    if kind == "dev-null":
        return (os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC),)
    if kind == "regular-file":
        path = tmp_path / "regular"
        path.write_bytes(b"on disk")
        return (os.open(path, os.O_RDWR | os.O_CLOEXEC),)
    r, w = os.pipe2(os.O_CLOEXEC)
    return (r, w)


@pytest.mark.parametrize("kind", ["dev-null", "regular-file", "pipe"])
def test_preserve_unsupported_fd(session_target: Target, tmp_path: Path, kind: str) -> None:
    t = session_target
    sess = new_session(t, t.open_device(), "unsupported")
    fds = _unsupported_fd(kind, tmp_path)
    try:
        buf = bytearray(session.liveupdate_session_preserve_fd(size=16, fd=fds[0], token=9))
        assert ioctl_errno(t, sess, PRESERVE_FD, buf) == errno.ENOENT
    finally:
        for fd in fds:
            os.close(fd)


def test_preserve_fd_errno_table_and_check_order(session_target: Target) -> None:
    t = session_target
    dev = t.open_device()
    sess, other = new_session(t, dev, "errnos"), new_session(t, dev, "other")
    m, m2 = memfd(b"a"), memfd(b"b")
    closed = memfd()
    os.close(closed)
    try:
        preserve_fd(t.sc, sess, m, 0)  # token 0 is legal
        preserve_fd(t.sc, other, m2, 0)  # tokens are per session
        # 1. token already used in this session -> EEXIST, even with a bad fd (checked first)
        assert ioctl_errno(t, sess, PRESERVE_FD, struct.pack("<IiQ", 16, m2, 0)) == errno.EEXIST
        assert ioctl_errno(t, sess, PRESERVE_FD, struct.pack("<IiQ", 16, -1, 0)) == errno.EEXIST
        # 3. fd not open -> EBADF
        assert ioctl_errno(t, sess, PRESERVE_FD, struct.pack("<IiQ", 16, closed, 1)) == errno.EBADF
        assert ioctl_errno(t, sess, PRESERVE_FD, struct.pack("<IiQ", 16, -1, 1)) == errno.EBADF
        # any u64 is a token
        m3 = memfd(b"c")
        try:
            preserve_fd(t.sc, sess, m3, 2**64 - 1)
        finally:
            os.close(m3)
    finally:
        os.close(m)
        os.close(m2)


def test_caller_may_close_its_fd_after_preserve(session_machine: Target, kexec_image: Path) -> None:
    t = session_machine
    sess = new_session(t, t.open_device(), "closed-after")
    m = memfd(b"LUO holds its own reference")
    preserve_fd(t.sc, sess, m, 3)
    os.close(m)
    kexec_reboot(t, kexec_image)
    inc = t.track(retrieve_session(t.sc, t.open_device(), "closed-after"))
    got = t.track(retrieve_fd(t.sc, inc, 3))
    assert read_all(got) == b"LUO holds its own reference"


def test_double_preservation(session_target: Target) -> None:
    """G6 prevent_double_preservation -> EBUSY.  6.19 behaviour is UNCONFIRMED in kernel-abi.md
    §9; the emulator's 6.19 profile accepts it (asserted here as the emulator documents)."""
    t = session_target
    if t.real and not t.g6:
        pytest.skip("6.19 double preservation is UNCONFIRMED; not probed on a real kernel")
    dev = t.open_device()
    s1, s2 = new_session(t, dev, "double-1"), new_session(t, dev, "double-2")
    m = memfd(b"once")
    try:
        preserve_fd(t.sc, s1, m, 1)
        if t.g6:
            assert ioctl_errno(t, s1, PRESERVE_FD, struct.pack("<IiQ", 16, m, 2)) == errno.EBUSY
            assert ioctl_errno(t, s2, PRESERVE_FD, struct.pack("<IiQ", 16, m, 1)) == errno.EBUSY
            dup = os.dup(m)  # another fd, same file: still the same file
            # another open file of the same inode: 7.2 keys its table by inode (memfd_luo_get_id)
            again = os.open(f"/proc/self/fd/{m}", os.O_RDWR | os.O_CLOEXEC)
            try:
                for other in (dup, again):
                    buf = struct.pack("<IiQ", 16, other, 3)
                    assert ioctl_errno(t, s2, PRESERVE_FD, buf) == errno.EBUSY
            finally:
                os.close(dup)
                os.close(again)
        else:
            preserve_fd(t.sc, s1, m, 2)
            preserve_fd(t.sc, s2, m, 1)
    finally:
        os.close(m)


# ------------------------------------------------------------------ dispatcher (§1.2)


@pytest.mark.parametrize("nr", [0x02, 0x03, 0x3F, 0x40, 0x41, 0xFF])
def test_device_nr_out_of_range_is_einval(session_target: Target, nr: int) -> None:
    t = session_target
    buf = bytearray(create_session_buf("nr-range"))
    assert ioctl_errno(t, t.open_device(), _IO(0xBA, nr), buf) == errno.EINVAL


def test_session_nr_out_of_range_is_einval(session_target: Target) -> None:
    t = session_target
    sess = new_session(t, t.open_device(), "nr-range")
    buf = bytearray(72)
    struct.pack_into("<I", buf, 0, 72)
    for nr in (0x00, 0x01, 0x3F, 0x44, 0x80, 0xFF):
        assert ioctl_errno(t, sess, _IO(0xBA, nr), buf) == errno.EINVAL, hex(nr)
    if not t.g6:
        assert ioctl_errno(t, sess, GET_NAME, buf) == errno.EINVAL  # 6.19 has three ops


@pytest.mark.parametrize(
    "req",
    [_IOWR(0xBA, 0, 72), _IOW(0xBA, 0, 72), _IO(0xBB, 0), _IO(0x00, 0)],
    ids=["IOWR-encoding", "IOW-encoding", "other-magic", "magic-0"],
)
def test_device_mismatched_request_is_enotty(session_target: Target, req: int) -> None:
    t = session_target
    dev = t.open_device()
    assert ioctl_errno(t, dev, req, create_session_buf("mismatch")) == errno.ENOTTY
    new_session(t, dev, "mismatch")  # nothing was created


def test_session_mismatched_request_is_enotty(session_target: Target) -> None:
    t = session_target
    sess = new_session(t, t.open_device(), "mismatch")
    m = memfd(b"m")
    try:
        for request in (_IOWR(0xBA, 0x40, 16), _IOW(0xBA, 0x40, 16), _IO(0xBC, 0x40)):
            buf = struct.pack("<IiQ", 16, m, 1)
            assert ioctl_errno(t, sess, request, buf) == errno.ENOTTY, hex(request)
        preserve_fd(t.sc, sess, m, 1)  # token 1 still free: nothing was preserved
    finally:
        os.close(m)


@pytest.mark.parametrize("size", [0, 4, 8, 64, 71])
def test_create_size_below_min_is_einval(session_target: Target, size: int) -> None:
    t = session_target
    buf = create_session_buf("short")
    struct.pack_into("<I", buf, 0, size)
    assert ioctl_errno(t, t.open_device(), CREATE, buf) == errno.EINVAL


def test_session_ops_size_below_min_is_einval(session_target: Target) -> None:
    t = session_target
    sess = new_session(t, t.open_device(), "short")
    m = memfd()
    try:
        assert ioctl_errno(t, sess, PRESERVE_FD, struct.pack("<IiQ", 15, m, 1)) == errno.EINVAL
        assert ioctl_errno(t, sess, PRESERVE_FD, struct.pack("<IiQ", 0, m, 1)) == errno.EINVAL
    finally:
        os.close(m)


def test_trailing_bytes_zero_ok_nonzero_e2big(session_target: Target) -> None:
    t = session_target
    dev = t.open_device()
    big = create_session_buf("trailing") + bytearray(24)
    struct.pack_into("<I", big, 0, 96)
    big[95] = 1
    assert ioctl_errno(t, dev, CREATE, big) == errno.E2BIG
    big[95] = 0
    assert t.sc.ioctl(dev, CREATE, big) == 0
    fd = t.track(struct.unpack_from("<i", big, 4)[0])
    assert fd >= 0 and cloexec(fd)
    # Copy-back is min(size, ksize): the zero tail stays as it was.
    assert big[72:] == bytes(24)
    assert ioctl_errno(t, dev, CREATE, create_session_buf("trailing")) == errno.EEXIST


def test_bytes_beyond_size_are_never_read_or_written(session_target: Target) -> None:
    """The kernel reads `size` bytes; garbage after them in the caller's buffer is not its
    business (a short-struct caller)."""
    t = session_target
    dev = t.open_device()
    buf = create_session_buf("beyond") + bytearray(b"\xff" * 16)
    assert t.sc.ioctl(dev, CREATE, buf) == 0
    t.track(struct.unpack_from("<i", buf, 4)[0])
    assert buf[72:] == b"\xff" * 16


def test_preserve_fd_zero_tail_accepted(session_target: Target) -> None:
    t = session_target
    sess = new_session(t, t.open_device(), "tail")
    m = memfd(b"t")
    try:
        assert ioctl_errno(t, sess, PRESERVE_FD, struct.pack("<IiQQ", 24, m, 1, 1)) == errno.E2BIG
        assert t.sc.ioctl(sess, PRESERVE_FD, bytearray(struct.pack("<IiQQ", 24, m, 1, 0))) == 0
    finally:
        os.close(m)


# ------------------------------------------------------------------ G6 GET_NAME / kinds (§9)


@pytest.mark.parametrize("name", ["get-name", "A" * 63, "é-ünïcode"])
def test_get_session_name(session_target: Target, name: str) -> None:
    t = session_target
    if not t.g6:
        pytest.skip("GET_NAME is G6 only (6.19: EINVAL, see test_session_nr_out_of_range)")
    sess = new_session(t, t.open_device(), name)
    assert get_name(t.sc, sess) == name.encode()


def test_get_name_quirks(session_target: Target) -> None:
    """Linux 7.2 luo_session_get_name: min_size 72 (EINVAL below), reserved != 0 is EINVAL,
    non-zero bytes past 72 are E2BIG; the name field's input bytes are not checked, and
    strscpy writes over them word by word on x86-64: the name, its NUL and zeros to the end of
    that 8-byte word (the rest is copied back as given)."""
    t = session_target
    if not t.g6:
        pytest.skip("G6 only")
    sess = new_session(t, t.open_device(), "quirk")
    for size in (8, 16, 71):
        short = bytearray(72)
        struct.pack_into("<I", short, 0, size)
        assert ioctl_errno(t, sess, GET_NAME, short) == errno.EINVAL, size
    buf = bytearray(b"\xaa" * 72)
    struct.pack_into("<II", buf, 0, 72, 1)
    assert ioctl_errno(t, sess, GET_NAME, buf) == errno.EINVAL
    long = bytearray(80)
    struct.pack_into("<I", long, 0, 80)
    long[79] = 1
    assert ioctl_errno(t, sess, GET_NAME, long) == errno.E2BIG
    struct.pack_into("<II", buf, 0, 72, 0)
    assert t.sc.ioctl(sess, GET_NAME, buf) == 0
    assert bytes(buf) == struct.pack("<II", 72, 0) + b"quirk\0\0\0" + b"\xaa" * 56
    long[79] = 0
    long[8:72] = b"\xbb" * 64
    assert t.sc.ioctl(sess, GET_NAME, long) == 0
    assert bytes(long[8:]) == b"quirk\0\0\0" + b"\xbb" * 56 + bytes(8)


def test_wrong_kind_ops_on_outgoing_session(session_target: Target) -> None:
    """RETRIEVE_FD and FINISH on an outgoing session -> EINVAL.  Enforced in G6; the emulator's
    6.19 profile enforces it too, as §7.3 asks ("fixed behaviour").  Never on a real 6.19: there
    the memfd handler would WARN."""
    t = session_target
    if t.real and not t.g6:
        pytest.skip("wrong-kind use triggers kernel WARNs on a real 6.19")
    sess = new_session(t, t.open_device(), "outgoing")
    m = memfd(b"o")
    try:
        preserve_fd(t.sc, sess, m, 1)
        assert ioctl_errno(t, sess, RETRIEVE_FD, struct.pack("<IiQ", 16, -1, 1)) == errno.EINVAL
        assert ioctl_errno(t, sess, FINISH, struct.pack("<II", 8, 0)) == errno.EINVAL
        if t.g6:
            # G6 order: request match (ENOTTY) < kind (EINVAL) < size/E2BIG.
            wrong_enc = _IOWR(0xBA, 0x41, 16)
            assert ioctl_errno(t, sess, wrong_enc, struct.pack("<IiQ", 16, -1, 1)) == errno.ENOTTY
            tail = struct.pack("<IiQQ", 24, -1, 1, 7)
            assert ioctl_errno(t, sess, RETRIEVE_FD, tail) == errno.EINVAL
            assert ioctl_errno(t, sess, FINISH, struct.pack("<I", 0) + bytes(4)) == errno.EINVAL
        else:
            # Emulator's 6.19: the (fixed-behaviour) kind check comes after the size checks.
            tail = struct.pack("<IiQQ", 24, -1, 1, 7)
            assert ioctl_errno(t, sess, RETRIEVE_FD, tail) == errno.E2BIG
    finally:
        os.close(m)


# ------------------------------------------------------------------ kexec (§7.4, §7.5, §10)


def test_retrieve_session_on_cold_boot_is_enoent(session_target: Target) -> None:
    t = session_target
    buf = struct.pack("<Ii64s", 72, -1, name_bytes("never-preserved"))
    assert ioctl_errno(t, t.open_device(), RETRIEVE, buf) == errno.ENOENT


def test_kexec_simple(session_machine: Target, kexec_image: Path) -> None:
    """Selftest luo_kexec_simple: state session + "test-session" holding one page written through
    mmap; /dev/liveupdate closed before the kexec; only session fds kept."""
    t = session_machine
    text = b"Hello from the old kernel!"
    dev = t.open_device()

    def stage() -> int:
        buf = bytearray(struct.pack("<Ii64s", 72, -1, name_bytes("kexec_simple_state")))
        try:
            t.sc.ioctl(dev, RETRIEVE, buf)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return 1
            raise
        state_sess = t.track(struct.unpack_from("<i", buf, 4)[0])
        got = t.track(retrieve_fd(t.sc, state_sess, 0))
        return int(read_all(got).decode())

    assert stage() == 1
    state_sess = new_session(t, dev, "kexec_simple_state")
    sess = new_session(t, dev, "test-session")
    page = mmap.PAGESIZE
    m, state_m = memfd(), memfd(b"2")
    try:
        os.ftruncate(m, page)
        with mmap.mmap(m, page) as mm:
            mm[: len(text)] = text
        preserve_fd(t.sc, sess, m, 0x1A)
        preserve_fd(t.sc, state_sess, state_m, 0)
    finally:
        os.close(m)
        os.close(state_m)
    t.close(dev)

    kexec_reboot(t, kexec_image)

    dev = t.open_device()
    assert stage() == 2
    inc = t.track(retrieve_session(t.sc, dev, "test-session"))
    got = t.track(retrieve_fd(t.sc, inc, 0x1A))
    assert os.fstat(got).st_size == page
    with mmap.mmap(got, page) as mm:
        assert mm[: len(text)] == text
        assert mm[len(text) :] == bytes(page - len(text))
    finish(t.sc, inc)
    for fd in list(t.opened):
        t.close(fd)


def test_multi_session(session_machine: Target, kexec_image: Path) -> None:
    """Selftest luo_multi_session: empty sessions are carried too; every session FINISHes."""
    t = session_machine
    dev = t.open_device()
    layout = {"empty-1": [], "empty-2": [], "one": [b"one-a"], "two": [b"two-a", b"two-b"]}
    for name, contents in layout.items():
        sess = new_session(t, dev, name)
        for token, data in enumerate(contents):
            m = memfd(data)
            preserve_fd(t.sc, sess, m, token)
            os.close(m)
    t.close(dev)
    kexec_reboot(t, kexec_image)
    dev = t.open_device()
    for name, contents in layout.items():
        inc = t.track(retrieve_session(t.sc, dev, name))
        assert cloexec(inc)
        for token, data in enumerate(contents):
            assert read_all(t.track(retrieve_fd(t.sc, inc, token))) == data
        finish(t.sc, inc)


def test_closed_sessions_are_not_carried(session_machine: Target, kexec_image: Path) -> None:
    t = session_machine
    dev = t.open_device()
    t.close(new_session(t, dev, "closed"))
    new_session(t, dev, "kept")
    kexec_reboot(t, kexec_image)
    dev = t.open_device()
    assert ioctl_errno(t, dev, RETRIEVE, struct.pack("<Ii64s", 72, -1, name_bytes("closed"))) == (
        errno.ENOENT
    )
    t.track(retrieve_session(t.sc, dev, "kept"))


def test_retrieve_session_errnos_and_incoming_close(
    session_machine: Target, kexec_image: Path
) -> None:
    """EINVAL while retrieved; close of a retrieved session = FINISH, then it is gone (ENOENT)."""
    t = session_machine
    dev = t.open_device()
    for name in ("finished", "closed-only"):
        m = memfd(name.encode())
        preserve_fd(t.sc, new_session(t, dev, name), m, 1)
        os.close(m)
    kexec_reboot(t, kexec_image)
    dev = t.open_device()
    for name in ("finished", "closed-only"):
        raw = struct.pack("<Ii64s", 72, -1, name_bytes(name))
        inc = retrieve_session(t.sc, dev, name)
        assert ioctl_errno(t, dev, RETRIEVE, raw) == errno.EINVAL  # already retrieved
        if name == "finished":
            finish(t.sc, inc)
        t.sc.close(inc)
        assert ioctl_errno(t, dev, RETRIEVE, raw) == errno.ENOENT


def test_retrieve_fd_semantics(session_machine: Target, kexec_image: Path) -> None:
    t = session_machine
    dev = t.open_device()
    sess = new_session(t, dev, "files")
    for token in (10, 20, 30):
        m = memfd(f"file {token}".encode(), flags=os.MFD_ALLOW_SEALING)
        fcntl.fcntl(m, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK)
        preserve_fd(t.sc, sess, m, token)
        os.close(m)
    kexec_reboot(t, kexec_image)
    inc = t.track(retrieve_session(t.sc, t.open_device(), "files"))
    assert ioctl_errno(t, inc, RETRIEVE_FD, struct.pack("<IiQ", 16, -1, 99)) == errno.ENOENT
    # any order
    f30 = t.track(retrieve_fd(t.sc, inc, 30))
    f10 = t.track(retrieve_fd(t.sc, inc, 10))
    assert (read_all(f30), read_all(f10)) == (b"file 30", b"file 10")
    assert cloexec(f30) and cloexec(f10)
    # idempotent: a new fd for the same open file (shared position)
    again = t.track(retrieve_fd(t.sc, inc, 10))
    assert again != f10
    os.lseek(f10, 3, os.SEEK_SET)
    assert os.lseek(again, 0, os.SEEK_CUR) == 3
    assert fcntl.fcntl(f10, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
    if t.g6:
        # Linux 7.2 memfd_luo_retrieve re-applies the seals recorded at PRESERVE.
        assert fcntl.fcntl(f10, fcntl.F_GET_SEALS) == fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK
    else:
        # The emulator's 6.19 profile carries no seals (kernel-abi.md §7.6).
        carried_seals = fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_WRITE
        assert fcntl.fcntl(f10, fcntl.F_GET_SEALS) & carried_seals == 0
    finish(t.sc, inc)
    finish(t.sc, inc)  # repeating FINISH returns 0
    # after FINISH the session has no files; token 20 was never retrieved and is discarded
    for token in (10, 20):
        assert ioctl_errno(t, inc, RETRIEVE_FD, struct.pack("<IiQ", 16, -1, token)) == errno.ENOENT
    # retrieved files stay usable
    assert read_all(f30) == b"file 30"


def test_finish_reserved(session_machine: Target, kexec_image: Path) -> None:
    """§1.2/§7.3: 6.19's FINISH never looks at `reserved`; 7.2's is EINVAL (luo_session.c:321)."""
    t = session_machine
    new_session(t, t.open_device(), "reserved")
    kexec_reboot(t, kexec_image)
    inc = t.track(retrieve_session(t.sc, t.open_device(), "reserved"))
    if t.g6:
        assert ioctl_errno(t, inc, FINISH, struct.pack("<II", 8, 0xDEAD)) == errno.EINVAL
        finish(t.sc, inc)
    else:
        finish(t.sc, inc, reserved=0xDEAD)


def test_retrieved_file_is_busy_until_finish(session_machine: Target, kexec_image: Path) -> None:
    """7.2: a retrieved file sits in luo_preserved_files until FINISH (luo_file.c:602, 702):
    preserving it into an outgoing session is EBUSY before, fine after."""
    t = session_machine
    if not t.g6:
        pytest.skip("G6 only")
    m = memfd(b"carried")
    preserve_fd(t.sc, new_session(t, t.open_device(), "busy-src"), m, 1)
    os.close(m)
    kexec_reboot(t, kexec_image)
    dev = t.open_device()
    inc = t.track(retrieve_session(t.sc, dev, "busy-src"))
    got = t.track(retrieve_fd(t.sc, inc, 1))
    out = new_session(t, dev, "busy-dst")
    assert ioctl_errno(t, out, PRESERVE_FD, struct.pack("<IiQ", 16, got, 1)) == errno.EBUSY
    finish(t.sc, inc)
    preserve_fd(t.sc, out, got, 1)


def test_retrieve_unterminated_name_is_enoent(session_machine: Target, kexec_image: Path) -> None:
    """7.2 luo_session_retrieve compares 64 bytes (strncmp): 63 matching bytes and no NUL do not
    match a 63-byte name."""
    t = session_machine
    if not t.g6:
        pytest.skip("G6 only")
    new_session(t, t.open_device(), b"N" * 63)
    kexec_reboot(t, kexec_image)
    dev = t.open_device()
    raw = struct.pack("<Ii64s", 72, -1, b"N" * 64)
    assert ioctl_errno(t, dev, RETRIEVE, raw) == errno.ENOENT
    t.track(retrieve_session(t.sc, dev, b"N" * 63))


def test_incoming_session_kind_rejects_preserve(session_machine: Target, kexec_image: Path) -> None:
    """G6 (and the emulator's 6.19, §7.3): PRESERVE_FD on an incoming session -> EINVAL."""
    t = session_machine
    new_session(t, t.open_device(), "incoming")
    kexec_reboot(t, kexec_image)
    inc = t.track(retrieve_session(t.sc, t.open_device(), "incoming"))
    m = memfd(b"i")
    try:
        assert ioctl_errno(t, inc, PRESERVE_FD, struct.pack("<IiQ", 16, m, 1)) == errno.EINVAL
    finally:
        os.close(m)
    if t.g6:
        assert get_name(t.sc, inc) == b"incoming"  # GET_NAME is valid on both kinds


def test_incoming_and_outgoing_names_are_separate(
    session_machine: Target, kexec_image: Path
) -> None:
    t = session_machine
    new_session(t, t.open_device(), "foo")
    kexec_reboot(t, kexec_image)
    dev = t.open_device()
    new_session(t, dev, "foo")  # outgoing "foo" while incoming "foo" exists
    t.track(retrieve_session(t.sc, dev, "foo"))


def test_unretrieved_incoming_session_is_not_carried_again(
    session_machine: Target, kexec_image: Path
) -> None:
    t = session_machine
    sess = new_session(t, t.open_device(), "left-behind")
    m = memfd(b"lost")
    preserve_fd(t.sc, sess, m, 1)
    os.close(m)
    kexec_reboot(t, kexec_image)
    t.close(t.open_device())  # deserializes, retrieves nothing
    kexec_reboot(t, kexec_image)
    raw = struct.pack("<Ii64s", 72, -1, name_bytes("left-behind"))
    assert ioctl_errno(t, t.open_device(), RETRIEVE, raw) == errno.ENOENT


def test_position_and_late_writes_are_carried(session_machine: Target, kexec_image: Path) -> None:
    """The file position is recorded at freeze (reboot), and writes after PRESERVE are carried."""
    t = session_machine
    sess = new_session(t, t.open_device(), "late")
    m = memfd(b"\0" * 8192)
    try:
        preserve_fd(t.sc, sess, m, 1)
        os.pwrite(m, b"written after preserve", 100)
        os.lseek(m, 4321, os.SEEK_SET)
        kexec_reboot(t, kexec_image)
    finally:
        os.close(m)
    inc = t.track(retrieve_session(t.sc, t.open_device(), "late"))
    got = t.track(retrieve_fd(t.sc, inc, 1))
    assert os.lseek(got, 0, os.SEEK_CUR) == 4321
    assert os.pread(got, 22, 100) == b"written after preserve"
    assert os.fstat(got).st_size == 8192


def test_frozen_size_is_carried(session_machine: Target, kexec_image: Path) -> None:
    """A preserved memfd's size is frozen (§7.6; 7.2 refuses resizes with EPERM, shmem_freeze).
    The emulator cannot refuse ftruncate; it documents that it carries exactly the size frozen at
    PRESERVE (cut or zero-filled) — asserted here."""
    t = session_machine
    sess = new_session(t, t.open_device(), "frozen")
    grown, shrunk = memfd(b"g" * 4096), memfd(b"s" * 4096)
    try:
        preserve_fd(t.sc, sess, grown, 1)
        preserve_fd(t.sc, sess, shrunk, 2)
        os.ftruncate(grown, 3 * 4096)
        os.ftruncate(shrunk, 100)
        kexec_reboot(t, kexec_image)
    finally:
        os.close(grown)
        os.close(shrunk)
    inc = t.track(retrieve_session(t.sc, t.open_device(), "frozen"))
    assert read_all(t.track(retrieve_fd(t.sc, inc, 1))) == b"g" * 4096
    assert read_all(t.track(retrieve_fd(t.sc, inc, 2))) == b"s" * 100 + bytes(4096 - 100)


def test_kexec_without_sessions_is_plain(session_machine: Target, kexec_image: Path) -> None:
    t = session_machine
    kexec_reboot(t, kexec_image, cmdline="luo_emu second-boot")
    raw = struct.pack("<Ii64s", 72, -1, name_bytes("anything"))
    assert ioctl_errno(t, t.open_device(), RETRIEVE, raw) == errno.ENOENT
    assert Path(t.sc.path("/proc/cmdline")).read_text() == "luo_emu second-boot\n"


def test_reboot_without_loaded_image_is_einval(session_machine: Target) -> None:
    t = session_machine
    assert errno_of(t.sc.reboot_kexec) == errno.EINVAL
    assert t.machine.running


def test_failed_reboot_keeps_sessions(session_machine: Target, kexec_image: Path) -> None:
    """§7.5: a failing liveupdate_reboot() rolls back and reboot() returns the error (EAGAIN)."""
    t = session_machine
    sess = new_session(t, t.open_device(), "survivor")
    m = memfd(b"kept")
    preserve_fd(t.sc, sess, m, 1)
    os.close(m)
    fd = os.open(kexec_image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        t.sc.kexec_file_load(fd, -1, "luo_emu", 0)
    finally:
        os.close(fd)
    t.machine.inject_fault("reboot", errno.EAGAIN)
    assert errno_of(t.sc.reboot_kexec) == errno.EAGAIN
    assert t.machine.running
    m2 = memfd(b"still open")
    try:
        preserve_fd(t.sc, sess, m2, 2)
    finally:
        os.close(m2)
    kexec_reboot(t, kexec_image)
    inc = t.track(retrieve_session(t.sc, t.open_device(), "survivor"))
    assert read_all(t.track(retrieve_fd(t.sc, inc, 1))) == b"kept"


def test_corrupt_handover_makes_every_open_eio(session_machine: Target, kexec_image: Path) -> None:
    """§7.1: failed deserialization -> every open of /dev/liveupdate returns EIO."""
    t = session_machine
    machine = t.machine
    new_session(t, t.open_device(), "doomed")
    fd = os.open(kexec_image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        t.sc.kexec_file_load(fd, -1, "luo_emu", 0)
    finally:
        os.close(fd)
    t.sc.reboot_kexec()
    machine.wait_down(10.0)
    t.close_all()
    image = Path(t.sc.path("/")) / ".luo-emu" / "handover.img"
    raw = bytearray(image.read_bytes())
    image.write_bytes(bytes(raw[: len(raw) // 2]))  # truncated
    machine.boot()
    assert errno_of(t.open_device) == errno.EIO
    assert errno_of(t.open_device) == errno.EIO


def test_no_sysfs_state_file(session_target: Target) -> None:
    """§7.1/§11: sysfs `state` was removed in G4; a session kernel has none."""
    t = session_target
    assert not os.path.exists(t.sc.path("/sys/kernel/liveupdate/state"))


def test_create_session_without_a_free_fd_is_emfile(session_target: Target) -> None:
    """§7.2: EMFILE when no fd can be installed; the session must not be left behind."""
    t = session_target
    dev = t.open_device()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    probe = os.dup(0)
    os.close(probe)
    resource.setrlimit(resource.RLIMIT_NOFILE, (probe, hard))  # every fd >= probe is refused
    try:
        err = ioctl_errno(t, dev, CREATE, create_session_buf("no-fd"))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert err == errno.EMFILE
    new_session(t, dev, "no-fd")


def test_the_new_fd_is_taken_before_any_check(session_target: Target) -> None:
    """7.2 calls get_unused_fd_flags first (luo_core.c:276, 306): with no free fd an empty name,
    a duplicate name and an unknown session are all EMFILE."""
    t = session_target
    if not t.g6:
        pytest.skip("G6 (Linux 7.2) only")
    dev = t.open_device()
    new_session(t, dev, "taken")
    bufs = [
        (CREATE, create_session_buf(b"")),
        (CREATE, create_session_buf("taken")),
        (RETRIEVE, bytearray(struct.pack("<Ii64s", 72, -1, name_bytes("no-such")))),
    ]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    probe = os.dup(0)
    os.close(probe)
    resource.setrlimit(resource.RLIMIT_NOFILE, (probe, hard))
    try:
        errs = [ioctl_errno(t, dev, request, buf) for request, buf in bufs]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert errs == [errno.EMFILE] * 3


def test_open_without_a_running_kernel_is_enoent(session_machine: Target) -> None:
    """Machine down = a kernel without LUO: open -> ENOENT (selftests SKIP on it)."""
    t = session_machine
    t.machine.poweroff()
    assert errno_of(t.open_device) == errno.ENOENT
