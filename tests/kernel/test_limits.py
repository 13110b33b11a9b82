"""Fixed 6.19 limits (744 sessions, 128 files per session; kernel-abi.md §7.2/§7.3, exact 6.19.0
values UNCONFIRMED) and the dynamic G6 ones (selftests: 2000 sessions, 500 files, §9/§10; Linux 7.2
stops only at 10000 KHO blocks, see docs/emulator.md)."""

from __future__ import annotations

import errno
import os
import resource
import struct
from collections.abc import Iterator

import pytest

from luo_agent.kernel.uapi import session
from tests.kernel.luo_raw import Target, create_session, create_session_buf, errno_of, memfd

LIMITS = {"6.19": (744, 128), "g6": (2000, 500)}


@pytest.fixture(autouse=True)
def _raise_nofile() -> Iterator[None]:
    """Autouse fixtures run before the target boots, so the server inherits the limit too."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _need_fds(count: int) -> None:
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < count + 256:
        pytest.skip(f"RLIMIT_NOFILE hard limit too low for {count} fds")


@pytest.mark.slow
def test_session_count_limit(session_target: Target) -> None:
    t = session_target
    assert t.profile is not None
    max_sessions = LIMITS[t.profile][0]
    _need_fds(max_sessions)
    dev = t.open_device()
    sessions = [create_session(t.sc, dev, f"s-{i}") for i in range(max_sessions)]
    try:
        assert len(set(sessions)) == max_sessions
        if not t.g6:
            # outgoing table full (16 pages)
            err = errno_of(
                t.sc.ioctl,
                dev,
                session.LIVEUPDATE_IOCTL_CREATE_SESSION,
                create_session_buf("one-too-many"),
            )
            assert err == errno.ENOMEM
    finally:
        for fd in sessions:
            os.close(fd)
    # all gone again: the names are free
    t.track(create_session(t.sc, dev, "s-0"))


@pytest.mark.slow
def test_files_per_session_limit(session_target: Target) -> None:
    t = session_target
    assert t.profile is not None
    max_files = LIMITS[t.profile][1]
    _need_fds(max_files)
    sess = t.track(create_session(t.sc, t.open_device(), "many-files"))
    fds = [memfd(struct.pack("<I", i)) for i in range(max_files + 1)]
    try:
        for token, fd in enumerate(fds[:max_files]):  # tokens 0..N-1: token 0 is valid
            buf = bytearray(struct.pack("<IiQ", 16, fd, token))
            assert t.sc.ioctl(sess, session.LIVEUPDATE_SESSION_PRESERVE_FD, buf) == 0
        if not t.g6:
            # session full (2 pages) -> ENOSPC, checked before the fd itself (order of §7.3)
            for fd in (fds[max_files], -1):
                buf = bytearray(struct.pack("<IiQ", 16, fd, max_files))
                err = errno_of(t.sc.ioctl, sess, session.LIVEUPDATE_SESSION_PRESERVE_FD, buf)
                assert err == errno.ENOSPC
            # but a duplicate token is still EEXIST (check 1 before check 2)
            buf = bytearray(struct.pack("<IiQ", 16, fds[max_files], 0))
            err = errno_of(t.sc.ioctl, sess, session.LIVEUPDATE_SESSION_PRESERVE_FD, buf)
            assert err == errno.EEXIST
    finally:
        for fd in fds:
            os.close(fd)
