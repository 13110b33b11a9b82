"""The emulated machine itself: boot/poweroff/kexec lifecycle, handover image atomicity and
corruption, fault injection, sysfs, inspect(), O_CLOEXEC, close by process death.

(Per-ioctl conformance lives in test_conformance_*.py.)
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import luo_agent
from luo_agent.errors import HandoverCorrupt
from luo_agent.kernel.device import Abi
from luo_agent.kernel.emulator import EmulatedMachine, EmulatedSyscalls
from luo_agent.kernel.emulator.handover import HEADER, read_image
from luo_agent.kernel.emulator.memfd import HOLD_MIN_BYTES
from luo_agent.kernel.syscalls import DEVICE_PATH, KEXEC_FILE_UNLOAD, SYSFS_STATE_PATH
from luo_agent.kernel.uapi import rfc_v2, session, v3

GENERATIONS = [(Abi.RFC_V2, None), (Abi.V3, None), (Abi.SESSION, "6.19"), (Abi.SESSION, "g6")]
REPO = str(Path(luo_agent.__file__).resolve().parents[1])


MakeMachine = Callable[..., EmulatedMachine]


@pytest.fixture
def make_machine(tmp_path: Path) -> Iterator[MakeMachine]:
    machines: list[EmulatedMachine] = []

    def make(abi: str, profile: str | None = None) -> EmulatedMachine:
        machine = EmulatedMachine(tmp_path / "root", abi, profile)
        machines.append(machine)
        return machine

    yield make
    for machine in machines:
        machine.poweroff()


@pytest.fixture
def kernel_image(tmp_path: Path) -> Iterator[int]:
    path = tmp_path / "vmlinuz"
    path.write_bytes(b"\x7fELF fake kernel image\n" * 100)
    fd = os.open(path, os.O_RDONLY)
    yield fd
    os.close(fd)


def errno_of(call: Callable[[], object]) -> int:
    """The errno ``call()`` fails with; fails the test if it succeeds."""
    try:
        result = call()
    except OSError as exc:
        return exc.errno or 0
    raise AssertionError(f"succeeded with {result!r}")


def memfd_with(data: bytes, pos: int = 0) -> int:
    fd = os.memfd_create("test")
    os.write(fd, data)
    os.lseek(fd, pos, os.SEEK_SET)
    return fd


def cloexec(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)


def kexec(machine: EmulatedMachine, image_fd: int, cmdline: str = "next") -> None:
    sc = machine.syscalls
    sc.kexec_file_load(image_fd, -1, cmdline, 0)
    sc.reboot_kexec()
    assert not machine.running
    machine.wait_down()
    machine.boot()


# --- session helpers (raw bytes) -------------------------------------------------------------
def open_dev(sc: EmulatedSyscalls) -> int:
    return sc.open(sc.path(DEVICE_PATH), os.O_RDWR)


def name_buf(name: bytes) -> bytearray:
    buf = bytearray(72)
    struct.pack_into("<I", buf, 0, 72)
    buf[8 : 8 + len(name)] = name
    return buf


def create_session(sc: EmulatedSyscalls, dev: int, name: bytes) -> int:
    buf = name_buf(name)
    sc.ioctl(dev, session.LIVEUPDATE_IOCTL_CREATE_SESSION, buf)
    return int(struct.unpack_from("<i", buf, 4)[0])


def retrieve_session(sc: EmulatedSyscalls, dev: int, name: bytes) -> int:
    buf = name_buf(name)
    sc.ioctl(dev, session.LIVEUPDATE_IOCTL_RETRIEVE_SESSION, buf)
    return int(struct.unpack_from("<i", buf, 4)[0])


def preserve(sc: EmulatedSyscalls, sess: int, fd: int, token: int) -> None:
    sc.ioctl(
        sess, session.LIVEUPDATE_SESSION_PRESERVE_FD, bytearray(struct.pack("<IiQ", 16, fd, token))
    )


def retrieve_fd(sc: EmulatedSyscalls, sess: int, token: int) -> int:
    buf = bytearray(struct.pack("<IiQ", 16, -1, token))
    sc.ioctl(sess, session.LIVEUPDATE_SESSION_RETRIEVE_FD, buf)
    return int(struct.unpack_from("<i", buf, 4)[0])


# --- v3 / rfc-v2 helpers ------------------------------------------------------------------------
def v3_event(sc: EmulatedSyscalls, dev: int, event: int) -> None:
    sc.ioctl(dev, v3.LIVEUPDATE_IOCTL_SET_EVENT, bytearray(struct.pack("<II", 8, event)))


def v3_preserve(sc: EmulatedSyscalls, dev: int, fd: int, token: int) -> None:
    sc.ioctl(dev, v3.LIVEUPDATE_IOCTL_FD_PRESERVE, bytearray(struct.pack("<IiQ", 16, fd, token)))


def v3_restore(sc: EmulatedSyscalls, dev: int, token: int) -> int:
    buf = bytearray(struct.pack("<IiQ", 16, -1, token))
    sc.ioctl(dev, v3.LIVEUPDATE_IOCTL_FD_RESTORE, buf)
    return int(struct.unpack_from("<i", buf, 4)[0])


def sysfs(sc: EmulatedSyscalls) -> str:
    return Path(sc.path(SYSFS_STATE_PATH)).read_text()


# --- lifecycle ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("abi", "profile"), GENERATIONS)
def test_boot_poweroff_cycle(make_machine: MakeMachine, abi: str, profile: str | None) -> None:
    machine = make_machine(abi, profile)
    sc = machine.syscalls
    assert not machine.running
    assert errno_of(lambda: open_dev(sc)) == errno.ENOENT
    machine.boot()
    assert machine.running
    assert Path(sc.path("/proc/cmdline")).read_text() == "luo_emu liveupdate=1\n"
    assert Path(sc.path(SYSFS_STATE_PATH)).exists() == (abi != Abi.SESSION)
    with pytest.raises(RuntimeError, match="already running"):
        machine.boot()
    dev = open_dev(sc)
    snap = machine.inspect()
    assert (snap["generation"], snap["boot_count"], snap["device_open"]) == (abi, 1, True)
    machine.poweroff()
    assert not machine.running
    # The old fd is dead: EIO, like any file of a machine that is gone.
    assert errno_of(lambda: sc.ioctl(dev, 0xBA00, bytearray(72))) == errno.EIO
    os.close(dev)
    assert errno_of(lambda: open_dev(sc)) == errno.ENOENT
    assert not Path(sc.path(SYSFS_STATE_PATH)).exists()
    machine.boot()
    assert machine.inspect()["boot_count"] == 2
    assert machine.inspect()["liveupdate_count"] == 0


def test_machine_json_reused_without_abi(make_machine: MakeMachine, tmp_path: Path) -> None:
    make_machine(Abi.SESSION, "g6")
    again = EmulatedMachine(tmp_path / "root")
    assert (again.abi, again.profile) == (Abi.SESSION, "g6")
    with pytest.raises(ValueError, match="no abi recorded"):
        EmulatedMachine(tmp_path / "elsewhere")


def test_session_kexec_carries_sessions_in_order(
    make_machine: MakeMachine, kernel_image: int
) -> None:
    machine = make_machine(Abi.SESSION, "6.19")
    machine.boot()
    sc = machine.syscalls
    dev = open_dev(sc)
    empty = create_session(sc, dev, b"empty")
    full = create_session(sc, dev, b"full")
    dropped = create_session(sc, dev, b"closed-before-kexec")
    data = memfd_with(b"A" * 5000, pos=1234)
    preserve(sc, full, data, 7)
    preserve(sc, dropped, memfd_with(b"x"), 1)
    os.close(dropped)
    # Written through a mapping-equivalent after preservation: carried (read at reboot).
    os.pwrite(data, b"LATE", 0)
    os.lseek(data, 4321, os.SEEK_SET)
    os.close(dev)
    kexec(machine, kernel_image, "console=ttyS0 next")
    assert Path(sc.path("/proc/cmdline")).read_text() == "console=ttyS0 next\n"
    snap = machine.inspect()
    assert [s["name"] for s in snap["incoming_sessions"]] == ["empty", "full"]
    assert snap["liveupdate_count"] == 1
    assert snap["kexec_image"] is None
    dev = open_dev(sc)
    sess = retrieve_session(sc, dev, b"full")
    new = retrieve_fd(sc, sess, 7)
    assert os.fstat(new).st_size == 5000
    assert os.lseek(new, 0, os.SEEK_CUR) == 4321
    assert os.pread(new, 8, 0) == b"LATEAAAA"
    assert fcntl.fcntl(new, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
    # "empty" is never retrieved: the next kexec does not carry it.
    os.close(dev)
    kexec(machine, kernel_image)
    assert machine.inspect()["incoming_sessions"] == []
    for fd in (empty, full, data, sess, new):
        os.close(fd)


def test_session_frozen_size_is_carried(make_machine: MakeMachine, kernel_image: int) -> None:
    machine = make_machine(Abi.SESSION, "g6")
    machine.boot()
    sc = machine.syscalls
    dev = open_dev(sc)
    grow, shrink = memfd_with(b"g" * 100), memfd_with(b"s" * 100)
    sess = create_session(sc, dev, b"s")
    preserve(sc, sess, grow, 1)
    preserve(sc, sess, shrink, 2)
    os.ftruncate(grow, 4096)  # the kernel would refuse both resizes
    os.ftruncate(shrink, 10)
    os.close(dev)
    kexec(machine, kernel_image)
    dev = open_dev(sc)
    sess2 = retrieve_session(sc, dev, b"s")
    new_grow, new_shrink = retrieve_fd(sc, sess2, 1), retrieve_fd(sc, sess2, 2)
    assert os.pread(new_grow, 200, 0) == b"g" * 100
    assert os.pread(new_shrink, 200, 0) == b"s" * 10 + bytes(90)
    assert "size changed from 100 to 4096" in machine.kernel_log()
    for fd in (grow, shrink, sess, dev, sess2, new_grow, new_shrink):
        os.close(fd)


def test_v3_kexec_normal_carries_nothing_prepared_carries(
    make_machine: MakeMachine, kernel_image: int
) -> None:
    machine = make_machine(Abi.V3)
    machine.boot()
    sc = machine.syscalls
    dev = open_dev(sc)
    m = memfd_with(b"payload", pos=3)
    v3_preserve(sc, dev, m, 0xABC)
    kexec(machine, kernel_image)  # NORMAL: ordinary kexec
    assert sysfs(sc) == "normal\n"
    assert machine.inspect()["incoming_files"] == []
    assert machine.inspect()["liveupdate_count"] == 0
    os.close(dev)
    dev = open_dev(sc)
    v3_preserve(sc, dev, m, 0xABC)
    v3_event(sc, dev, v3.liveupdate_event.LIVEUPDATE_PREPARE)
    assert sysfs(sc) == "prepared\n"
    kexec(machine, kernel_image)
    assert sysfs(sc) == "updated\n"
    os.close(dev)
    dev = open_dev(sc)
    new = v3_restore(sc, dev, 0xABC)
    assert cloexec(new)
    assert os.pread(new, 20, 0) == b"payload"
    assert os.lseek(new, 0, os.SEEK_CUR) == 3
    v3_event(sc, dev, v3.liveupdate_event.LIVEUPDATE_FINISH)
    assert sysfs(sc) == "normal\n"
    assert machine.inspect()["liveupdate_count"] == 1
    for fd in (dev, m, new):
        os.close(fd)


def test_rfc_v2_sysfs_and_kexec_from_frozen(make_machine: MakeMachine, kernel_image: int) -> None:
    machine = make_machine(Abi.RFC_V2)
    machine.boot()
    sc = machine.syscalls
    dev, other = open_dev(sc), open_dev(sc)  # not exclusive
    assert machine.inspect()["device_opens"] == 2
    m = memfd_with(b"rfc")
    buf = bytearray(struct.pack("<iIQ", m, 0, 0))
    sc.ioctl(dev, rfc_v2.LIVEUPDATE_IOCTL_FD_PRESERVE, buf)
    token = struct.unpack_from("<Q", buf, 8)[0]
    assert token == 1  # the documented rule: a per-boot counter from 1
    os.close(dev)  # RFC v2: close does nothing
    assert [f["token"] for f in machine.inspect()["files"]] == [1]
    states = []
    for request in (rfc_v2.LIVEUPDATE_IOCTL_EVENT_PREPARE, rfc_v2.LIVEUPDATE_IOCTL_EVENT_FREEZE):
        sc.ioctl(other, request, bytearray(b"ignored argument"))
        states.append(sysfs(sc))
    assert states == ["prepared\n", "frozen\n"]
    kexec(machine, kernel_image)
    assert sysfs(sc) == "updated\n"
    dev = open_dev(sc)
    state = bytearray(4)
    sc.ioctl(dev, rfc_v2.LIVEUPDATE_IOCTL_GET_STATE, state)
    assert struct.unpack("<I", state)[0] == rfc_v2.liveupdate_state.LIVEUPDATE_STATE_UPDATED
    buf = bytearray(struct.pack("<iIQ", -1, 0, token))
    sc.ioctl(dev, rfc_v2.LIVEUPDATE_IOCTL_FD_RESTORE, buf)
    new = struct.unpack_from("<i", buf, 0)[0]
    assert cloexec(new)
    assert os.pread(new, 10, 0) == b"rfc"
    # New tokens never collide with carried ones.
    buf = bytearray(struct.pack("<iIQ", m, 0, 0))
    sc.ioctl(dev, rfc_v2.LIVEUPDATE_IOCTL_FD_PRESERVE, buf)
    assert struct.unpack_from("<Q", buf, 8)[0] == 2
    for fd in (dev, other, m, new):
        os.close(fd)


def test_threads_sharing_one_device_fd_each_get_their_own_reply(
    make_machine: MakeMachine,
) -> None:
    """As with the kernel, an ioctl's reply reaches the thread that asked: the agent's loop reads
    the state on the fd its kernel thread preserves through."""
    machine = make_machine(Abi.RFC_V2)
    machine.boot()
    sc = machine.syscalls
    dev = open_dev(sc)
    data = memfd_with(b"shared")
    rounds = 200
    tokens: list[int] = []
    states: set[int] = set()

    def preserve_many() -> None:
        for _ in range(rounds):
            buf = bytearray(struct.pack("<iIQ", data, 0, 0))
            sc.ioctl(dev, rfc_v2.LIVEUPDATE_IOCTL_FD_PRESERVE, buf)
            tokens.append(struct.unpack_from("<Q", buf, 8)[0])

    def read_states() -> None:
        for _ in range(rounds):
            state = bytearray(4)
            sc.ioctl(dev, rfc_v2.LIVEUPDATE_IOCTL_GET_STATE, state)
            states.add(struct.unpack("<I", state)[0])

    workers = [threading.Thread(target=preserve_many), threading.Thread(target=read_states)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert tokens == list(range(1, rounds + 1))
    assert states == {rfc_v2.liveupdate_state.LIVEUPDATE_STATE_NORMAL}
    os.close(dev)
    os.close(data)


# --- kexec_file_load / reboot ------------------------------------------------------------------
def test_kexec_file_load_rules(
    make_machine: MakeMachine, tmp_path: Path, kernel_image: int
) -> None:
    machine = make_machine(Abi.V3)
    machine.boot()
    sc = machine.syscalls

    def err(fn: Callable[..., object], *args: object) -> int:
        return errno_of(lambda: fn(*args))

    assert err(sc.reboot_kexec) == errno.EINVAL  # nothing loaded
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    for bad in (os.open(empty, os.O_RDONLY), os.open(tmp_path, os.O_RDONLY)):
        assert err(sc.kexec_file_load, bad, -1, "", 0) == errno.EINVAL
        os.close(bad)
    r, w = os.pipe()
    assert err(sc.kexec_file_load, r, -1, "", 0) == errno.EINVAL
    os.close(r)
    os.close(w)
    assert err(sc.kexec_file_load, 9999, -1, "", 0) == errno.EBADF
    sc.kexec_file_load(kernel_image, kernel_image, "with initrd", 0)
    loaded = machine.inspect()["kexec_image"]
    assert (loaded["size"], loaded["cmdline"]) == (os.fstat(kernel_image).st_size, "with initrd")
    assert len(loaded["sha256"]) == 64
    sc.kexec_file_load(-1, -1, "", KEXEC_FILE_UNLOAD)
    assert machine.inspect()["kexec_image"] is None
    assert err(sc.reboot_kexec) == errno.EINVAL
    assert machine.running


# --- fault injection ----------------------------------------------------------------------------
def test_injected_reboot_failure_rolls_back(make_machine: MakeMachine, kernel_image: int) -> None:
    machine = make_machine(Abi.SESSION, "6.19")
    machine.boot()
    sc = machine.syscalls
    dev = open_dev(sc)
    sess = create_session(sc, dev, b"keep")
    m = memfd_with(b"data")
    preserve(sc, sess, m, 5)
    sc.kexec_file_load(kernel_image, -1, "x", 0)
    before = machine.inspect()
    machine.inject_fault("reboot", errno.EAGAIN)
    assert errno_of(lambda: sc.reboot_kexec()) == errno.EAGAIN
    assert machine.running
    assert not Path(machine.layout.handover).exists()
    after = machine.inspect()
    assert after["outgoing_sessions"] == before["outgoing_sessions"]
    assert after["kexec_image"] == before["kexec_image"]
    # The session is still usable; the retried reboot carries it.
    preserve(sc, sess, memfd_with(b"more"), 6)
    os.close(dev)
    sc.reboot_kexec()
    machine.wait_down()
    machine.boot()
    (incoming,) = machine.inspect()["incoming_sessions"]
    assert incoming["tokens"] == [5, 6]
    os.close(sess)
    os.close(m)


def test_inject_fault_on_ioctl_and_open(make_machine: MakeMachine) -> None:
    machine = make_machine(Abi.V3)
    machine.boot()
    sc = machine.syscalls
    machine.inject_fault("open", errno.EIO)
    assert errno_of(lambda: open_dev(sc)) == errno.EIO
    dev = open_dev(sc)
    machine.inject_fault("GET_STATE", errno.ENOMEM, count=2)
    assert machine.inspect()["faults"] == {"GET_STATE": [errno.ENOMEM, 2]}
    for _ in range(2):
        assert (
            errno_of(
                lambda: sc.ioctl(
                    dev, v3.LIVEUPDATE_IOCTL_GET_STATE, bytearray(struct.pack("<II", 8, 0))
                )
            )
            == errno.ENOMEM
        )
    sc.ioctl(dev, v3.LIVEUPDATE_IOCTL_GET_STATE, bytearray(struct.pack("<II", 8, 0)))
    # A failing PREPARE callback: the state stays NORMAL.
    machine.inject_fault("EVENT_PREPARE", errno.EIO)
    assert errno_of(lambda: v3_event(sc, dev, v3.liveupdate_event.LIVEUPDATE_PREPARE)) == errno.EIO
    assert sysfs(sc) == "normal\n"
    assert errno_of(lambda: machine.inject_fault("NO_SUCH_OP", errno.EIO)) == errno.EINVAL
    os.close(dev)


# --- handover image -----------------------------------------------------------------------------
def _leave_image(machine: EmulatedMachine, kernel_image: int) -> bytes:
    """Kexec with one carried file and return the image bytes (machine left down)."""
    sc = machine.syscalls
    dev = open_dev(sc)
    m = memfd_with(b"precious")
    if machine.abi == Abi.V3:
        v3_preserve(sc, dev, m, 1)
        v3_event(sc, dev, v3.liveupdate_event.LIVEUPDATE_PREPARE)
    else:
        preserve(sc, create_session(sc, dev, b"s"), m, 1)
    os.close(m)
    sc.kexec_file_load(kernel_image, -1, "next", 0)
    sc.reboot_kexec()
    machine.wait_down()
    return Path(machine.layout.handover).read_bytes()


def _corruptions(image: bytes) -> dict[str, bytes]:
    flipped = bytearray(image)
    flipped[HEADER.size + 2] ^= 0x40
    return {
        "truncated": image[: len(image) - 7],
        "truncated-header": image[:20],
        "flipped": bytes(flipped),
        "magic": b"NOTLUOEM" + image[8:],
        "empty": b"",
    }


@pytest.mark.parametrize("kind", ["truncated", "truncated-header", "flipped", "magic", "empty"])
def test_corrupt_image_panics_state_machine_kernel(
    make_machine: MakeMachine,
    kernel_image: int,
    kind: str,
) -> None:
    machine = make_machine(Abi.V3)
    machine.boot()
    image = _leave_image(machine, kernel_image)
    Path(machine.layout.handover).write_bytes(_corruptions(image)[kind])
    with pytest.raises(HandoverCorrupt, match="rejected"):
        machine.boot()
    assert not machine.running
    assert "Kernel panic" in machine.kernel_log()
    # Moved aside, never loaded: the next boot is a cold one.
    assert not Path(machine.layout.handover).exists()
    machine.boot()
    snap = machine.inspect()
    assert (snap["state"], snap["incoming_files"]) == ("normal", [])


@pytest.mark.parametrize("kind", ["truncated", "flipped", "magic"])
def test_corrupt_image_session_kernel_open_eio(
    make_machine: MakeMachine, kernel_image: int, kind: str
) -> None:
    machine = make_machine(Abi.SESSION, "g6")
    machine.boot()
    image = _leave_image(machine, kernel_image)
    Path(machine.layout.handover).write_bytes(_corruptions(image)[kind])
    machine.boot()  # boots, but LUO failed to deserialize
    for _ in range(2):
        assert errno_of(lambda: open_dev(machine.syscalls)) == errno.EIO
    snap = machine.inspect()
    assert snap["handover_failed"] is True
    assert snap["incoming_sessions"] == []


def test_image_for_another_generation_is_refused(
    make_machine: MakeMachine,
    kernel_image: int,
    tmp_path: Path,
) -> None:
    machine = make_machine(Abi.SESSION, "6.19")
    machine.boot()
    image = _leave_image(machine, kernel_image)
    v3_machine = EmulatedMachine(tmp_path / "v3root", Abi.V3)
    Path(v3_machine.layout.handover).write_bytes(image)
    with v3_machine, pytest.raises(HandoverCorrupt, match="generation"):
        v3_machine.boot()


def test_stale_temp_image_is_ignored_and_removed(
    make_machine: MakeMachine, kernel_image: int
) -> None:
    machine = make_machine(Abi.SESSION, "6.19")
    machine.boot()
    image = _leave_image(machine, kernel_image)
    layout = machine.layout
    # A crash mid-write: only the temp file exists, complete or not.
    Path(layout.handover).rename(layout.handover_tmp)
    machine.boot()
    assert not Path(layout.handover_tmp).exists()
    assert machine.inspect()["incoming_sessions"] == []
    assert machine.inspect()["liveupdate_count"] == 0
    machine.poweroff()
    # A complete image next to a stale temp file: the image loads, the temp file goes.
    Path(layout.handover).write_bytes(image)
    Path(layout.handover_tmp).write_bytes(image[:100])
    machine.boot()
    assert [s["name"] for s in machine.inspect()["incoming_sessions"]] == ["s"]
    assert not Path(layout.handover_tmp).exists()
    assert not Path(layout.handover).exists()  # consumed


def test_server_killed_while_writing_image_leaves_no_image(
    make_machine: MakeMachine, tmp_path: Path
) -> None:
    """SIGKILL the kernel server while it streams a large image: whatever is on disk, the next
    boot never accepts a partial image."""
    machine = make_machine(Abi.SESSION, "6.19")
    machine.boot()
    sc = machine.syscalls
    dev = open_dev(sc)
    sess = create_session(sc, dev, b"big")
    big = os.memfd_create("big", os.MFD_ALLOW_SEALING)
    os.ftruncate(big, 256 << 20)
    # Sealed: the 6.19 profile carries no seals, so this memfd goes through the image (a memfd
    # the next boot could not tell from a fresh one would be held in place, not written).
    fcntl.fcntl(big, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    preserve(sc, sess, big, 1)
    image = tmp_path / "k"
    image.write_bytes(b"k")
    kfd = os.open(image, os.O_RDONLY)
    sc.kexec_file_load(kfd, -1, "", 0)
    os.close(kfd)
    pid = machine.inspect()["pid"]
    tmp, final = Path(machine.layout.handover_tmp), Path(machine.layout.handover)
    # The reboot is asked for by a child; the server is killed once the temp file exists.
    code = (
        "from luo_agent.kernel.emulator import EmulatedSyscalls\n"
        f"EmulatedSyscalls({str(machine.root)!r}).reboot_kexec()\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": REPO},
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_file(tmp)
        os.kill(pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
        machine.wait_down()
    assert child.returncode != 0  # reboot() did not succeed
    assert not final.exists(), "256 MiB were written before the kill; enlarge the memfd"
    machine.boot()
    assert machine.inspect()["incoming_sessions"] == []
    assert machine.inspect()["liveupdate_count"] == 0
    assert not tmp.exists()
    for fd in (dev, sess, big):
        os.close(fd)


def _wait_for_file(path: Path) -> None:
    """Wait (inotify, no polling) until ``path`` exists."""
    libc = ctypes.CDLL(None, use_errno=True)
    ifd = libc.inotify_init1(os.O_CLOEXEC)
    assert ifd >= 0
    try:
        in_create = 0x100
        assert libc.inotify_add_watch(ifd, str(path.parent).encode(), in_create) >= 0
        while not path.exists():
            readable, _, _ = select.select([ifd], [], [], 30)
            assert readable, f"{path} never appeared"
            os.read(ifd, 4096)
    finally:
        os.close(ifd)


# --- large memfds held in place ----------------------------------------------------------------
def _kexec_keeping(machine: EmulatedMachine, kernel_image: int, fd: int) -> tuple[int, int]:
    """Preserve ``fd`` (token 1, session "s" or the v3 list), close it (its process is gone
    after a real kexec), kexec and leave the machine down; (image size, keeper pid or 0)."""
    sc = machine.syscalls
    dev = open_dev(sc)
    if machine.abi == Abi.V3:
        v3_preserve(sc, dev, fd, 1)
        v3_event(sc, dev, v3.liveupdate_event.LIVEUPDATE_PREPARE)
    else:
        preserve(sc, create_session(sc, dev, b"s"), fd, 1)
    os.close(fd)
    sc.kexec_file_load(kernel_image, -1, "next", 0)
    sc.reboot_kexec()
    machine.wait_down()
    image = read_image(machine.layout, machine.abi)
    assert image is not None
    image.close()
    return os.path.getsize(machine.layout.handover), image.keeper


def _pattern(size: int) -> bytes:
    return bytes(range(251)) * (size // 251) + bytes(size % 251)


def _exited(pid: int, timeout: float = 10.0) -> bool:
    """True once ``pid`` (> 0) has exited, within ``timeout``."""
    assert pid > 0
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([pidfd], [], [], timeout)[0])
    finally:
        os.close(pidfd)


def test_large_memfd_is_held_in_place_not_copied(
    make_machine: MakeMachine, kernel_image: int
) -> None:
    """What the next boot sees of a held memfd is what a copy gives: bytes, size, position,
    seals, a new O_RDWR open file; the image holds none of its bytes and its keeper goes once
    the next boot has taken it."""
    machine = make_machine(Abi.SESSION, "g6")
    machine.boot()
    size = 2 * HOLD_MIN_BYTES
    data = _pattern(size)
    big = os.memfd_create("big", os.MFD_ALLOW_SEALING)
    os.write(big, data)
    os.lseek(big, 12345, os.SEEK_SET)
    fcntl.fcntl(big, fcntl.F_SETFL, os.O_APPEND)
    fcntl.fcntl(big, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK)
    image_size, keeper = _kexec_keeping(machine, kernel_image, big)
    assert image_size < HOLD_MIN_BYTES and keeper > 0
    assert not _exited(keeper, 0.5)  # it holds the file while the machine is down
    machine.boot()
    sc = machine.syscalls
    got = retrieve_fd(sc, retrieve_session(sc, open_dev(sc), b"s"), 1)
    assert os.pread(got, size + 1, 0) == data
    assert os.fstat(got).st_size == size
    assert os.lseek(got, 0, os.SEEK_CUR) == 12345
    assert fcntl.fcntl(got, fcntl.F_GET_SEALS) == fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK
    assert fcntl.fcntl(got, fcntl.F_GETFL) & (os.O_ACCMODE | os.O_APPEND) == os.O_RDWR
    assert cloexec(got)
    assert _exited(keeper)
    os.close(got)


@pytest.mark.parametrize("why", ["seals not carried (6.19)", "mode", "size changed"])
def test_memfd_a_fresh_one_would_differ_from_is_copied(
    make_machine: MakeMachine, kernel_image: int, why: str
) -> None:
    """Held only when the next boot could not tell: otherwise the bytes go through the image
    and the next boot's memfd is a fresh one (unsealed on 6.19, its own mode, frozen size)."""
    machine = make_machine(Abi.SESSION, "6.19" if "6.19" in why else "g6")
    machine.boot()
    size = 2 * HOLD_MIN_BYTES
    big = os.memfd_create("big", os.MFD_ALLOW_SEALING)
    os.write(big, _pattern(size))
    change = {
        "seals not carried (6.19)": lambda: fcntl.fcntl(big, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW),
        "mode": lambda: os.fchmod(big, 0o600),
        "size changed": lambda: None,
    }
    change[why]()
    dup = os.dup(big)
    if why == "size changed":
        sc = machine.syscalls
        preserve(sc, create_session(sc, open_dev(sc), b"s"), big, 1)
        os.close(big)
        os.ftruncate(dup, size + 4096)  # the kernel would refuse it
        sc.kexec_file_load(kernel_image, -1, "next", 0)
        sc.reboot_kexec()
        machine.wait_down()
        image_size, keeper = os.path.getsize(machine.layout.handover), 0
    else:
        image_size, keeper = _kexec_keeping(machine, kernel_image, big)
    os.close(dup)
    assert image_size > size and keeper == 0
    machine.boot()
    sc = machine.syscalls
    got = retrieve_fd(sc, retrieve_session(sc, open_dev(sc), b"s"), 1)
    assert os.pread(got, size + 1, 0) == _pattern(size)
    assert fcntl.fcntl(got, fcntl.F_GET_SEALS) == 0
    assert os.fstat(got).st_mode & 0o777 != 0o600
    os.close(got)


