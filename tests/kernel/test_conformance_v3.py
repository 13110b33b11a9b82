"""G3 (``[PATCH v3]``) conformance, raw bytes only (kernel-abi.md §1.2, §5, §11).

FROZEN is not reachable on G3 without the debugfs selftest file (FREEZE happens only inside
reboot(), and SET_EVENT refuses FREEZE), so the FROZEN row of §5.3 is covered by rfc-v2.
"""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import pytest

from luo_agent.errors import HandoverCorrupt
from luo_agent.kernel.uapi import _IO, _IOWR, rfc_v2, v3
from tests.kernel.luo_raw import (
    Target,
    cloexec,
    errno_of,
    ioctl_errno,
    kexec_reboot,
    memfd,
    read_all,
    v3_get_state,
    v3_preserve,
    v3_restore,
    v3_set_event,
)

S = v3.liveupdate_state
E = v3.liveupdate_event
PRESERVE = v3.LIVEUPDATE_IOCTL_FD_PRESERVE
UNPRESERVE = v3.LIVEUPDATE_IOCTL_FD_UNPRESERVE
RESTORE = v3.LIVEUPDATE_IOCTL_FD_RESTORE
GET_STATE = v3.LIVEUPDATE_IOCTL_GET_STATE
SET_EVENT = v3.LIVEUPDATE_IOCTL_SET_EVENT


def event_errno(t: Target, dev: int, event: int) -> int:
    return ioctl_errno(t, dev, SET_EVENT, struct.pack("<II", 8, event))


def assert_state(t: Target, dev: int, state: S) -> None:
    assert v3_get_state(t.sc, dev) == state
    assert t.sysfs_state() == v3.STATE_STRINGS[state] + "\n"


# ------------------------------------------------------------------ open / close (§5.1)


def test_fresh_system_is_normal(v3_target: Target) -> None:
    t = v3_target
    assert_state(t, t.open_device(), S.LIVEUPDATE_STATE_NORMAL)


def test_exclusive_open(v3_target: Target) -> None:
    t = v3_target
    dev = t.open_device()
    assert errno_of(t.open_device) == errno.EBUSY
    t.close(dev)
    t.close(t.open_device())


def test_o_excl_is_not_special(v3_target: Target) -> None:
    """§5.1: no O_EXCL handling in G3 (G1/G2 said EINVAL)."""
    t = v3_target
    t.close(t.open_device(os.O_RDWR | os.O_CLOEXEC | os.O_EXCL))


def test_close_drops_all_preserved_fds(v3_target: Target) -> None:
    t = v3_target
    dev = t.open_device()
    m = memfd(b"dropped on close")
    try:
        v3_preserve(t.sc, dev, m, 7)
        t.close(dev)
        dev = t.open_device()
        assert ioctl_errno(t, dev, UNPRESERVE, struct.pack("<IIQ", 16, 0, 7)) == errno.ENOENT
        v3_preserve(t.sc, dev, m, 7)  # the token is free again
        assert read_all(m) == b"dropped on close"
    finally:
        os.close(m)


def test_close_in_prepared_keeps_the_state(v3_machine: Target, kexec_image: Path) -> None:
    """§5.1: release unregisters every fd; the global state is not changed (inferred,
    UNCONFIRMED) — the emulator keeps PREPARED, so the kexec carries an empty set."""
    t = v3_machine
    dev = t.open_device()
    m = memfd(b"x")
    v3_preserve(t.sc, dev, m, 1)
    os.close(m)
    v3_set_event(t.sc, dev, E.LIVEUPDATE_PREPARE)
    t.close(dev)
    assert t.sysfs_state() == "prepared\n"
    kexec_reboot(t, kexec_image)
    dev = t.open_device()
    assert_state(t, dev, S.LIVEUPDATE_STATE_UPDATED)
    assert ioctl_errno(t, dev, RESTORE, struct.pack("<IiQ", 16, -1, 1)) == errno.ENOENT


# ------------------------------------------------------------------ state machine (§5.3)

