"""The typed device layer (RfcV2Device, V3Device, SessionDevice/LuoSession) on each generation.

Targets come from ``conftest.py``: every emulated generation, plus the real ``/dev/liveupdate``
(skipped with a reason unless it exists, we are root, and it speaks the test's generation).
Kernel-side effects (close semantics, what is preserved) are checked through the emulated
machine's ``inspect()``; on the real kernel only the typed results are checked.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from luo_agent.errors import (
    AlreadyExists,
    DeviceBusy,
    DeviceUnavailable,
    InvalidArgument,
    KernelError,
    NoSuchSession,
    NoSuchToken,
    Unsupported,
    WrongKernelState,
)
from luo_agent.kernel.device import GlobalEvent, GlobalState
from luo_agent.kernel.rfc_v2 import RfcV2Device
from luo_agent.kernel.session import LuoSession, SessionDevice, encode_session_name
from luo_agent.kernel.syscalls import SYSFS_STATE_PATH
from luo_agent.kernel.v3 import V3Device
from tests.kernel.luo_raw import Target, cloexec, kexec_reboot, memfd, read_all


# ------------------------------------------------------------------------------ helpers
def snapshot(target: Target) -> dict[str, Any] | None:
    """The emulated kernel's state, or None on the real kernel."""
    return None if target.machine is None else dict(target.machine.inspect())


def global_tokens(target: Target) -> set[int] | None:
    snap = snapshot(target)
    return None if snap is None else {f["token"] for f in snap["files"]}


def outgoing_sessions(target: Target) -> dict[str, set[int]] | None:
    snap = snapshot(target)
    if snap is None:
        return None
    return {s["name"]: {f["token"] for f in s["files"]} for s in snap["outgoing_sessions"]}


def incoming_sessions(target: Target) -> dict[str, dict[str, Any]] | None:
    snap = snapshot(target)
    return None if snap is None else {s["name"]: s for s in snap["incoming_sessions"]}


@pytest.fixture
def data_fd() -> Iterator[int]:
    fd = memfd(b"preserved bytes\n" * 64)
    os.lseek(fd, 5, os.SEEK_SET)
    yield fd
    os.close(fd)


@pytest.fixture
def spare() -> Iterator[list[int]]:
    """Extra memfds a test preserves; closed at teardown (the kernel holds its own reference)."""
    fds: list[int] = []
    yield fds
    for fd in fds:
        os.close(fd)


def new_memfd(spare: list[int], data: bytes) -> int:
    spare.append(memfd(data))
    return spare[-1]


