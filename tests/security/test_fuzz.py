"""Thousands of malformed and hostile calls from a seeded generator: random members, interfaces,
paths and signatures, well-typed calls with hostile values (huge strings, deep variants, option
dicts of the wrong shape, fds of every kind, fd indices that point nowhere).  The agent must stay
up, answer every call with a registered error name (its own or ``org.freedesktop.DBus.Error.*``)
or a normal reply, and hold exactly as many fds afterwards as before.

Runs on a private session bus (the caller is the agent's own uid, so every call gets past
authorisation and into the code that handles it)."""

from __future__ import annotations

import asyncio
import os
import random
import string
from typing import Any

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from luo_agent import phase as ph
from luo_agent.dbus.errors import ALL_ERROR_NAMES
from luo_agent.dbus.names import BUS_NAME, IFACE_MANAGER, IFACE_UPDATE, OBJECT_PATH, update_path
from tests.agent_host import AgentProcess
from tests.security.conftest import needs_root_namespaces, wait_phase
from tests.security.harness import SessionBus, open_fd_count
from tests.security.wire import make_fd, perform_all

pytestmark = needs_root_namespaces

SEED = 20251128
CALLS = 3000
IN_FLIGHT = 1
MAX_FDS = 8
REPLY_TIMEOUT = 5.0
FD_KINDS = ("memfd", "pipe", "socket", "devnull", "directory", "regular")
PREPARE_TARGET = ph.SPECS[ph.Phase.PREPARING].target

# The API's methods with their real signatures: half the calls use these, with hostile values.
METHODS: dict[str, str] = {
    "Check": "",
    "Prepare": "a{sv}",
    "Execute": "s",
    "Cancel": "s",
    "Restore": "s",
    "Finish": "s",
    "LoadKernel": "hhsa{sv}",
    "Preserve": "hsta{sv}",
    "Unpreserve": "st",
    "Retrieve": "st",
    "ListSessions": "",
    "GetHistory": "u",
}
OPTION_KEYS = ("id", "no-initrd", "depends-on", "", "x" * 300, "ID", "depends_on")
BASIC = "ybnqiuxtdsogh"


