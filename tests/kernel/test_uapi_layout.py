"""Every struct size, field offset and request number of kernel-abi.md §3, §5.2, §7.2, §7.3, §9,
and the request-number collisions of §11 (same number, different meaning per generation)."""

from __future__ import annotations

import ctypes
import errno
import struct
from pathlib import Path

import pytest

from luo_agent.kernel.device import Abi
from luo_agent.kernel.uapi import (
    _IO,
    _IOC_DIR,
    _IOC_NR,
    _IOC_SIZE,
    _IOC_TYPE,
    _IOR,
    _IOW,
    _IOWR,
    LIVEUPDATE_IOCTL_TYPE,
    IoctlOp,
    rfc_v2,
    session,
    v3,
)
from tests.kernel.luo_raw import Target, errno_of, name_bytes, probe_generation


def layout(struct_type: type[ctypes.Structure]) -> tuple[int, dict[str, tuple[int, int]]]:
    fields = {
        name: (getattr(struct_type, name).offset, getattr(struct_type, name).size)
        for name, *_ in struct_type._fields_
    }
    return ctypes.sizeof(struct_type), fields


# (struct, sizeof, {field: (offset, size)})
LAYOUTS = [
    # §3 G1
    (rfc_v2.liveupdate_fd, 16, {"fd": (0, 4), "flags": (4, 4), "token": (8, 8)}),
    (rfc_v2.liveupdate_selftest, 16, {"cmd": (0, 8), "arg": (8, 8)}),
    # §5.2 G3
    (v3.liveupdate_ioctl_fd_preserve, 16, {"size": (0, 4), "fd": (4, 4), "token": (8, 8)}),
    (v3.liveupdate_ioctl_fd_unpreserve, 16, {"size": (0, 4), "token": (8, 8)}),  # pad @4
    (v3.liveupdate_ioctl_fd_restore, 16, {"size": (0, 4), "fd": (4, 4), "token": (8, 8)}),
    (v3.liveupdate_ioctl_get_state, 8, {"size": (0, 4), "state": (4, 4)}),
    (v3.liveupdate_ioctl_set_event, 8, {"size": (0, 4), "event": (4, 4)}),
    # §7.2 G5
    (session.liveupdate_ioctl_create_session, 72, {"size": (0, 4), "fd": (4, 4), "name": (8, 64)}),
    (
        session.liveupdate_ioctl_retrieve_session,
        72,
        {"size": (0, 4), "fd": (4, 4), "name": (8, 64)},
    ),
    # §7.3 G5
    (session.liveupdate_session_preserve_fd, 16, {"size": (0, 4), "fd": (4, 4), "token": (8, 8)}),
    (session.liveupdate_session_retrieve_fd, 16, {"size": (0, 4), "fd": (4, 4), "token": (8, 8)}),
    (session.liveupdate_session_finish, 8, {"size": (0, 4), "reserved": (4, 4)}),
    # §9 G6: as in include/uapi/linux/liveupdate.h of Linux 7.2
    (
        session.liveupdate_session_get_name,
        72,
        {"size": (0, 4), "reserved": (4, 4), "name": (8, 64)},
    ),
]


@pytest.mark.parametrize(
    ("struct_type", "size", "fields"), LAYOUTS, ids=[s.__name__ for s, *_ in LAYOUTS]
)
def test_struct_layout(
    struct_type: type[ctypes.Structure], size: int, fields: dict[str, tuple[int, int]]
) -> None:
    assert layout(struct_type) == (size, fields)


def test_token_fields_are_8_byte_aligned_u64() -> None:
    # __aligned_u64: the 4-byte hole in fd_unpreserve comes from this alignment.
    for struct_type in (
        rfc_v2.liveupdate_fd,
        v3.liveupdate_ioctl_fd_unpreserve,
        session.liveupdate_session_preserve_fd,
    ):
        assert ctypes.alignment(struct_type) == 8