# (start state, event, errno or 0, state after)
NORMAL, PREPARED, UPDATED = (
    S.LIVEUPDATE_STATE_NORMAL,
    S.LIVEUPDATE_STATE_PREPARED,
    S.LIVEUPDATE_STATE_UPDATED,
)
TABLE = [
    (NORMAL, E.LIVEUPDATE_PREPARE, 0, PREPARED),
    (NORMAL, E.LIVEUPDATE_FREEZE, errno.EINVAL, NORMAL),  # SET_EVENT never accepts FREEZE
    # CANCEL in NORMAL: the doc allows a KHO errno first (UNCONFIRMED); the emulator says EINVAL.
    (NORMAL, E.LIVEUPDATE_CANCEL, errno.EINVAL, NORMAL),
    (NORMAL, E.LIVEUPDATE_FINISH, errno.EINVAL, NORMAL),
    (PREPARED, E.LIVEUPDATE_PREPARE, errno.EINVAL, PREPARED),
    (PREPARED, E.LIVEUPDATE_FREEZE, errno.EINVAL, PREPARED),
    (PREPARED, E.LIVEUPDATE_CANCEL, 0, NORMAL),
    (PREPARED, E.LIVEUPDATE_FINISH, errno.EINVAL, PREPARED),
    (UPDATED, E.LIVEUPDATE_PREPARE, errno.EINVAL, UPDATED),
    (UPDATED, E.LIVEUPDATE_FREEZE, errno.EINVAL, UPDATED),
    (UPDATED, E.LIVEUPDATE_CANCEL, errno.EINVAL, UPDATED),  # same KHO caveat as above
    (UPDATED, E.LIVEUPDATE_FINISH, 0, NORMAL),
]


def _ids(row: tuple[S, E, int, S]) -> str:
    return f"{row[0].name[18:]}-{row[1].name[11:]}"


@pytest.mark.parametrize("row", [r for r in TABLE if r[0] != UPDATED], ids=_ids)
def test_state_table(v3_target: Target, row: tuple[S, E, int, S]) -> None:
    start, event, err, after = row
    t = v3_target
    dev = t.open_device()
    if start == PREPARED:
        v3_set_event(t.sc, dev, E.LIVEUPDATE_PREPARE)
    assert_state(t, dev, start)
    if err:
        assert event_errno(t, dev, event) == err
    else:
        v3_set_event(t.sc, dev, event)
    assert_state(t, dev, after)


@pytest.mark.parametrize("row", [r for r in TABLE if r[0] == UPDATED], ids=_ids)
def test_state_table_updated(
    v3_machine: Target, kexec_image: Path, row: tuple[S, E, int, S]
) -> None:
    _start, event, err, after = row
    t = v3_machine
    v3_set_event(t.sc, t.open_device(), E.LIVEUPDATE_PREPARE)
    kexec_reboot(t, kexec_image)
    dev = t.open_device()
    assert_state(t, dev, UPDATED)
    if err:
        assert event_errno(t, dev, event) == err
    else:
        v3_set_event(t.sc, dev, event)
    assert_state(t, dev, after)


@pytest.mark.parametrize("event", [4, 5, 0x100, 0xFFFFFFFF])
def test_unknown_event_is_einval(v3_target: Target, event: int) -> None:
    t = v3_target
    dev = t.open_device()
    assert event_errno(t, dev, event) == errno.EINVAL
    assert_state(t, dev, NORMAL)


def test_failing_prepare_callback_leaves_normal(v3_machine: Target) -> None:
    """Selftest 6 (G1/G2 era): a failing prepare returns the error, state stays NORMAL; a retry
    then works."""
    t = v3_machine
    dev = t.open_device()
    t.machine.inject_fault("EVENT_PREPARE", errno.EIO)
    assert event_errno(t, dev, E.LIVEUPDATE_PREPARE) == errno.EIO
    assert_state(t, dev, NORMAL)
    v3_set_event(t.sc, dev, E.LIVEUPDATE_PREPARE)
    assert_state(t, dev, PREPARED)
    v3_set_event(t.sc, dev, E.LIVEUPDATE_CANCEL)
    assert_state(t, dev, NORMAL)


# ------------------------------------------------------------------ kexec (§5.3)


def test_kexec_from_prepared_starts_updated_with_the_files(
    v3_machine: Target, kexec_image: Path
) -> None:
    t = v3_machine
    dev = t.open_device()
    m1, m2 = memfd(b"restored"), memfd(b"never restored")
    try:
        v3_preserve(t.sc, dev, m1, 1)
        v3_preserve(t.sc, dev, m2, 2)
        v3_set_event(t.sc, dev, E.LIVEUPDATE_PREPARE)
        kexec_reboot(t, kexec_image)
    finally:
        os.close(m1)
        os.close(m2)
    dev = t.open_device()
    assert_state(t, dev, UPDATED)
    assert ioctl_errno(t, dev, RESTORE, struct.pack("<IiQ", 16, -1, 99)) == errno.ENOENT
    got = t.track(v3_restore(t.sc, dev, 1))
    assert cloexec(got)
    assert read_all(got) == b"restored"
    # Restoring the same token twice: doc silent; the emulator documents EINVAL.
    assert ioctl_errno(t, dev, RESTORE, struct.pack("<IiQ", 16, -1, 1)) == errno.EINVAL
    # Preserve is allowed in UPDATED (§5.5).
    m3 = memfd(b"next round")
    try:
        v3_preserve(t.sc, dev, m3, 3)
    finally:
        os.close(m3)
    v3_set_event(t.sc, dev, E.LIVEUPDATE_FINISH)
    assert_state(t, dev, NORMAL)
    # FINISH discarded token 2.  RESTORE outside UPDATED: doc silent; the emulator checks the
    # state first and documents EBUSY.
    assert ioctl_errno(t, dev, RESTORE, struct.pack("<IiQ", 16, -1, 2)) == errno.EBUSY
    assert read_all(got) == b"restored"