@pytest.fixture
def unsupported_fd(tmp_path: Path) -> Iterator[int]:
    """A regular file: no LUO handler accepts it."""
    fd = os.open(tmp_path / "plain", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    yield fd
    os.close(fd)


def closed_fd_number() -> int:
    fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    os.close(fd)
    return fd


# ------------------------------------------------------------------------------ pure checks
@pytest.mark.parametrize(
    "name", ["", "x" * 64, "ü" * 32, "a\0b", "\udcff"], ids=["empty", "64", "ü*32", "nul", "surr"]
)
def test_session_names_are_validated_before_the_kernel(name: str) -> None:
    with pytest.raises(InvalidArgument):
        encode_session_name(name)


@pytest.mark.parametrize("name", ["a", "x" * 63, "ü" * 31 + "x", "vm-1 (prod)"])
def test_valid_session_names_encode_to_utf8(name: str) -> None:
    assert encode_session_name(name) == name.encode()


# ------------------------------------------------------------------------------ session ABI
def test_session_create_preserve_close_is_a_cancel(
    session_target: Target, data_fd: int, spare: list[int]
) -> None:
    with SessionDevice(session_target.sc) as dev:
        session = dev.create_session("h3-vm-1")
        assert (session.name, session.incoming) == ("h3-vm-1", False)
        assert session.fd >= 0
        assert cloexec(session.fd)
        session.preserve_fd(data_fd, token=0)  # token 0 is legal
        session.preserve_fd(new_memfd(spare, b"x"), token=2**64 - 1)
    # The device is closed; the session outlives it.
    assert outgoing_sessions(session_target) in (None, {"h3-vm-1": {0, 2**64 - 1}})
    session.close()
    session.close()  # idempotent
    assert session.closed
    assert outgoing_sessions(session_target) in (None, {})
    with pytest.raises(KernelError) as raised:
        session.preserve_fd(data_fd, token=1)
    assert raised.value.errno == errno.EBADF


def test_session_errors_are_domain_errors(
    session_target: Target, data_fd: int, unsupported_fd: int, spare: list[int]
) -> None:
    with SessionDevice(session_target.sc) as dev, dev.create_session("h3-errors") as session:
        with pytest.raises(AlreadyExists):
            dev.create_session("h3-errors")
        with pytest.raises(NoSuchSession, match="h3-never-carried"):
            dev.retrieve_session("h3-never-carried")
        with pytest.raises(Unsupported, match="file type cannot be preserved"):
            session.preserve_fd(unsupported_fd, token=1)
        with pytest.raises(KernelError) as raised:
            session.preserve_fd(closed_fd_number(), token=1)
        assert raised.value.errno == errno.EBADF
        session.preserve_fd(data_fd, token=1)
        with pytest.raises(AlreadyExists, match="token"):
            session.preserve_fd(new_memfd(spare, b"other"), token=1)
        with pytest.raises(InvalidArgument):
            dev.create_session("")
    assert outgoing_sessions(session_target) in (None, {})


def test_session_wrong_kind_calls_never_reach_the_kernel(session_target: Target) -> None:
    with SessionDevice(session_target.sc) as dev, dev.create_session("h3-kind") as session:
        before = snapshot(session_target)
        with pytest.raises(WrongKernelState, match="not incoming"):
            session.retrieve_fd(1)
        with pytest.raises(WrongKernelState, match="not incoming"):
            session.finish()
        assert snapshot(session_target) == before


def test_session_device_is_exclusive(session_target: Target) -> None:
    with SessionDevice(session_target.sc) as first:
        with pytest.raises(DeviceBusy):
            SessionDevice(session_target.sc).open()
        assert first.open() is first  # opening an open device is a no-op
    with SessionDevice(session_target.sc) as again:
        assert not again.closed


def test_get_name_on_g6_and_unsupported_on_6_19(session_target: Target) -> None:
    with SessionDevice(session_target.sc) as dev, dev.create_session("h3-named ü") as session:
        if session_target.g6:
            assert session.get_name() == "h3-named ü"
        else:
            with pytest.raises(Unsupported, match=r"GET_NAME: EINVAL"):
                session.get_name()


def test_session_detach_hands_the_fd_over(session_target: Target) -> None:
    with SessionDevice(session_target.sc) as dev:
        session = dev.create_session("h3-detach")
    fd = session.detach()
    session.close()  # no longer ours: must not close fd
    assert outgoing_sessions(session_target) in (None, {"h3-detach": set()})
    adopted = LuoSession(session_target.sc, fd, "h3-detach", incoming=False)
    adopted.close()
    assert outgoing_sessions(session_target) in (None, {})


def test_open_eio_means_reboot_normally(session_machine: Target) -> None:
    session_machine.machine.inject_fault("open", errno.EIO)
    with pytest.raises(DeviceUnavailable, match="reboot normally"):
        SessionDevice(session_machine.sc).open()


def test_session_round_trip_through_kexec(
    session_machine: Target, data_fd: int, kexec_image: Path, spare: list[int]
) -> None:
    with SessionDevice(session_machine.sc) as dev:
        vm = dev.create_session("h3-vm")
        empty_fd = dev.create_session("h3-empty").detach()  # kept open by the bare fd only
    vm.preserve_fd(data_fd, token=10)
    vm.preserve_fd(new_memfd(spare, b"discarded"), token=11)
    kexec_reboot(session_machine, kexec_image)
    vm.close()  # sockets of the old boot
    os.close(empty_fd)

    with SessionDevice(session_machine.sc) as dev:
        incoming = dev.retrieve_session("h3-vm")
        with pytest.raises(WrongKernelState, match="already retrieved"):
            dev.retrieve_session("h3-vm")
        with dev.retrieve_session("h3-empty") as empty:
            assert empty.incoming
    assert incoming.incoming
    with pytest.raises(WrongKernelState, match="not outgoing"):
        incoming.preserve_fd(data_fd, token=12)
    with pytest.raises(NoSuchToken):
        incoming.retrieve_fd(99)
    restored = incoming.retrieve_fd(10)
    try:
        assert cloexec(restored)
        assert read_all(restored) == b"preserved bytes\n" * 64
        assert os.lseek(restored, 0, os.SEEK_CUR) == 5
    finally:
        os.close(restored)
    if session_machine.g6:
        assert incoming.get_name() == "h3-vm"
    incoming.finish()
    incoming.finish()  # repeating FINISH is fine
    with pytest.raises(NoSuchToken):
        incoming.retrieve_fd(11)  # finish discarded it
    incoming.close()
    assert incoming_sessions(session_machine) == {}


# ------------------------------------------------------------------------------ v3 (G3)
def test_v3_preserve_unpreserve_and_errors(
    v3_target: Target, data_fd: int, unsupported_fd: int, spare: list[int]
) -> None:
    with V3Device(v3_target.sc) as dev:
        assert dev.get_state() is GlobalState.NORMAL
        dev.fd_preserve(data_fd, token=7)
        assert global_tokens(v3_target) in (None, {7})
        with pytest.raises(AlreadyExists):
            dev.fd_preserve(new_memfd(spare, b"y"), token=7)
        with pytest.raises(Unsupported):
            dev.fd_preserve(unsupported_fd, token=8)
        with pytest.raises(NoSuchToken):
            dev.fd_unpreserve(99)
        dev.fd_unpreserve(7)
        assert global_tokens(v3_target) in (None, set())
        with pytest.raises(InvalidArgument, match="freeze"):
            dev.set_event(GlobalEvent.FREEZE)


def test_v3_state_machine(v3_target: Target, data_fd: int) -> None:
    with V3Device(v3_target.sc) as dev:
        with pytest.raises(WrongKernelState):
            dev.set_event(GlobalEvent.FINISH)
        dev.set_event(GlobalEvent.PREPARE)
        assert dev.get_state() is GlobalState.PREPARED
        if v3_target.machine is not None:
            with open(v3_target.sc.path(SYSFS_STATE_PATH)) as f:
                assert f.read() == "prepared\n"
        with pytest.raises(WrongKernelState):
            dev.set_event(GlobalEvent.PREPARE)
        with pytest.raises(WrongKernelState, match="NORMAL or UPDATED"):
            dev.fd_preserve(data_fd, token=1)
        dev.set_event(GlobalEvent.CANCEL)
        assert dev.get_state() is GlobalState.NORMAL


def test_v3_exclusive_and_close_drops_every_file(v3_target: Target, data_fd: int) -> None:
    dev = V3Device(v3_target.sc).open()
    with pytest.raises(DeviceBusy):
        V3Device(v3_target.sc).open()
    dev.fd_preserve(data_fd, token=1)
    dev.close()
    dev.close()
    assert global_tokens(v3_target) in (None, set())
    with pytest.raises(KernelError) as raised:
        dev.get_state()
    assert raised.value.errno == errno.EBADF
    with V3Device(v3_target.sc) as reopened:
        assert reopened.get_state() is GlobalState.NORMAL


def test_v3_round_trip_through_kexec(v3_machine: Target, data_fd: int, kexec_image: Path) -> None:
    dev = V3Device(v3_machine.sc).open()
    dev.fd_preserve(data_fd, token=0xABC)
    dev.set_event(GlobalEvent.PREPARE)
    kexec_reboot(v3_machine, kexec_image)
    dev.close()
    with V3Device(v3_machine.sc) as dev:
        assert dev.get_state() is GlobalState.UPDATED
        with pytest.raises(NoSuchToken):
            dev.fd_restore(1)
        restored = dev.fd_restore(0xABC)
        try:
            assert cloexec(restored)
            assert read_all(restored) == b"preserved bytes\n" * 64
        finally:
            os.close(restored)
        dev.set_event(GlobalEvent.FINISH)
        assert dev.get_state() is GlobalState.NORMAL


# ------------------------------------------------------------------------------ rfc-v2 (G1)
def test_rfc_v2_preserve_and_events(rfc_v2_target: Target, data_fd: int, spare: list[int]) -> None:
    with RfcV2Device(rfc_v2_target.sc) as dev, RfcV2Device(rfc_v2_target.sc) as second:
        assert dev.get_state() is GlobalState.NORMAL  # 0-based NORMAL
        token = dev.fd_preserve(data_fd)
        other = second.fd_preserve(new_memfd(spare, b"z"))  # opens are not exclusive
        assert token != other
        with pytest.raises(NoSuchToken):
            dev.fd_unpreserve(max(token, other) + 1000)
        second.fd_unpreserve(other)
        with pytest.raises(WrongKernelState):
            dev.event_finish()
        dev.event_prepare()
        assert second.get_state() is GlobalState.PREPARED
        dev.event_freeze()
        assert dev.get_state() is GlobalState.FROZEN
        with pytest.raises(WrongKernelState):
            dev.event_freeze()
        dev.event_cancel()
        assert dev.get_state() is GlobalState.NORMAL
    # Closing an rfc-v2 device does nothing to what was preserved (no release handler).
    assert global_tokens(rfc_v2_target) in (None, {token})
    with RfcV2Device(rfc_v2_target.sc) as dev:
        dev.fd_unpreserve(token)
    assert global_tokens(rfc_v2_target) in (None, set())


def test_rfc_v2_round_trip_through_kexec(
    rfc_v2_machine: Target, data_fd: int, kexec_image: Path
) -> None:
    with RfcV2Device(rfc_v2_machine.sc) as dev:
        token = dev.fd_preserve(data_fd)
        dev.event_prepare()
    kexec_reboot(rfc_v2_machine, kexec_image)
    with RfcV2Device(rfc_v2_machine.sc) as dev:
        assert dev.get_state() is GlobalState.UPDATED
        restored = dev.fd_restore(token)
        try:
            assert read_all(restored) == b"preserved bytes\n" * 64
        finally:
            os.close(restored)
        dev.event_finish()
        assert dev.get_state() is GlobalState.NORMAL