# (constant, documented x86_64 value)
REQUESTS = [
    # §3 G1: size-encoded
    ("rfc_v2.FD_PRESERVE", rfc_v2.LIVEUPDATE_IOCTL_FD_PRESERVE, 0xC010BA00),
    ("rfc_v2.FD_UNPRESERVE", rfc_v2.LIVEUPDATE_IOCTL_FD_UNPRESERVE, 0x4008BA01),
    ("rfc_v2.FD_RESTORE", rfc_v2.LIVEUPDATE_IOCTL_FD_RESTORE, 0xC010BA02),
    ("rfc_v2.GET_STATE", rfc_v2.LIVEUPDATE_IOCTL_GET_STATE, 0x8004BA03),
    ("rfc_v2.EVENT_PREPARE", rfc_v2.LIVEUPDATE_IOCTL_EVENT_PREPARE, 0x0000BA04),
    ("rfc_v2.EVENT_FREEZE", rfc_v2.LIVEUPDATE_IOCTL_EVENT_FREEZE, 0x0000BA05),
    ("rfc_v2.EVENT_CANCEL", rfc_v2.LIVEUPDATE_IOCTL_EVENT_CANCEL, 0x0000BA06),
    ("rfc_v2.EVENT_FINISH", rfc_v2.LIVEUPDATE_IOCTL_EVENT_FINISH, 0x0000BA07),
    ("rfc_v2.SELFTESTS", rfc_v2.LIVEUPDATE_IOCTL_SELFTESTS, 0xC010BA08),
    # §5.2 G3
    ("v3.FD_PRESERVE", v3.LIVEUPDATE_IOCTL_FD_PRESERVE, 0xBA00),
    ("v3.FD_UNPRESERVE", v3.LIVEUPDATE_IOCTL_FD_UNPRESERVE, 0xBA01),
    ("v3.FD_RESTORE", v3.LIVEUPDATE_IOCTL_FD_RESTORE, 0xBA02),
    ("v3.GET_STATE", v3.LIVEUPDATE_IOCTL_GET_STATE, 0xBA03),
    ("v3.SET_EVENT", v3.LIVEUPDATE_IOCTL_SET_EVENT, 0xBA04),
    # §7.2 / §7.3 G5, §9 G6
    ("session.CREATE_SESSION", session.LIVEUPDATE_IOCTL_CREATE_SESSION, 0xBA00),
    ("session.RETRIEVE_SESSION", session.LIVEUPDATE_IOCTL_RETRIEVE_SESSION, 0xBA01),
    ("session.PRESERVE_FD", session.LIVEUPDATE_SESSION_PRESERVE_FD, 0xBA40),
    ("session.RETRIEVE_FD", session.LIVEUPDATE_SESSION_RETRIEVE_FD, 0xBA41),
    ("session.FINISH", session.LIVEUPDATE_SESSION_FINISH, 0xBA42),
    ("session.GET_NAME", session.LIVEUPDATE_SESSION_GET_NAME, 0xBA43),
]


@pytest.mark.parametrize(
    ("computed", "documented"), [r[1:] for r in REQUESTS], ids=[r[0] for r in REQUESTS]
)
def test_request_number(computed: int, documented: int) -> None:
    assert computed == documented


def test_session_requests_decimal_values_from_the_doc() -> None:
    assert session.LIVEUPDATE_IOCTL_CREATE_SESSION == 47616
    assert session.LIVEUPDATE_IOCTL_RETRIEVE_SESSION == 47617
    assert session.LIVEUPDATE_SESSION_PRESERVE_FD == 47680
    assert session.LIVEUPDATE_SESSION_RETRIEVE_FD == 47681
    assert session.LIVEUPDATE_SESSION_FINISH == 47682


def test_ioc_encoding_and_decoding() -> None:
    # §1.1: (dir << 30) | (size << 16) | (type << 8) | nr
    assert _IOWR(0xBA, 0, 16) == (3 << 30) | (16 << 16) | (0xBA << 8)
    assert _IOW(0xBA, 1, 8) == (1 << 30) | (8 << 16) | (0xBA << 8) | 1
    assert _IOR(0xBA, 3, 4) == (2 << 30) | (4 << 16) | (0xBA << 8) | 3
    assert _IO(0xBA, 0x43) == 0xBA43
    assert LIVEUPDATE_IOCTL_TYPE == 0xBA
    req = rfc_v2.LIVEUPDATE_IOCTL_FD_PRESERVE
    assert (_IOC_DIR(req), _IOC_SIZE(req), _IOC_TYPE(req), _IOC_NR(req)) == (3, 16, 0xBA, 0)
    # Rejected probe of §12 step 6 ("never send 0x4010BA00"): G2's FD_PRESERVE.
    assert _IOW(0xBA, 0, 16) == 0x4010BA00


