"""Input limits at the D-Bus boundary, before anything reaches the kernel: session names, tokens,
fd kinds, per-session and total counts (the configured limits), option dictionaries, ids and
command lines.  Every refusal is a named error with a clear message; the emulated kernel's state
is the same before and after."""

from __future__ import annotations

from typing import Any

import pytest

from luo_agent.dbus.names import error
from luo_agent.kernel.emulator import EmulatedMachine
from tests.agent_host import AgentProcess
from tests.security.conftest import needs_root_namespaces
from tests.security.harness import SessionBus
from tests.security.wire import perform_all

pytestmark = needs_root_namespaces

INVALID = error("InvalidArgument")


def preserve(
    session: str, token: int = 1, kind: str = "memfd", options: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "member": "Preserve",
        "signature": "hsta{sv}",
        "body": [{"$fd": kind, "data": "x"}, session, token, options or {}],
    }


async def run(bus: SessionBus, *calls: dict[str, Any]) -> list[tuple[str, str]]:
    return [(r["error"], r["message"]) for r in await perform_all(bus.address, list(calls))]


async def test_session_names(
    session_bus: SessionBus, session_agent: AgentProcess, machine: EmulatedMachine
) -> None:
    kernel_before = machine.inspect()
    results = await run(
        session_bus,
        preserve("a" * 63),
        preserve("€" * 21),  # 63 bytes of UTF-8
        preserve("a" * 64),
        preserve("€" * 22),  # 22 characters, 66 bytes
        preserve(""),
        preserve("systemd"),
        preserve("luo-agent"),
        {"member": "Unpreserve", "signature": "st", "body": ["b" * 64, 1]},
        {"member": "Retrieve", "signature": "st", "body": ["", 1]},
    )
    assert [name for name, _ in results] == ["", ""] + [INVALID] * 7, results
    assert "1-63 bytes" in results[2][1]
    assert "1-63 bytes" in results[3][1]
    assert "reserved" in results[5][1] and "reserved" in results[6][1]
    assert machine.inspect() == kernel_before


async def test_tokens_span_u64_and_nothing_else(
    session_bus: SessionBus, session_agent: AgentProcess
) -> None:
    results = await run(
        session_bus,
        preserve("t", 0),
        preserve("t", 2**64 - 1),
        preserve("t", 0),  # taken
        # A signed or string token is another signature: no such method.
        {"member": "Preserve", "signature": "hsxa{sv}", "body": [{"$fd": "memfd"}, "t", -1, {}]},
        {"member": "Preserve", "signature": "hssa{sv}", "body": [{"$fd": "memfd"}, "t", "1", {}]},
    )
    assert [name for name, _ in results] == [
        "",
        "",
        error("AlreadyExists"),
        "org.freedesktop.DBus.Error.UnknownMethod",
        "org.freedesktop.DBus.Error.UnknownMethod",
    ], results


@pytest.mark.parametrize(
    ("kind", "described"),
    [
        ("pipe", "pipe"),
        ("socket", "socket"),
        ("devnull", "character device"),
        ("directory", "directory"),
        ("regular", "regular file"),
    ],
)
async def test_only_memfds_are_accepted(
    session_bus: SessionBus, session_agent: AgentProcess, kind: str, described: str
) -> None:
    ((name, message),) = await run(session_bus, preserve("kinds", 1, kind))
    assert name == INVALID
    assert message == f"only memfds can be preserved by this kernel, got a {described}"


async def test_counts_per_session_and_in_total(
    session_bus: SessionBus, session_agent: AgentProcess, machine: EmulatedMachine
) -> None:
    """The test config: 3 sessions, 2 fds per session, 4 fds in all."""
    kernel_before = machine.inspect()
    results = await run(
        session_bus,
        preserve("s1", 1),
        preserve("s1", 2),
        preserve("s1", 3),  # session full
        preserve("s2", 1),
        preserve("s3", 1),
        preserve("s4", 1),  # too many sessions
        preserve("s2", 2),  # registry full
    )
    names = [name for name, _ in results]
    assert names == ["", "", INVALID, "", "", INVALID, INVALID], results
    assert "'s1' is full (2 fds)" in results[2][1]
    assert "too many sessions (3)" in results[5][1]
    assert "the registry is full (4 fds)" in results[6][1]
    assert machine.inspect() == kernel_before


async def test_option_dictionaries(session_bus: SessionBus, session_agent: AgentProcess) -> None:
    many = {f"k{i}": {"$variant": ["b", True]} for i in range(17)}
    results = await run(
        session_bus,
        preserve("o", 1, options=many),
        preserve("o", 1, options={"depends-on": {"$variant": ["s", "o"]}}),
        preserve("o", 1, options={"unknown": {"$variant": ["b", True]}}),
        preserve("o", 1, options={"depends-on": {"$variant": ["a(st)", [["o", 9]]]}}),
        {"member": "Prepare", "signature": "a{sv}", "body": [many]},
        {"member": "Prepare", "signature": "a{sv}", "body": [{"id": {"$variant": ["s", "a b"]}}]},
        {
            "member": "Prepare",
            "signature": "a{sv}",
            "body": [{"id": {"$variant": ["s", "x" * 65]}}],
        },
        {"member": "Prepare", "signature": "a{sv}", "body": [{"id": {"$variant": ["u", 1]}}]},
    )
    assert [name for name, _ in results] == [INVALID] * 8, results
    assert "too many options (17 > 16)" in results[0][1]
    assert "must have type a(st)" in results[1][1]
    assert "unknown option 'unknown'" in results[2][1]
    assert "not registered" in results[3][1]


async def test_an_unknown_option_is_named_within_bounds(
    session_bus: SessionBus, session_agent: AgentProcess
) -> None:
    key = "k" * (1 << 20)
    ((name, message),) = await run(
        session_bus, preserve("o", 1, options={key: {"$variant": ["b", True]}})
    )
    assert name == INVALID
    assert message.startswith("unknown option 'kkkk") and f"({1 << 20} characters)" in message
    assert len(message) < 200, len(message)
    assert "k" * 100 not in session_agent.log_text()  # nor in the log line


async def test_command_line_and_update_ids(
    session_bus: SessionBus, session_agent: AgentProcess
) -> None:
    regular = {"$fd": "regular"}
    results = await run(
        session_bus,
        {
            "member": "LoadKernel",
            "signature": "hhsa{sv}",
            "body": [regular, regular, "x" * 4097, {}],
        },
        {"member": "Execute", "signature": "s", "body": ["x" * 100_000]},
        {"member": "Cancel", "signature": "s", "body": ["../../etc"]},
    )
    assert [name for name, _ in results] == [INVALID] * 3, results