class Generator:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def text(self) -> str:
        rng = self.rng
        match rng.randrange(8):
            case 0:
                return ""
            case 1:
                return "x" * rng.choice((63, 64, 4097, 1 << 16, 1 << 20))
            case 2:
                return rng.choice(("systemd", "luo-agent", "../..", "a/b", "-", "€" * 22))
            case 3:
                # Any valid UTF-8 except NUL (the wire forbids it in strings).
                return "".join(chr(rng.randrange(1, 0xD7FF)) for _ in range(rng.randrange(1, 40)))
            case _:
                return "".join(rng.choices(string.ascii_letters + "-_", k=rng.randrange(1, 20)))

    def signature(self, depth: int = 0) -> str:
        rng = self.rng
        if depth > 3 or rng.random() < 0.6:
            return rng.choice(BASIC + "v")
        match rng.randrange(3):
            case 0:
                return "a" + self.signature(depth + 1)
            case 1:
                return "a{" + rng.choice("sut") + self.signature(depth + 1) + "}"
            case _:
                return (
                    "(" + "".join(self.signature(depth + 1) for _ in range(rng.randint(1, 3))) + ")"
                )

    def variant(self, depth: int) -> Variant:
        if depth <= 0:
            return Variant("s", self.text())
        return Variant("v", self.variant(depth - 1))

    def value(self, sig: str, fds: list[int]) -> Any:
        """A value of the (single complete) type ``sig``."""
        rng = self.rng
        head = sig[0]
        match head:
            case "y":
                return rng.randrange(256)
            case "b":
                return rng.random() < 0.5
            case "n":
                return rng.randrange(-(2**15), 2**15)
            case "q":
                return rng.randrange(2**16)
            case "i":
                return rng.randrange(-(2**31), 2**31)
            case "u":
                return rng.choice((0, 1, 2**32 - 1, rng.randrange(2**32)))
            case "x":
                return rng.randrange(-(2**63), 2**63)
            case "t":
                return rng.choice((0, 1, 2**64 - 1, rng.randrange(2**64)))
            case "d":
                return rng.choice((0.0, -1.0, 1e308, float("inf"), float("nan")))
            case "s":
                return self.text()
            case "o":
                return rng.choice(("/", OBJECT_PATH, update_path("x"), "/a/b_c/" + "d" * 200))
            case "g":
                return self.signature()
            case "h":
                # Over the bus's per-message limit (16) the bus would drop the caller.
                if rng.random() < 0.1 or len(fds) >= MAX_FDS:
                    return len(fds) + rng.randrange(5)  # an index no fd answers
                fds.append(make_fd(rng.choice(FD_KINDS), self.text()[:64]))
                return len(fds) - 1
            case "v":
                if rng.random() < 0.2:
                    return self.variant(rng.randrange(1, 30))
                inner = self.signature(2)
                return Variant(inner, self.value(inner, fds))
            case "a":
                if sig.startswith("a{"):
                    key, value = _split(sig[2:-1])
                    return {
                        self.value(key, fds): self.value(value, fds)
                        for _ in range(rng.choice((0, 1, 3, 20)))
                    }
                if sig == "ay":
                    return rng.randbytes(rng.choice((0, 1, 4096)))
                return [self.value(sig[1:], fds) for _ in range(rng.choice((0, 1, 3)))]
            case "(":
                return [self.value(part, fds) for part in _parts(sig[1:-1])]
        raise AssertionError(sig)

    def options(self, fds: list[int]) -> dict[str, Variant]:
        out: dict[str, Variant] = {}
        for _ in range(self.rng.choice((0, 1, 2, 17))):
            inner = self.rng.choice(("s", "b", "a(st)", "h", "v", "as"))
            out[self.rng.choice(OPTION_KEYS) + str(len(out))[: self.rng.randrange(2)]] = Variant(
                inner, self.value(inner, fds)
            )
        return out

    def call(self) -> tuple[Message, list[int]]:
        rng = self.rng
        fds: list[int] = []
        member = rng.choice([*METHODS, "Set", "NoSuchMethod", "Introspect", "Ping", "Get"])
        interface: str | None = IFACE_MANAGER
        path = OBJECT_PATH
        roll = rng.random()
        if roll < 0.1:
            interface = rng.choice(
                (
                    None,
                    "org.freedesktop.DBus.Properties",
                    "org.freedesktop.DBus.Introspectable",
                    "org.freedesktop.DBus.Peer",
                    IFACE_UPDATE,
                    "org.luoagent.Nope",
                )
            )
        elif roll < 0.15:
            path = rng.choice(("/", update_path("x"), "/org/luoagent/LiveUpdate1/update"))
        if member in METHODS and rng.random() < 0.5:
            signature = METHODS[member]
        else:
            signature = "".join(self.signature() for _ in range(rng.randrange(4)))
        body = [self.value(part, fds) for part in _parts(signature)]
        if member in ("Prepare", "LoadKernel", "Preserve") and signature == METHODS[member]:
            body[-1] = self.options(fds)
        message = Message(
            destination=BUS_NAME,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            body=body,
            unix_fds=fds,
        )
        return message, fds


def _parts(signature: str) -> list[str]:
    """Split a signature into its complete types."""
    parts: list[str] = []
    i = 0
    while i < len(signature):
        j = _end_of_type(signature, i)
        parts.append(signature[i:j])
        i = j
    return parts


def _end_of_type(signature: str, i: int) -> int:
    head = signature[i]
    if head == "a":
        return _end_of_type(signature, i + 1)
    if head in "({":
        close = ")" if head == "(" else "}"
        j = i + 1
        while signature[j] != close:
            j = _end_of_type(signature, j)
        return j + 1
    return i + 1