# (table, base, [(name, request, ksize, min_size)])
OP_TABLES = [
    (
        "v3.DEVICE_OPS",
        v3.DEVICE_OPS,
        0x00,
        [
            ("FD_PRESERVE", 0xBA00, 16, 16),
            ("FD_UNPRESERVE", 0xBA01, 16, 16),
            ("FD_RESTORE", 0xBA02, 16, 16),
            ("GET_STATE", 0xBA03, 8, 8),
            ("SET_EVENT", 0xBA04, 8, 8),
        ],
    ),
    (
        "session.DEVICE_OPS",
        session.DEVICE_OPS,
        0x00,
        [("CREATE_SESSION", 0xBA00, 72, 72), ("RETRIEVE_SESSION", 0xBA01, 72, 72)],
    ),
    (
        "session.SESSION_OPS_G5",
        session.SESSION_OPS_G5,
        0x40,
        [
            ("PRESERVE_FD", 0xBA40, 16, 16),
            ("RETRIEVE_FD", 0xBA41, 16, 16),
            ("FINISH", 0xBA42, 8, 8),
        ],
    ),
    (
        "session.SESSION_OPS_G6",
        session.SESSION_OPS_G6,
        0x40,
        # GET_NAME: its own 72-byte struct, min_size 72 (Linux 7.2 luo_session_ioctl_ops[]).
        [
            ("PRESERVE_FD", 0xBA40, 16, 16),
            ("RETRIEVE_FD", 0xBA41, 16, 16),
            ("FINISH", 0xBA42, 8, 8),
            ("GET_NAME", 0xBA43, 72, 72),
        ],
    ),
]


@pytest.mark.parametrize(
    ("table", "base", "expected"), [t[1:] for t in OP_TABLES], ids=[t[0] for t in OP_TABLES]
)
def test_dispatcher_tables(
    table: tuple[IoctlOp, ...], base: int, expected: list[tuple[str, int, int, int]]
) -> None:
    got = [(op.name, op.request, ctypes.sizeof(op.struct), op.min_size) for op in table]
    assert got == expected
    # The dispatcher indexes the table by nr - base, so row i must carry nr base + i.
    assert [_IOC_NR(op.request) - base for op in table] == list(range(len(table)))


def test_state_and_event_numbering() -> None:
    # G1 is 0-based, G2+ 1-based with UNDEFINED 0 (§3.3, §4.3).
    assert [int(s) for s in rfc_v2.liveupdate_state] == [0, 1, 2, 3]
    assert [s.name for s in rfc_v2.liveupdate_state] == [
        "LIVEUPDATE_STATE_NORMAL",
        "LIVEUPDATE_STATE_PREPARED",
        "LIVEUPDATE_STATE_FROZEN",
        "LIVEUPDATE_STATE_UPDATED",
    ]
    assert {s.name: int(s) for s in v3.liveupdate_state} == {
        "LIVEUPDATE_STATE_UNDEFINED": 0,
        "LIVEUPDATE_STATE_NORMAL": 1,
        "LIVEUPDATE_STATE_PREPARED": 2,
        "LIVEUPDATE_STATE_FROZEN": 3,
        "LIVEUPDATE_STATE_UPDATED": 4,
    }
    assert [int(e) for e in v3.liveupdate_event] == [0, 1, 2, 3]
    assert [e.name for e in v3.liveupdate_event] == [
        "LIVEUPDATE_PREPARE",
        "LIVEUPDATE_FREEZE",
        "LIVEUPDATE_FINISH",
        "LIVEUPDATE_CANCEL",
    ]
    assert list(rfc_v2.STATE_STRINGS.values()) == ["normal", "prepared", "frozen", "updated"]
    assert list(v3.STATE_STRINGS.values()) == [
        "undefined",
        "normal",
        "prepared",
        "frozen",
        "updated",
    ]
    assert session.LIVEUPDATE_SESSION_NAME_LENGTH == 64


