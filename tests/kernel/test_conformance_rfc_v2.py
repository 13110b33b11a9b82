"""G1 (RFC v2 / rfc-v2.1) conformance, raw bytes only (kernel-abi.md §3, §5.3, §10 G1/G2 era).

Size-encoded requests, 0-based states, kernel-made tokens, non-exclusive open, close does nothing.
FREEZE is an ioctl here, so every cell of the §5.3 table except the UPDATED row is reachable
without a kexec; the UPDATED row goes through an emulated kexec.
"""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import pytest

from luo_agent.errors import HandoverCorrupt
from luo_agent.kernel.uapi import _IO, _IOW, _IOWR, rfc_v2, v3
from tests.kernel.luo_raw import (
    G1_EVENTS,
    Target,
    cloexec,
    errno_of,
    g1_event,
    g1_get_state,
    g1_preserve,
    g1_restore,
    g1_unpreserve,
    ioctl_errno,
    kexec_reboot,
    memfd,
    read_all,
)

S = rfc_v2.liveupdate_state
NORMAL = S.LIVEUPDATE_STATE_NORMAL
PREPARED = S.LIVEUPDATE_STATE_PREPARED
FROZEN = S.LIVEUPDATE_STATE_FROZEN
UPDATED = S.LIVEUPDATE_STATE_UPDATED
PRESERVE = rfc_v2.LIVEUPDATE_IOCTL_FD_PRESERVE
UNPRESERVE = rfc_v2.LIVEUPDATE_IOCTL_FD_UNPRESERVE
RESTORE = rfc_v2.LIVEUPDATE_IOCTL_FD_RESTORE


def assert_state(t: Target, dev: int, state: S) -> None:
    assert g1_get_state(t.sc, dev) == state
    assert t.sysfs_state() == rfc_v2.STATE_STRINGS[state] + "\n"


def go_to(t: Target, dev: int, state: S) -> None:
    if state in (PREPARED, FROZEN):
        g1_event(t.sc, dev, G1_EVENTS["PREPARE"])
    if state == FROZEN:
        g1_event(t.sc, dev, G1_EVENTS["FREEZE"])
    assert_state(t, dev, state)


# ------------------------------------------------------------------ open / close (§3.1)


def test_fresh_system_is_normal(rfc_v2_target: Target) -> None:
    """Selftest 1: GET_STATE NORMAL (0-based: 0) and sysfs "normal"."""
    t = rfc_v2_target
    dev = t.open_device()
    assert g1_get_state(t.sc, dev) == 0
    assert t.sysfs_state() == "normal\n"


def test_open_is_not_exclusive(rfc_v2_target: Target) -> None:
    t = rfc_v2_target
    a, b = t.open_device(), t.open_device()
    assert g1_get_state(t.sc, a) == g1_get_state(t.sc, b) == NORMAL


def test_o_excl_is_einval(rfc_v2_target: Target) -> None:
    t = rfc_v2_target
    assert errno_of(t.open_device, os.O_RDWR | os.O_CLOEXEC | os.O_EXCL) == errno.EINVAL


def test_close_does_nothing(rfc_v2_target: Target) -> None:
    """No release handler: preserved fds and the state survive the close of the opener."""
    t = rfc_v2_target
    dev = t.open_device()
    m = memfd(b"kept")
    try:
        token = g1_preserve(t.sc, dev, m)
        g1_event(t.sc, dev, G1_EVENTS["PREPARE"])
        t.close(dev)
        dev = t.open_device()
        assert_state(t, dev, PREPARED)
        g1_event(t.sc, dev, G1_EVENTS["CANCEL"])
        g1_unpreserve(t.sc, dev, token)  # still registered
    finally:
        os.close(m)


# ------------------------------------------------------------------ state machine (§3.3, §5.3)

