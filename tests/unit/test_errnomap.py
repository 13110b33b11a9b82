"""errnomap: every (operation, errno) the device layer can see becomes the right domain error."""

from __future__ import annotations

import errno as E

import pytest

from luo_agent.errors import (
    AlreadyExists,
    DeviceBusy,
    DeviceUnavailable,
    KernelError,
    NoSuchSession,
    NoSuchToken,
    Unsupported,
    WrongKernelState,
)
from luo_agent.kernel.errnomap import ANY_IOCTL, ERRNO_TABLE, TRANSITIONS, Op, os_error, translate

# (op, errno, domain class, a word the detail must contain) — the brief's table, row by row.
EXPECTED = [
    (Op.OPEN, E.ENOENT, DeviceUnavailable, "absent"),
    (Op.OPEN, E.ENODEV, DeviceUnavailable, "absent"),
    (Op.OPEN, E.EACCES, DeviceUnavailable, "permission"),
    (Op.OPEN, E.EBUSY, DeviceBusy, "exclusive"),
    (Op.OPEN, E.EIO, DeviceUnavailable, "deserialization"),
    (Op.OPEN, E.EIO, DeviceUnavailable, "reboot normally"),
    (Op.RETRIEVE_SESSION, E.ENOENT, NoSuchSession, "no incoming session"),
    (Op.RETRIEVE_SESSION, E.EINVAL, WrongKernelState, "already retrieved"),
    (Op.CREATE_SESSION, E.EEXIST, AlreadyExists, "outgoing session"),
    (Op.RETRIEVE_FD, E.ENOENT, NoSuchToken, "token"),
    (Op.FD_RESTORE, E.ENOENT, NoSuchToken, "token"),
    (Op.FD_UNPRESERVE, E.ENOENT, NoSuchToken, "token"),
    (Op.PRESERVE_FD, E.ENOENT, Unsupported, "file type cannot be preserved"),
    (Op.FD_PRESERVE, E.ENOENT, Unsupported, "file type cannot be preserved"),
    (Op.PRESERVE_FD, E.EEXIST, AlreadyExists, "token"),
    (Op.FD_PRESERVE, E.EEXIST, AlreadyExists, "token"),
    (Op.PRESERVE_FD, E.EBUSY, AlreadyExists, "already preserved"),
    (Op.FD_PRESERVE, E.EBUSY, WrongKernelState, "NORMAL or UPDATED"),
    (Op.PRESERVE_FD, E.EINVAL, WrongKernelState, "outgoing"),
    (Op.RETRIEVE_FD, E.EINVAL, WrongKernelState, "incoming"),
    (Op.FINISH, E.EINVAL, WrongKernelState, "incoming"),
    (Op.FINISH, E.EBUSY, WrongKernelState, "cannot finish"),
    (Op.GET_NAME, E.EINVAL, Unsupported, "6.19"),
    (Op.GET_NAME, E.ENOTTY, Unsupported, "not implemented"),
    (Op.CREATE_SESSION, E.ENOTTY, Unsupported, "not implemented"),
    (Op.SET_EVENT, E.EOPNOTSUPP, Unsupported, "not supported"),
    (Op.FD_PRESERVE, E.EBADF, KernelError, "not open"),
    (Op.PRESERVE_FD, E.ENOSPC, KernelError, "full"),
    (Op.REBOOT_KEXEC, E.EAGAIN, KernelError, "sessions intact"),
    (Op.KEXEC_FILE_LOAD, E.ENOSYS, Unsupported, "kexec_file_load"),
]


@pytest.mark.parametrize(("op", "err", "cls", "word"), EXPECTED)
def test_translate_gives_the_operation_specific_meaning(
    op: Op, err: int, cls: type[KernelError], word: str
) -> None:
    exc = translate(op, os_error(err))
    assert type(exc) is cls
    assert (exc.op, exc.errno) == (op.value, err)
    assert word in exc.detail
    assert str(exc).startswith(f"{op.value}: {E.errorcode[err]} (")


@pytest.mark.parametrize("op", sorted(TRANSITIONS))
@pytest.mark.parametrize("err", [E.EINVAL, E.EBUSY])
def test_refused_transitions_are_wrong_kernel_state(op: Op, err: int) -> None:
    assert type(translate(op, os_error(err))) is WrongKernelState


@pytest.mark.parametrize("op", [op for op in Op if op not in {Op.OPEN, Op.CLOSE}])
def test_enotty_means_unsupported_on_every_ioctl_and_nothing_else(op: Op) -> None:
    exc = translate(op, os_error(E.ENOTTY))
    is_ioctl = op not in {Op.KEXEC_FILE_LOAD, Op.REBOOT_KEXEC}
    assert type(exc) is (Unsupported if is_ioctl else KernelError)


@pytest.mark.parametrize("op", list(Op))
def test_unlisted_errno_is_a_plain_kernel_error(op: Op) -> None:
    exc = translate(op, os_error(E.EXDEV))
    assert type(exc) is KernelError
    assert (exc.errno, exc.detail) == (E.EXDEV, "")


def test_every_table_row_round_trips_op_and_errno() -> None:
    for (op, err), (cls, detail) in ERRNO_TABLE.items():
        exc = translate(op, os_error(err))
        assert (type(exc), exc.op, exc.errno, exc.detail) == (cls, op.value, err, detail)
    for err, (cls, _) in ANY_IOCTL.items():
        assert type(translate(Op.GET_STATE, os_error(err))) is cls


def test_open_ebusy_is_device_busy_not_wrong_state() -> None:
    # The agent's backoff keys on DeviceBusy; a transition's EBUSY must not look like it.
    assert isinstance(translate(Op.OPEN, os_error(E.EBUSY)), DeviceBusy)
    assert not isinstance(translate(Op.SET_EVENT, os_error(E.EBUSY)), DeviceBusy)


def test_subject_is_appended_to_the_detail() -> None:
    exc = translate(Op.RETRIEVE_SESSION, os_error(E.ENOENT), "session 'vm-1'")
    assert exc.detail == "no incoming session has this name (session 'vm-1')"
    bare = translate(Op.GET_STATE, os_error(E.EXDEV), "fd 7")
    assert bare.detail == "fd 7"


def test_oserror_without_errno_becomes_eio() -> None:
    exc = translate(Op.GET_STATE, OSError("no errno"))
    assert (type(exc), exc.errno) == (KernelError, E.EIO)