# §11 collision table.  G4 has no module (no backend); its column is spelled with _IO().
G4_GET_STATE, G4_SET_EVENT, G4_CREATE_SESSION, G4_RETRIEVE_SESSION = (
    _IO(0xBA, n) for n in range(4)
)
G4_UNPRESERVE_FD, G4_RESTORE_FD, G4_SESSION_GET_STATE = (_IO(0xBA, n) for n in (0x41, 0x42, 0x43))

COLLISIONS = [
    (
        0xBA00,
        [v3.LIVEUPDATE_IOCTL_FD_PRESERVE, G4_GET_STATE, session.LIVEUPDATE_IOCTL_CREATE_SESSION],
    ),
    (
        0xBA01,
        [
            v3.LIVEUPDATE_IOCTL_FD_UNPRESERVE,
            G4_SET_EVENT,
            session.LIVEUPDATE_IOCTL_RETRIEVE_SESSION,
        ],
    ),
    (0xBA02, [v3.LIVEUPDATE_IOCTL_FD_RESTORE, G4_CREATE_SESSION]),
    (0xBA03, [v3.LIVEUPDATE_IOCTL_GET_STATE, G4_RETRIEVE_SESSION]),
    (0xBA04, [rfc_v2.LIVEUPDATE_IOCTL_EVENT_PREPARE, v3.LIVEUPDATE_IOCTL_SET_EVENT]),
    (0xBA41, [G4_UNPRESERVE_FD, session.LIVEUPDATE_SESSION_RETRIEVE_FD]),
    (0xBA42, [G4_RESTORE_FD, session.LIVEUPDATE_SESSION_FINISH]),
    (0xBA43, [G4_SESSION_GET_STATE, session.LIVEUPDATE_SESSION_GET_NAME]),
]


@pytest.mark.parametrize(("number", "meanings"), COLLISIONS, ids=[hex(c[0]) for c in COLLISIONS])
def test_request_number_collisions(number: int, meanings: list[int]) -> None:
    assert all(m == number for m in meanings)


def test_collision_names_differ_per_generation() -> None:
    v3_names = {op.request: op.name for op in v3.DEVICE_OPS}
    session_names = {op.request: op.name for op in session.DEVICE_OPS}
    assert (v3_names[0xBA00], session_names[0xBA00]) == ("FD_PRESERVE", "CREATE_SESSION")
    assert (v3_names[0xBA01], session_names[0xBA01]) == ("FD_UNPRESERVE", "RETRIEVE_SESSION")
    assert 0xBA02 not in session_names and 0xBA03 not in session_names


# ---- The same bytes mean different things on each generation (emulated kernels).


def _errno_or_zero(target: Target, fd: int, request: int, arg: bytes) -> tuple[int, bytes]:
    buf = bytearray(arg)
    try:
        target.sc.ioctl(fd, request, buf)
    except OSError as exc:
        return exc.errno or 0, bytes(buf)
    return 0, bytes(buf)


# The §12 collision tests take one target each: a real-kernel run then needs no emulated
# machine of another generation next to it.
def test_0xBA03_collision_v3(v3_target: Target) -> None:
    """§12 step 3: {size=8} at 0xBA03 is GET_STATE on G3..."""
    probe = struct.pack("<II", 8, 0)
    err, out = _errno_or_zero(v3_target, v3_target.open_device(), 0xBA03, probe)
    assert (err, struct.unpack("<II", out)) == (0, (8, v3.liveupdate_state.LIVEUPDATE_STATE_NORMAL))


def test_0xBA03_collision_session(session_target: Target) -> None:
    """... and "nr out of range" on G5/G6 (luo_core.c:396)."""
    probe = struct.pack("<II", 8, 0)
    err, _ = _errno_or_zero(session_target, session_target.open_device(), 0xBA03, probe)
    assert err == errno.EINVAL