TABLE = [
    (NORMAL, "PREPARE", 0, PREPARED),
    (NORMAL, "FREEZE", errno.EINVAL, NORMAL),
    # CANCEL in NORMAL/UPDATED: "error" in the doc (EINVAL once the state check is reached);
    # the emulator documents EINVAL.
    (NORMAL, "CANCEL", errno.EINVAL, NORMAL),
    (NORMAL, "FINISH", errno.EINVAL, NORMAL),
    (PREPARED, "PREPARE", errno.EINVAL, PREPARED),
    (PREPARED, "FREEZE", 0, FROZEN),
    (PREPARED, "CANCEL", 0, NORMAL),
    (PREPARED, "FINISH", errno.EINVAL, PREPARED),
    (FROZEN, "PREPARE", errno.EINVAL, FROZEN),
    (FROZEN, "FREEZE", errno.EINVAL, FROZEN),
    (FROZEN, "CANCEL", 0, NORMAL),
    (FROZEN, "FINISH", errno.EINVAL, FROZEN),
    (UPDATED, "PREPARE", errno.EINVAL, UPDATED),
    (UPDATED, "FREEZE", errno.EINVAL, UPDATED),
    (UPDATED, "CANCEL", errno.EINVAL, UPDATED),
    (UPDATED, "FINISH", 0, NORMAL),
]


def _ids(row: tuple[S, str, int, S]) -> str:
    return f"{row[0].name[18:]}-{row[1]}"


def _apply(t: Target, dev: int, event: str, err: int, after: S) -> None:
    if err:
        assert ioctl_errno(t, dev, G1_EVENTS[event], bytearray(8)) == err
    else:
        g1_event(t.sc, dev, G1_EVENTS[event])
    assert_state(t, dev, after)


@pytest.mark.parametrize("row", [r for r in TABLE if r[0] != UPDATED], ids=_ids)
def test_state_table(rfc_v2_target: Target, row: tuple[S, str, int, S]) -> None:
    start, event, err, after = row
    t = rfc_v2_target
    dev = t.open_device()
    go_to(t, dev, start)
    _apply(t, dev, event, err, after)
    if after != NORMAL:  # selftest fixture teardown: CANCEL from PREPARED/FROZEN
        g1_event(t.sc, dev, G1_EVENTS["CANCEL"])


@pytest.mark.parametrize("row", [r for r in TABLE if r[0] == UPDATED], ids=_ids)
def test_state_table_updated(
    rfc_v2_machine: Target, kexec_image: Path, row: tuple[S, str, int, S]
) -> None:
    _start, event, err, after = row
    t = rfc_v2_machine
    go_to(t, t.open_device(), PREPARED)
    kexec_reboot(t, kexec_image)
    dev = t.open_device()
    assert_state(t, dev, UPDATED)
    _apply(t, dev, event, err, after)


def test_event_prepare_ignores_its_argument(rfc_v2_target: Target) -> None:
    """§11: 0xBA04 is _IO; whatever buffer comes with it is ignored."""
    t = rfc_v2_target
    dev = t.open_device()
    assert t.sc.ioctl(dev, 0xBA04, bytearray(b"\xff" * 64)) == 0
    assert_state(t, dev, PREPARED)
    g1_event(t.sc, dev, G1_EVENTS["CANCEL"])


def test_failing_prepare_leaves_normal(rfc_v2_machine: Target) -> None:
    """Selftest 6: a failing subsystem prepare -> error, state NORMAL; then the cycle works."""
    t = rfc_v2_machine
    dev = t.open_device()
    t.machine.inject_fault("EVENT_PREPARE", errno.EIO)
    assert ioctl_errno(t, dev, G1_EVENTS["PREPARE"], bytearray(8)) == errno.EIO
    assert_state(t, dev, NORMAL)
    for event, state in (("PREPARE", PREPARED), ("FREEZE", FROZEN), ("CANCEL", NORMAL)):
        g1_event(t.sc, dev, G1_EVENTS[event])
        assert_state(t, dev, state)


# ------------------------------------------------------------------ fd preservation (§3.2, §3.5)