def test_kexec_from_normal_carries_nothing(v3_machine: Target, kexec_image: Path) -> None:
    t = v3_machine
    m = memfd(b"not carried")
    try:
        v3_preserve(t.sc, t.open_device(), m, 1)
        kexec_reboot(t, kexec_image)
    finally:
        os.close(m)
    assert_state(t, t.open_device(), NORMAL)


def test_kexec_from_unfinished_updated_carries_nothing(
    v3_machine: Target, kexec_image: Path
) -> None:
    t = v3_machine
    dev = t.open_device()
    m = memfd(b"x")
    v3_preserve(t.sc, dev, m, 1)
    os.close(m)
    v3_set_event(t.sc, dev, E.LIVEUPDATE_PREPARE)
    kexec_reboot(t, kexec_image)
    assert_state(t, t.open_device(), UPDATED)
    kexec_reboot(t, kexec_image)
    assert_state(t, t.open_device(), NORMAL)


def test_corrupt_handover_panics(v3_machine: Target, kexec_image: Path) -> None:
    """§5.3/§4.3: incompatible LUO data -> panic; the emulator's boot() raises HandoverCorrupt
    and leaves the machine down."""
    t = v3_machine
    dev = t.open_device()
    v3_set_event(t.sc, dev, E.LIVEUPDATE_PREPARE)
    fd = os.open(kexec_image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        t.sc.kexec_file_load(fd, -1, "luo_emu", 0)
    finally:
        os.close(fd)
    t.sc.reboot_kexec()
    t.machine.wait_down(10.0)
    t.close_all()
    image = Path(t.sc.path("/")) / ".luo-emu" / "handover.img"
    raw = bytearray(image.read_bytes())
    raw[-1] ^= 0xFF
    image.write_bytes(bytes(raw))
    with pytest.raises(HandoverCorrupt):
        t.machine.boot()
    assert not t.machine.running


# ------------------------------------------------------------------ fd preservation (§5.5)


@pytest.mark.parametrize("kind", ["dev-null", "regular-file", "pipe"])
def test_preserve_unsupported_fd(v3_target: Target, tmp_path: Path, kind: str) -> None:
    t = v3_target
    if kind == "dev-null":
        fds = [os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)]
    elif kind == "regular-file":
        (tmp_path / "f").write_bytes(b"x")
        fds = [os.open(tmp_path / "f", os.O_RDWR | os.O_CLOEXEC)]
    else:
        fds = list(os.pipe2(os.O_CLOEXEC))
    try:
        buf = struct.pack("<IiQ", 16, fds[0], 1)
        assert ioctl_errno(t, t.open_device(), PRESERVE, buf) == errno.ENOENT
    finally:
        for fd in fds:
            os.close(fd)


def test_preserve_errnos(v3_target: Target) -> None:
    t = v3_target
    dev = t.open_device()
    m, m2 = memfd(b"a"), memfd(b"b")
    closed = memfd()
    os.close(closed)
    try:
        assert ioctl_errno(t, dev, PRESERVE, struct.pack("<IiQ", 16, closed, 1)) == errno.EBADF
        assert ioctl_errno(t, dev, PRESERVE, struct.pack("<IiQ", 16, -1, 1)) == errno.EBADF
        v3_preserve(t.sc, dev, m, 0x55)
        # user tokens are global: EEXIST
        assert ioctl_errno(t, dev, PRESERVE, struct.pack("<IiQ", 16, m2, 0x55)) == errno.EEXIST
        v3_set_event(t.sc, dev, E.LIVEUPDATE_PREPARE)
        assert ioctl_errno(t, dev, PRESERVE, struct.pack("<IiQ", 16, m2, 0x56)) == errno.EBUSY
        v3_set_event(t.sc, dev, E.LIVEUPDATE_CANCEL)
        v3_preserve(t.sc, dev, m2, 0x56)  # CANCEL keeps the set; NORMAL allows preserve again
        assert ioctl_errno(t, dev, PRESERVE, struct.pack("<IiQ", 16, m2, 0x55)) == errno.EEXIST
    finally:
        os.close(m)
        os.close(m2)