def test_poweroff_lets_go_of_held_memfds(make_machine: MakeMachine, kernel_image: int) -> None:
    machine = make_machine(Abi.SESSION, "g6")
    machine.boot()
    big = os.memfd_create("big", os.MFD_ALLOW_SEALING)
    os.ftruncate(big, 4 * HOLD_MIN_BYTES)
    _size, keeper = _kexec_keeping(machine, kernel_image, big)
    assert keeper > 0
    machine.poweroff()
    assert _exited(keeper)  # like RAM at a power cycle
    machine.boot()
    assert machine.inspect()["incoming_sessions"] == []


@pytest.mark.parametrize(("abi", "profile"), [(Abi.SESSION, "g6"), (Abi.V3, None)])
def test_held_memfd_gone_is_a_corrupt_image(
    make_machine: MakeMachine, kernel_image: int, abi: str, profile: str | None
) -> None:
    """The keeper killed while the machine is down: the image names files that are gone."""
    machine = make_machine(abi, profile)
    machine.boot()
    # Sealable: a memfd without MFD_ALLOW_SEALING has F_SEAL_SEAL, which v3 does not carry.
    big = os.memfd_create("big", os.MFD_ALLOW_SEALING)
    os.ftruncate(big, 2 * HOLD_MIN_BYTES)
    _size, keeper = _kexec_keeping(machine, kernel_image, big)
    assert keeper > 0
    os.kill(keeper, signal.SIGKILL)
    assert _exited(keeper)
    if abi == Abi.V3:
        with pytest.raises(HandoverCorrupt, match="held file 0 is gone"):
            machine.boot()
        assert "Kernel panic" in machine.kernel_log()
    else:
        machine.boot()
        assert errno_of(lambda: open_dev(machine.syscalls)) == errno.EIO
        assert "held file 0 is gone" in machine.kernel_log()
    assert Path(machine.layout.handover_rejected).exists()