def _split(pair: str) -> tuple[str, str]:
    key_end = _end_of_type(pair, 0)
    return pair[:key_end], pair[key_end:]


def acceptable(reply: Message) -> bool:
    if reply.message_type == MessageType.METHOD_RETURN:
        return True
    name = reply.error_name or ""
    return name in ALL_ERROR_NAMES or name.startswith("org.freedesktop.DBus.Error.")


async def settle(bus: SessionBus) -> None:
    """Back to a quiet agent: no update, no handed-in fds."""
    (phase,) = await perform_all(
        bus.address,
        [
            {
                "interface": "org.freedesktop.DBus.Properties",
                "member": "Get",
                "signature": "ss",
                "body": [IFACE_MANAGER, "Phase"],
            }
        ],
    )
    if phase["body"][0]["$variant"][1] != "idle":
        await perform_all(bus.address, [{"member": "Cancel", "signature": "s", "body": [""]}])
        await wait_phase(bus.address, "idle")
    (listed,) = await perform_all(bus.address, [{"member": "ListSessions"}])
    unpreserve = [
        {"member": "Unpreserve", "signature": "st", "body": [session, token]}
        for session, token, _, _ in reversed(listed["body"][0])
    ]
    results = await perform_all(bus.address, unpreserve)
    assert all(not r["error"] for r in results), results


async def test_hostile_calls(session_bus: SessionBus, machine: Any, tmp_path: Any) -> None:
    # Prepare hangs in its gate, so no call can ever reach the kexec; cancel always works.
    agent = AgentProcess(
        tmp_path / "agent", machine, "session", env=session_bus.env, hang=[PREPARE_TARGET]
    )
    try:
        # Warm up every path that opens something once (the kernel image copies, an update).
        regular = {"$fd": "regular"}
        warm = await perform_all(
            session_bus.address,
            [
                {
                    "member": "LoadKernel",
                    "signature": "hhsa{sv}",
                    "body": [regular, regular, "", {}],
                },
                {"member": "Prepare", "signature": "a{sv}", "body": [{}]},
                {"member": "Cancel", "signature": "s", "body": [""]},
            ],
        )
        assert [r["error"] for r in warm] == ["", "", ""], warm
        await wait_phase(session_bus.address, "idle")
        baseline = open_fd_count(agent.pid)

        generator = Generator(SEED)
        bus = await MessageBus(bus_address=session_bus.address, negotiate_unix_fd=True).connect()
        bad: list[tuple[str, str, str, str]] = []
        seen: dict[str, int] = {}
        try:
            semaphore = asyncio.Semaphore(IN_FLIGHT)

            async def one(message: Message, fds: list[int]) -> None:
                async with semaphore:
                    try:
                        async with asyncio.timeout(REPLY_TIMEOUT):
                            reply = await bus.call(message)
                    except TimeoutError:
                        bad.append((str(message.member), message.signature, "no reply", ""))
                        return
                    finally:
                        for fd in fds:
                            os.close(fd)
                assert reply is not None
                name = reply.error_name or "ok"
                seen[name] = seen.get(name, 0) + 1
                for fd in reply.unix_fds:
                    os.close(fd)
                if not acceptable(reply):
                    text = str(reply.body[0]) if reply.body else ""
                    bad.append((str(message.member), message.signature, name, text))

            async with asyncio.timeout(90):
                await asyncio.gather(*(one(*generator.call()) for _ in range(CALLS)))
            assert bus.connected, "the bus kept the fuzzing connection"
        finally:
            bus.disconnect()

        assert bad == [], bad[:20]
        assert agent.alive(), agent.log_text()[-4000:]
        assert sum(seen.values()) == CALLS
        assert len(seen) > 5, seen  # the calls reached many different refusals
        await settle(session_bus)
        assert open_fd_count(agent.pid) == baseline, os.listdir(f"/proc/{agent.pid}/fd")
        (check,) = await perform_all(session_bus.address, [{"member": "Check"}])
        assert check["error"] == ""
    finally:
        agent.stop()