def test_0xBA00_collision_v3(v3_target: Target) -> None:
    """§12 step 4: {size=8} at 0xBA00: G3 FD_PRESERVE wants 16 bytes..."""
    probe = struct.pack("<II", 8, 0)
    assert _errno_or_zero(v3_target, v3_target.open_device(), 0xBA00, probe)[0] == errno.EINVAL


def test_0xBA00_collision_session(session_target: Target) -> None:
    """... and G5/G6 CREATE_SESSION wants 72 (luo_core.c:407): EINVAL, nothing created, nothing
    written back."""
    probe = struct.pack("<II", 8, 0)
    dev = session_target.open_device()
    assert _errno_or_zero(session_target, dev, 0xBA00, probe) == (errno.EINVAL, probe)


def test_0xBA01_collision_v3(v3_target: Target) -> None:
    """§12 step 5: a 72-byte RETRIEVE_SESSION of a random name: E2BIG on G3..."""
    probe = struct.pack("<Ii64s", 72, -1, name_bytes("no-such-session-" + "r" * 30))
    assert _errno_or_zero(v3_target, v3_target.open_device(), 0xBA01, probe)[0] == errno.E2BIG


def test_0xBA01_collision_session(session_target: Target) -> None:
    """... and ENOENT on G5/G6."""
    probe = struct.pack("<Ii64s", 72, -1, name_bytes("no-such-session-" + "r" * 30))
    dev = session_target.open_device()
    assert _errno_or_zero(session_target, dev, 0xBA01, probe)[0] == errno.ENOENT


def test_0xBA04_collision(rfc_v2_target: Target, v3_target: Target) -> None:
    """0xBA04 is G1 EVENT_PREPARE (argument ignored) and G3 SET_EVENT (size-first struct)."""
    dev1 = rfc_v2_target.open_device()
    # G3's SET_EVENT{size=8, event=CANCEL} bytes: G1 ignores them and PREPAREs.
    assert rfc_v2_target.sc.ioctl(dev1, 0xBA04, bytearray(struct.pack("<II", 8, 3))) == 0
    assert rfc_v2_target.sysfs_state() == "prepared\n"
    rfc_v2_target.sc.ioctl(dev1, rfc_v2.LIVEUPDATE_IOCTL_EVENT_CANCEL, bytearray(8))
    dev3 = v3_target.open_device()
    # The same bytes on G3: CANCEL in NORMAL, which the state machine refuses.
    assert errno_of(v3_target.sc.ioctl, dev3, 0xBA04, bytearray(struct.pack("<II", 8, 3))) != 0
    assert v3_target.sysfs_state() == "normal\n"


def test_0xBA43_collision(session_target: Target) -> None:
    """§12 step 7: GET_NAME on G6, nr out of range (EINVAL) on 6.19."""
    dev = session_target.open_device()
    from tests.kernel.luo_raw import create_session

    sess = session_target.track(create_session(session_target.sc, dev, "probe-0xba43"))
    buf = bytearray(72)
    struct.pack_into("<I", buf, 0, 72)
    err, out = _errno_or_zero(session_target, sess, 0xBA43, bytes(buf))
    if session_target.g6:
        assert (err, out[8:20]) == (0, b"probe-0xba43")
    else:
        assert err == errno.EINVAL


@pytest.mark.parametrize(
    ("abi", "profile"),
    [(Abi.RFC_V2, None), (Abi.V3, None), (Abi.SESSION, "6.19"), (Abi.SESSION, "g6")],
)
def test_section12_probe_order_identifies_each_emulated_generation(
    tmp_path: Path, abi: str, profile: str | None
) -> None:
    from luo_agent.kernel.emulator import EmulatedMachine

    with EmulatedMachine(tmp_path / "m", abi, profile) as machine:
        machine.boot()
        assert probe_generation(machine.syscalls) == (abi, profile)
        # Side-effect free: nothing preserved, nothing left open, state untouched.
        assert probe_generation(machine.syscalls) == (abi, profile)