# --- fds and close semantics --------------------------------------------------------------------
def test_every_returned_fd_is_cloexec(make_machine: MakeMachine, kernel_image: int) -> None:
    machine = make_machine(Abi.SESSION, "g6")
    machine.boot()
    sc = machine.syscalls
    dev = open_dev(sc)
    sess = create_session(sc, dev, b"c")
    m = memfd_with(b"c")
    preserve(sc, sess, m, 1)
    assert cloexec(dev) and cloexec(sess)
    os.close(dev)
    kexec(machine, kernel_image)
    dev = open_dev(sc)
    incoming = retrieve_session(sc, dev, b"c")
    new = retrieve_fd(sc, incoming, 1)
    again = retrieve_fd(sc, incoming, 1)  # idempotent: the same open file again
    assert all(cloexec(fd) for fd in (dev, incoming, new, again))
    os.lseek(new, 1, os.SEEK_SET)
    assert os.lseek(again, 0, os.SEEK_CUR) == 1
    for fd in (dev, sess, m, incoming, new, again):
        os.close(fd)


def test_ioctl_on_foreign_fd_is_enotty(make_machine: MakeMachine, tmp_path: Path) -> None:
    machine = make_machine(Abi.SESSION, "6.19")
    machine.boot()
    sc = machine.syscalls
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    f = os.open(tmp_path, os.O_RDONLY)
    try:

        def create_errno(fd: int) -> int:
            return errno_of(
                lambda: sc.ioctl(fd, session.LIVEUPDATE_IOCTL_CREATE_SESSION, name_buf(b"x"))
            )

        assert [create_errno(a.fileno()), create_errno(f)] == [errno.ENOTTY, errno.ENOTTY]
    finally:
        a.close()
        b.close()
        os.close(f)


