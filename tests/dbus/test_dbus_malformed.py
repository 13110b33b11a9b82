"""Malformed calls get registered errors, the agent keeps serving, and no fd that arrives with a
call stays behind in the agent's process."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from luo_agent.client import CallError, call
from luo_agent.dbus.errors import ALL_ERROR_NAMES
from luo_agent.dbus.names import BUS_NAME, IFACE_MANAGER, OBJECT_PATH, error
from tests.dbus.harness import AgentHost, client_bus, disconnect, plain

STANDARD = "org.freedesktop.DBus.Error."


def fd_count() -> int:
    """Open fds of this process: the agent's and the client's (tests close their own)."""
    return len(os.listdir("/proc/self/fd"))


@contextmanager
def no_fd_leak() -> Iterator[None]:
    before = fd_count()
    yield
    assert fd_count() == before


def memfd() -> int:
    fd = os.memfd_create("malformed", os.MFD_CLOEXEC)
    os.write(fd, b"payload")
    return fd


async def raw(
    bus: MessageBus,
    member: str,
    signature: str = "",
    body: list[Any] | None = None,
    *,
    fds: list[int] | None = None,
    interface: str | None = IFACE_MANAGER,
    path: str = OBJECT_PATH,
) -> Message:
    reply = await bus.call(
        Message(
            destination=BUS_NAME,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            body=body or [],
            unix_fds=fds or [],
        )
    )
    assert reply is not None
    return reply


def assert_clean_error(reply: Message, expected: str | None = None) -> None:
    """An error reply with a registered (or standard bus) name and no traceback in it."""
    assert reply.message_type is MessageType.ERROR, reply.body
    name = reply.error_name or ""
    assert name in ALL_ERROR_NAMES or name.startswith(STANDARD), name
    text = str(reply.body[0]) if reply.body else ""
    assert "Traceback" not in text and 'File "' not in text, text
    if expected is not None:
        assert name == expected, (name, text)


async def still_serving(bus: MessageBus) -> None:
    (report,) = await call(bus, "Check")
    assert report["phase"].value == "idle"


BIG = "x" * (1 << 20)
KNOWN = Variant("s", "ok-id")


# ------------------------------------------------------------------ argument errors, no fds

MALFORMED: list[tuple[str, str, str, list[Any]]] = [
    # (expected error, member, signature, body)
    (f"{STANDARD}UnknownMethod", "Check", "s", ["surplus"]),
    (f"{STANDARD}UnknownMethod", "Prepare", "s", ["not a dict"]),
    (f"{STANDARD}UnknownMethod", "Execute", "u", [1]),
    (f"{STANDARD}UnknownMethod", "Retrieve", "ss", ["vm", "1"]),
    (f"{STANDARD}UnknownMethod", "NoSuchMethod", "", []),
    (error("InvalidArgument"), "Prepare", "a{sv}", [{"id": Variant("s", BIG)}]),
    (error("InvalidArgument"), "Prepare", "a{sv}", [{"idx": KNOWN}]),
    (error("InvalidArgument"), "Prepare", "a{sv}", [{"id": Variant("as", ["a"])}]),
    (error("InvalidArgument"), "Prepare", "a{sv}", [{f"k{i}": KNOWN for i in range(17)}]),
    (error("InvalidArgument"), "Execute", "s", [BIG]),
    (error("InvalidArgument"), "Cancel", "s", ["../../etc"]),
    (error("InvalidArgument"), "Finish", "s", ["a" * 65]),
    (error("InvalidArgument"), "Restore", "s", ["é"]),
    (error("InvalidArgument"), "Retrieve", "st", [BIG, 1]),
    (error("InvalidArgument"), "Retrieve", "st", ["", 1]),
    (error("InvalidArgument"), "Unpreserve", "st", ["s" * 64, 1]),
    (error("InvalidArgument"), "Unpreserve", "st", ["vm", 2**64 - 1]),
    (error("WrongPhase"), "Retrieve", "st", ["vm", 2**64 - 1]),
    # An fd index that names no fd of the message: never one of the agent's own fds.
    (error("InvalidArgument"), "Preserve", "hsta{sv}", [0, "vm", 1, {}]),
    (error("InvalidArgument"), "Preserve", "hsta{sv}", [2**32 - 1, "vm", 1, {}]),
    (error("InvalidArgument"), "LoadKernel", "hhsa{sv}", [3, 4, "", {}]),
]


@pytest.mark.parametrize(("expected", "member", "signature", "body"), MALFORMED)
async def test_malformed_call_gets_a_registered_error(
    client: MessageBus, expected: str, member: str, signature: str, body: list[Any]
) -> None:
    with no_fd_leak():
        reply = await raw(client, member, signature, body)
        assert_clean_error(reply, expected)
        await still_serving(client)


async def test_standard_interfaces_refuse_with_standard_errors(client: MessageBus) -> None:
    props = "org.freedesktop.DBus.Properties"
    for member, signature, body in (
        ("Set", "ssv", [IFACE_MANAGER, "Phase", Variant("s", "idle")]),
        ("Get", "ss", [IFACE_MANAGER, "NoSuchProperty"]),
        ("GetAll", "s", ["org.example.Nothing"]),
    ):
        reply = await raw(client, member, signature, body, interface=props)
        if reply.message_type is MessageType.ERROR:
            assert_clean_error(reply)
            assert (reply.error_name or "").startswith(STANDARD)
        else:  # GetAll of an unknown interface may answer an empty dict
            assert reply.body == [{}]
    assert_clean_error(await raw(client, "Check", path="/org/luoagent/Nope"))
    assert_clean_error(await raw(client, "Check", interface="org.example.Wrong"))
    await still_serving(client)


async def test_session_name_lengths_and_reserved_names(client: MessageBus) -> None:
    fd = memfd()
    try:
        for name in ("", "n" * 64, BIG, "luo-agent", "systemd"):
            with no_fd_leak():
                reply = await raw(client, "Preserve", "hsta{sv}", [0, name, 1, {}], fds=[fd])
                assert_clean_error(reply, error("InvalidArgument"))
        # The limits themselves are fine: 1 and 63 bytes, token 0 and 2**64-1.
        for name, token in (("n", 0), ("n" * 63, 2**64 - 1)):
            await call(client, "Preserve", "hsta{sv}", [0, name, token, {}], unix_fds=[fd])
    finally:
        os.close(fd)
    rows = plain(await call(client, "ListSessions"))[0]
    assert sorted((s, t) for s, t, _, _ in rows) == [("n", 0), ("n" * 63, 2**64 - 1)]
    await call(client, "Unpreserve", "st", ["n" * 63, 2**64 - 1])
    await call(client, "Unpreserve", "st", ["n", 0])


async def test_options_of_wrong_key_or_type_are_refused(client: MessageBus) -> None:
    fd = memfd()
    try:
        for options in (
            {"depends_on": Variant("a(st)", [])},
            {"depends-on": Variant("as", ["vm"])},
            {"depends-on": Variant("a(su)", [["vm", 1]])},
            {"no-initrd": Variant("b", True)},
        ):
            with no_fd_leak():
                reply = await raw(client, "Preserve", "hsta{sv}", [0, "vm", 1, options], fds=[fd])
                assert_clean_error(reply, error("InvalidArgument"))
        with no_fd_leak():
            reply = await raw(
                client,
                "LoadKernel",
                "hhsa{sv}",
                [0, 0, "", {"no-initrd": Variant("s", "yes")}],
                fds=[fd],
            )
            assert_clean_error(reply, error("InvalidArgument"))
    finally:
        os.close(fd)
    await still_serving(client)


# ------------------------------------------------------------------------- fds that must not stay


async def test_fds_that_are_not_memfds_are_refused_and_closed(
    client: MessageBus, tmp_path: Path
) -> None:
    regular = tmp_path / "regular"
    regular.write_bytes(b"data")
    read_end, write_end = os.pipe()
    candidates = {
        "pipe": read_end,
        "/dev/null": os.open("/dev/null", os.O_RDWR),
        "regular file": os.open(regular, os.O_RDWR),
        "directory": os.open(tmp_path, os.O_RDONLY),
    }
    try:
        with no_fd_leak():
            for kind, fd in candidates.items():
                reply = await raw(client, "Preserve", "hsta{sv}", [0, "vm", 1, {}], fds=[fd])
                assert_clean_error(reply, error("InvalidArgument"))
                assert "memfd" in str(reply.body[0]), kind
            await still_serving(client)
    finally:
        for fd in [*candidates.values(), write_end]:
            os.close(fd)


async def test_fds_nobody_takes_are_closed(host: AgentHost, client: MessageBus) -> None:
    """Fds on a call of the wrong signature, surplus fds, fds inside options, fds on a signal:
    dbus-fast would keep them all open in the agent (the fd guard in dbus/server.py closes
    them)."""
    fds = [memfd() for _ in range(3)]
    assert host.bus is not None
    agent_name = host.bus.unique_name
    try:
        with no_fd_leak():
            cases: list[tuple[str, str, list[Any], str]] = [
                ("Check", "h", [0], f"{STANDARD}UnknownMethod"),
                ("Preserve", "ssta{sv}", ["0", "vm", 1, {}], f"{STANDARD}UnknownMethod"),
                ("Preserve", "hsta{sv}", [0, "", 1, {}], error("InvalidArgument")),
                (
                    "Preserve",
                    "hsta{sv}",
                    [2, "vm", 1, {"x": Variant("h", 1)}],
                    error("InvalidArgument"),
                ),
                ("Prepare", "a{sv}", [{"id": Variant("h", 0)}], error("InvalidArgument")),
                ("Prepare", "a{sv}", [{"id": Variant("h", 7)}], error("InvalidArgument")),
                ("LoadKernel", "hhsa{sv}", [1, 1, "x" * 5000, {}], error("InvalidArgument")),
                ("Unpreserve", "st", ["vm", 1], error("InvalidArgument")),
            ]
            for member, signature, body, expected in cases:
                reply = await raw(client, member, signature, body, fds=fds)
                assert_clean_error(reply, expected)
            # A signal addressed to the agent, carrying fds.
            await client.send(
                Message(
                    message_type=MessageType.SIGNAL,
                    destination=agent_name,
                    path="/org/example",
                    interface="org.example.Noise",
                    member="Fds",
                    signature="h",
                    body=[0],
                    unix_fds=fds,
                )
            )
            # One more round trip: the agent has processed the signal by the time this returns.
            await still_serving(client)
    finally:
        for fd in fds:
            os.close(fd)


async def test_a_closed_fd_cannot_be_sent_and_the_agent_is_unaffected(client: MessageBus) -> None:
    """sendmsg refuses a closed fd (EBADF) in the caller: that connection fails, not the agent."""
    doomed = await client_bus()
    fd = memfd()
    os.close(fd)
    try:
        with pytest.raises((OSError, CallError, EOFError, Exception)):
            await asyncio.wait_for(
                call(doomed, "Preserve", "hsta{sv}", [0, "vm", 1, {}], unix_fds=[fd]), 10
            )
    finally:
        await disconnect(doomed)
    await still_serving(client)


async def test_retrieve_replies_do_not_leak_the_agents_copies(client: MessageBus) -> None:
    with no_fd_leak():
        for _ in range(20):
            reply = await raw(client, "Retrieve", "st", ["vm", 1])
            assert_clean_error(reply, error("WrongPhase"))


# --------------------------------------------------------------------------------- load


async def test_ten_thousand_rapid_calls_then_a_normal_call(client: MessageBus) -> None:
    second = await client_bus()
    started = time.monotonic()
    try:
        with no_fd_leak():
            # 50 rounds of 2 x 100 concurrent calls (a bus allows 128 pending replies per
            # connection by default, as the system bus does).
            for _ in range(50):
                replies = await asyncio.gather(
                    *(
                        call(bus, "Check" if i % 2 else "ListSessions")
                        for i in range(100)
                        for bus in (client, second)
                    )
                )
                assert len(replies) == 200
        assert time.monotonic() - started < 60
        await still_serving(client)
        fd = memfd()
        try:
            await call(client, "Preserve", "hsta{sv}", [0, "after-load", 1, {}], unix_fds=[fd])
        finally:
            os.close(fd)
        rows = plain(await call(second, "ListSessions"))[0]
        assert [r[0] for r in rows] == ["after-load"]
    finally:
        await disconnect(second)