def test_unpreserve_errnos(v3_target: Target) -> None:
    t = v3_target
    dev = t.open_device()
    m = memfd(b"u")
    try:
        assert ioctl_errno(t, dev, UNPRESERVE, struct.pack("<IIQ", 16, 0, 1)) == errno.ENOENT
        v3_preserve(t.sc, dev, m, 1)
        v3_set_event(t.sc, dev, E.LIVEUPDATE_PREPARE)
        assert ioctl_errno(t, dev, UNPRESERVE, struct.pack("<IIQ", 16, 0, 1)) == errno.EBUSY
        v3_set_event(t.sc, dev, E.LIVEUPDATE_CANCEL)
        # The 4 bytes at offset 4 are implicit padding, never validated (§1.2: only bytes beyond
        # ksize are checked).
        assert t.sc.ioctl(dev, UNPRESERVE, bytearray(struct.pack("<IIQ", 16, 0xFFFF, 1))) == 0
        v3_preserve(t.sc, dev, m, 1)  # token free again
    finally:
        os.close(m)


def test_restore_in_normal(v3_target: Target) -> None:
    """Restore only exists in UPDATED; the emulator documents EBUSY elsewhere (doc silent)."""
    t = v3_target
    dev = t.open_device()
    m = memfd(b"r")
    try:
        v3_preserve(t.sc, dev, m, 1)
        assert ioctl_errno(t, dev, RESTORE, struct.pack("<IiQ", 16, -1, 1)) == errno.EBUSY
    finally:
        os.close(m)


# ------------------------------------------------------------------ dispatcher (§1.2)


@pytest.mark.parametrize("nr", [0x05, 0x06, 0x3F, 0x40, 0xFF])
def test_nr_out_of_range_is_einval(v3_target: Target, nr: int) -> None:
    t = v3_target
    assert ioctl_errno(t, t.open_device(), _IO(0xBA, nr), struct.pack("<II", 8, 0)) == errno.EINVAL


@pytest.mark.parametrize(
    "req",
    [_IOWR(0xBA, 3, 8), rfc_v2.LIVEUPDATE_IOCTL_GET_STATE, _IO(0xBB, 3)],
    ids=["IOWR-encoding", "G1-GET_STATE", "other-magic"],
)
def test_mismatched_request_is_enotty(v3_target: Target, req: int) -> None:
    t = v3_target
    assert ioctl_errno(t, t.open_device(), req, struct.pack("<II", 8, 0)) == errno.ENOTTY


def test_size_rules(v3_target: Target) -> None:
    t = v3_target
    dev = t.open_device()
    for size in (0, 4, 7):
        assert ioctl_errno(t, dev, GET_STATE, struct.pack("<II", size, 0)) == errno.EINVAL
    m = memfd(b"s")
    try:
        assert ioctl_errno(t, dev, PRESERVE, struct.pack("<IiQ", 15, m, 1)) == errno.EINVAL
        # non-zero bytes beyond ksize -> E2BIG, zero bytes fine
        assert ioctl_errno(t, dev, PRESERVE, struct.pack("<IiQI", 20, m, 1, 1)) == errno.E2BIG
        assert t.sc.ioctl(dev, PRESERVE, bytearray(struct.pack("<IiQI", 20, m, 1, 0))) == 0
    finally:
        os.close(m)
    # copy-back is min(size, ksize); bytes after `size` are never touched
    buf = bytearray(struct.pack("<IIII", 16, 0, 0, 0))
    assert t.sc.ioctl(dev, GET_STATE, buf) == 0
    assert struct.unpack("<IIII", buf) == (16, NORMAL, 0, 0)
    buf = bytearray(struct.pack("<II", 8, 0) + b"\xff" * 8)
    assert t.sc.ioctl(dev, GET_STATE, buf) == 0
    assert buf[4:8] == struct.pack("<I", NORMAL) and buf[8:] == b"\xff" * 8


def test_sysfs_state_is_replaced_atomically(v3_target: Target) -> None:
    t = v3_target
    if t.real:
        pytest.skip("real sysfs is not a regular file")
    dev = t.open_device()
    path = t.sc.path("/sys/kernel/liveupdate/state")
    before = os.stat(path).st_ino
    v3_set_event(t.sc, dev, E.LIVEUPDATE_PREPARE)
    assert os.stat(path).st_ino != before  # written aside and renamed over
    assert t.sysfs_state() == "prepared\n"
