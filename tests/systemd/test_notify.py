"""sd_notify over a real AF_UNIX datagram socket."""

from __future__ import annotations

import array
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from luo_agent.systemd import notify


def _recv(sock: socket.socket) -> tuple[bytes, list[int]]:
    sock.settimeout(5)
    fd_size = array.array("i").itemsize
    data, ancdata, _flags, _addr = sock.recvmsg(4096, socket.CMSG_SPACE(8 * fd_size))
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fd_size])
    return data, list(fds)


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, dict[str, str]]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify"))
        yield sock, {"NOTIFY_SOCKET": str(tmp_path / "notify")}


def test_ready_with_status(path_socket: tuple[socket.socket, dict[str, str]]) -> None:
    sock, env = path_socket
    assert notify.ready("restored 2 sessions", env=env)
    assert _recv(sock) == (b"READY=1\nSTATUS=restored 2 sessions\n", [])


@pytest.mark.parametrize(
    ("send", "expected"),
    [
        (lambda env: notify.status("prepare", env=env), b"STATUS=prepare\n"),
        (lambda env: notify.watchdog(env=env), b"WATCHDOG=1\n"),
        (lambda env: notify.stopping(env=env), b"STOPPING=1\n"),
        (
            lambda env: notify.notify(env=env, EXTEND_TIMEOUT_USEC=5000000),
            b"EXTEND_TIMEOUT_USEC=5000000\n",
        ),
    ],
)
def test_simple_messages(
    path_socket: tuple[socket.socket, dict[str, str]],
    send: object,
    expected: bytes,
) -> None:
    sock, env = path_socket
    assert callable(send)
    assert send(env)
    assert _recv(sock) == (expected, [])


def test_abstract_address() -> None:
    name = f"luo-agent-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        assert notify.status("hello", env={"NOTIFY_SOCKET": "@" + name})
        assert _recv(sock) == (b"STATUS=hello\n", [])


def test_fdstore_passes_fds(path_socket: tuple[socket.socket, dict[str, str]]) -> None:
    sock, env = path_socket
    memfd = os.memfd_create("luo-state")
    try:
        os.write(memfd, b"state")
        assert notify.store_fds("state", [memfd], env=env)
        data, fds = _recv(sock)
    finally:
        os.close(memfd)
    assert data == b"FDSTORE=1\nFDNAME=state\n"
    assert len(fds) == 1
    try:  # the received descriptor is the same open file, still readable after ours closed
        assert os.pread(fds[0], 5, 0) == b"state"
    finally:
        os.close(fds[0])


def test_no_socket_is_a_noop() -> None:
    assert notify.ready(env={}) is False
    assert notify.notify(env={"NOTIFY_SOCKET": ""}, STATUS="x") is False


def test_malformed_fields_are_refused(path_socket: tuple[socket.socket, dict[str, str]]) -> None:
    _sock, env = path_socket
    with pytest.raises(ValueError, match="bad sd_notify field"):
        notify.status("two\nlines", env=env)


def test_missing_listener_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        notify.ready(env={"NOTIFY_SOCKET": str(tmp_path / "absent")})


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "3000000"}, 3.0),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}, 3.0),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert notify.watchdog_interval(env) == expected


def test_barrier_returns_once_the_manager_closed_the_pipe(
    path_socket: tuple[socket.socket, dict[str, str]],
) -> None:
    """sd_notify_barrier(3): the manager answers by closing the fd passed with BARRIER=1."""
    sock, env = path_socket
    sock.settimeout(5)
    with pytest.raises(OSError, match="BARRIER"):
        notify.barrier(0.2, env=env)  # nobody reads the socket: no answer
    data, fds = _recv(sock)
    assert data == b"BARRIER=1\n" and len(fds) == 1
    os.close(fds[0])

    def manager() -> None:
        data, fds = _recv(sock)
        assert data == b"BARRIER=1\n"
        for fd in fds:
            os.close(fd)

    answering = threading.Thread(target=manager)
    answering.start()
    assert notify.barrier(5, env=env)
    answering.join()
    assert notify.barrier(5, env={}) is False