def test_exclusive_reopen_right_after_close(make_machine: MakeMachine) -> None:
    machine = make_machine(Abi.V3)
    machine.boot()
    sc = machine.syscalls
    for _ in range(50):  # close() must take effect before the next open, as in the kernel
        os.close(open_dev(sc))
    dev = open_dev(sc)
    assert errno_of(lambda: open_dev(sc)) == errno.EBUSY
    os.close(dev)


CHILD = textwrap.dedent("""
    import os, struct, sys, time
    from luo_agent.kernel.emulator import EmulatedSyscalls
    sc = EmulatedSyscalls(sys.argv[1])
    dev = sc.open(sc.path("/dev/liveupdate"), os.O_RDWR)
    m = os.memfd_create("child")
    os.write(m, b"child data")
    if sys.argv[2] == "global-list":
        sc.ioctl(dev, 0xBA00, bytearray(struct.pack("<IiQ", 16, m, 42)))
    else:
        buf = bytearray(72); struct.pack_into("<I", buf, 0, 72); buf[8:13] = b"child"
        sc.ioctl(dev, 0xBA00, buf)
        sess = struct.unpack_from("<i", buf, 4)[0]
        sc.ioctl(sess, 0xBA40, bytearray(struct.pack("<IiQ", 16, m, 42)))
    print("ready", flush=True)
    time.sleep(600)
""")