def test_tokens_are_kernel_made_and_unique(rfc_v2_target: Target) -> None:
    t = rfc_v2_target
    dev = t.open_device()
    fds = [memfd(bytes([i])) for i in range(8)]
    try:
        # `flags` "must be 0" but RFC v2 never checks it.
        tokens = [g1_preserve(t.sc, dev, fd, flags=i) for i, fd in enumerate(fds)]
        assert len(set(tokens)) == len(tokens)
        g1_unpreserve(t.sc, dev, tokens[0])
        # the token of an unpreserved file is not handed out again while others exist
        again = g1_preserve(t.sc, dev, fds[0])
        assert again not in tokens[1:]
    finally:
        for fd in fds:
            os.close(fd)


def test_preserve_errnos(rfc_v2_target: Target, tmp_path: Path) -> None:
    t = rfc_v2_target
    dev = t.open_device()
    closed = memfd()
    os.close(closed)
    assert ioctl_errno(t, dev, PRESERVE, struct.pack("<iIQ", closed, 0, 0)) == errno.EBADF
    assert ioctl_errno(t, dev, PRESERVE, struct.pack("<iIQ", -1, 0, 0)) == errno.EBADF
    # Unsupported type: the RFC v2 errno is UNCONFIRMED; the emulator documents ENOENT (as G2+).
    (tmp_path / "f").write_bytes(b"x")
    others = [
        os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC),
        os.open(tmp_path / "f", os.O_RDWR | os.O_CLOEXEC),
        *os.pipe2(os.O_CLOEXEC),
    ]
    m = memfd(b"m")
    try:
        for fd in others[:3]:
            assert ioctl_errno(t, dev, PRESERVE, struct.pack("<iIQ", fd, 0, 0)) == errno.ENOENT
        # Outside NORMAL/UPDATED: EBUSY (G2 semantics, emulator documents it for G1 too).
        g1_event(t.sc, dev, G1_EVENTS["PREPARE"])
        assert ioctl_errno(t, dev, PRESERVE, struct.pack("<iIQ", m, 0, 0)) == errno.EBUSY
        # §3: the ioctl resolves the fd before the registry looks at the state: EBADF in any state.
        assert ioctl_errno(t, dev, PRESERVE, struct.pack("<iIQ", -1, 0, 0)) == errno.EBADF
        g1_event(t.sc, dev, G1_EVENTS["CANCEL"])
    finally:
        for fd in [*others, m]:
            os.close(fd)


def test_unpreserve_errnos(rfc_v2_target: Target) -> None:
    t = rfc_v2_target
    dev = t.open_device()
    m = memfd(b"u")
    try:
        token = g1_preserve(t.sc, dev, m)
        # unknown token -> ENOENT (inferred in the doc)
        assert ioctl_errno(t, dev, UNPRESERVE, struct.pack("<Q", token + 1000)) == errno.ENOENT
        g1_event(t.sc, dev, G1_EVENTS["PREPARE"])
        # "UNPRESERVE only in NORMAL (EBUSY/EINVAL otherwise)": the emulator documents EBUSY
        assert ioctl_errno(t, dev, UNPRESERVE, struct.pack("<Q", token)) == errno.EBUSY
        g1_event(t.sc, dev, G1_EVENTS["CANCEL"])  # CANCEL keeps the preserve list
        g1_unpreserve(t.sc, dev, token)
        assert ioctl_errno(t, dev, UNPRESERVE, struct.pack("<Q", token)) == errno.ENOENT
    finally:
        os.close(m)


# ------------------------------------------------------------------ dispatcher (§3.2)


@pytest.mark.parametrize(
    ("req", "size"),
    [
        (_IO(0xBA, 0x00), 16),  # FD_PRESERVE without its size encoding
        (_IOW(0xBA, 0x00, 16), 16),  # G2's FD_PRESERVE
        (_IOWR(0xBA, 0x03, 4), 4),
        (v3.LIVEUPDATE_IOCTL_GET_STATE, 8),  # 0xBA03
        (_IO(0xBA, 0x08), 16),
        (rfc_v2.LIVEUPDATE_IOCTL_SELFTESTS, 16),  # debugfs only, not /dev/liveupdate
        (_IO(0xBA, 0x09), 8),
        (_IOWR(0xBB, 0x00, 16), 16),  # other magic
        (_IO(0x00, 0x04), 8),
    ],
    ids=lambda v: hex(v) if isinstance(v, int) and v > 64 else None,
)
def test_unknown_requests_are_enotty(rfc_v2_target: Target, req: int, size: int) -> None:
    t = rfc_v2_target
    dev = t.open_device()
    m = memfd()
    try:
        buf = bytearray(size)
        if size >= 4:
            struct.pack_into("<i", buf, 0, m)
        assert ioctl_errno(t, dev, req, buf) == errno.ENOTTY
    finally:
        os.close(m)
    assert_state(t, dev, NORMAL)