@pytest.mark.parametrize(("abi", "profile"), [(Abi.V3, None), (Abi.SESSION, "6.19")])
def test_process_death_closes_its_files(
    make_machine: MakeMachine, abi: str, profile: str | None
) -> None:
    machine = make_machine(abi, profile)
    machine.boot()
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(machine.root), "global-list" if abi == Abi.V3 else ""],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"ready\n"
        snap = machine.inspect()
        if abi == Abi.V3:
            assert [f["token"] for f in snap["files"]] == [42]
        else:
            assert [s["tokens"] for s in snap["outgoing_sessions"]] == [[42]]
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()
    snap = machine.inspect()
    assert snap["device_open"] is False
    if abi == Abi.V3:
        assert snap["files"] == []  # close of the device dropped every preserved file
        assert snap["state"] == "normal"
    else:
        assert snap["outgoing_sessions"] == []  # outgoing close = unpreserve + remove
    os.close(open_dev(machine.syscalls))  # the exclusive device is free again


def test_inspect_snapshot_shape(make_machine: MakeMachine, kernel_image: int) -> None:
    machine = make_machine(Abi.SESSION, "6.19")
    machine.boot()
    sc = machine.syscalls
    dev = open_dev(sc)
    sess = create_session(sc, dev, b"shape")
    m = memfd_with(b"12345", pos=2)
    preserve(sc, sess, m, 9)
    sc.kexec_file_load(kernel_image, -1, "c", 0)
    snap = machine.inspect()
    assert snap["generation"] == Abi.SESSION and snap["profile"] == "6.19"
    (out,) = snap["outgoing_sessions"]
    assert out["name"] == "shape" and out["tokens"] == [9]
    assert out["files"] == [{"token": 9, "size": 5, "frozen_size": 5, "pos": 2, "retrieved": False}]
    assert snap["kexec_image"]["cmdline"] == "c"
    json.dumps(snap)  # JSON-able
    for fd in (dev, sess, m):
        os.close(fd)


def test_cli_status_and_inspect(make_machine: MakeMachine) -> None:
    machine = make_machine(Abi.V3)
    env = {**os.environ, "PYTHONPATH": REPO}
    cli = [sys.executable, "-m", "luo_agent.kernel.emulator"]
    root = ["--root", str(machine.root)]
    status = subprocess.run([*cli, "status", *root], env=env, capture_output=True, text=True)
    assert (status.returncode, status.stdout) == (3, "down\n")
    down = subprocess.run([*cli, "inspect", *root], env=env, capture_output=True, text=True)
    assert down.returncode == 3 and "is down" in down.stderr and "Traceback" not in down.stderr
    machine.boot()
    status = subprocess.run([*cli, "status", *root], env=env, capture_output=True, text=True)
    assert (status.returncode, status.stdout) == (0, "running\n")
    out = subprocess.run(
        [*cli, "inspect", *root], env=env, capture_output=True, text=True, check=True
    )
    assert '"state": "normal"' in out.stdout