# ------------------------------------------------------------------ kexec (§3.3, §3.5)


def test_kexec_from_prepared(rfc_v2_machine: Target, kexec_image: Path) -> None:
    t = rfc_v2_machine
    dev = t.open_device()
    m1, m2 = memfd(b"restored"), memfd(b"discarded")
    try:
        t1, t2 = g1_preserve(t.sc, dev, m1), g1_preserve(t.sc, dev, m2)
        go_to(t, dev, PREPARED)
        kexec_reboot(t, kexec_image)
    finally:
        os.close(m1)
        os.close(m2)
    dev = t.open_device()
    assert_state(t, dev, UPDATED)
    got = t.track(g1_restore(t.sc, dev, t1))
    assert cloexec(got)  # RESTORE allocates with O_CLOEXEC
    assert read_all(got) == b"restored"
    g1_event(t.sc, dev, G1_EVENTS["FINISH"])
    assert_state(t, dev, NORMAL)
    # FINISH discarded the unrestored file.  RESTORE outside UPDATED: the emulator checks the
    # state first and documents EBUSY (doc silent).
    assert ioctl_errno(t, dev, RESTORE, struct.pack("<iIQ", -1, 0, t2)) == errno.EBUSY
    assert t.machine.inspect()["incoming_files"] == []


def test_kexec_from_frozen(rfc_v2_machine: Target, kexec_image: Path) -> None:
    """Already FROZEN: the kexec proceeds and carries (inferred in §3.3)."""
    t = rfc_v2_machine
    dev = t.open_device()
    m = memfd(b"frozen")
    try:
        token = g1_preserve(t.sc, dev, m)
        go_to(t, dev, FROZEN)
        kexec_reboot(t, kexec_image)
    finally:
        os.close(m)
    dev = t.open_device()
    assert_state(t, dev, UPDATED)
    assert read_all(t.track(g1_restore(t.sc, dev, token))) == b"frozen"


@pytest.mark.parametrize("state", ["NORMAL", "UPDATED"])
def test_kexec_without_prepare_is_plain(
    rfc_v2_machine: Target, kexec_image: Path, state: str
) -> None:
    t = rfc_v2_machine
    dev = t.open_device()
    m = memfd(b"x")
    g1_preserve(t.sc, dev, m)
    os.close(m)
    if state == "UPDATED":
        go_to(t, dev, PREPARED)
        kexec_reboot(t, kexec_image)
        assert_state(t, t.open_device(), UPDATED)
    kexec_reboot(t, kexec_image)
    assert_state(t, t.open_device(), NORMAL)


def test_corrupt_handover_panics(rfc_v2_machine: Target, kexec_image: Path) -> None:
    t = rfc_v2_machine
    dev = t.open_device()
    m = memfd(b"y" * 5000)
    g1_preserve(t.sc, dev, m)
    os.close(m)
    go_to(t, dev, PREPARED)
    fd = os.open(kexec_image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        t.sc.kexec_file_load(fd, -1, "luo_emu", 0)
    finally:
        os.close(fd)
    t.sc.reboot_kexec()
    t.machine.wait_down(10.0)
    t.close_all()
    image = Path(t.sc.path("/")) / ".luo-emu" / "handover.img"
    image.write_bytes(image.read_bytes()[:100])
    with pytest.raises(HandoverCorrupt):
        t.machine.boot()
    assert not t.machine.running
