"""Misbehaving D-Bus clients (issue 6 item 3), on every kernel backend: a client that preserves an
fd and disconnects, clients that vanish before the agent's reply, and a flood of calls from
several clients while the phase changes.  Afterwards: one update happened, the agent is idle and
consistent, was never restarted, and holds no more fds than before."""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from luo_agent.client import CallError, call
from luo_agent.dbus.names import BUS_NAME, ERROR_PREFIX, IFACE_MANAGER, OBJECT_PATH
from luo_agent.kernel.device import Abi

from .conftest import needs_sandbox
from .harness import (
    AGENT,
    AgentBus,
    FaultBed,
    main_pid,
    unit_property,
)

pytestmark = [needs_sandbox]


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def method(member: str, signature: str = "", body: list[Any] | None = None, **kw: Any) -> Message:
    return Message(
        destination=BUS_NAME,
        path=OBJECT_PATH,
        interface=IFACE_MANAGER,
        member=member,
        signature=signature,
        body=body or [],
        **kw,
    )


async def fire_and_vanish(address: str, message: Message) -> None:
    """Send one call and disconnect before the reply can arrive."""
    bus = await MessageBus(bus_address=address, negotiate_unix_fd=True).connect()
    await bus.send(message)
    bus.disconnect()
    await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]


async def test_clients_that_vanish_leave_the_agent_consistent(bed: FaultBed) -> None:
    update_id = "vanishing-clients"
    image = bed.dir / "big-vmlinuz"
    image.write_bytes(os.urandom(16 << 20))  # kexec_file_load of it takes a while
    with contextlib.ExitStack() as stack:
        box = bed.boot(stack)
        async with AgentBus(box.bus_address) as ab:
            box.systemctl("start", AGENT)
            await ab.until_phase("idle")
            pid = main_pid(box, AGENT)
            baseline = open_fds(pid)

            # Preserve, then disconnect at once: the agent keeps its own duplicate.
            data = os.urandom(40_000)
            memfd = os.memfd_create("vanishing", os.MFD_CLOEXEC)
            os.write(memfd, data)
            client = await MessageBus(bus_address=box.bus_address, negotiate_unix_fd=True).connect()
            await call(client, "Preserve", "hsta{sv}", [0, "gone", 1, {}], unix_fds=[memfd])
            client.disconnect()
            os.close(memfd)
            (sessions,) = await ab.agent("ListSessions")
            assert [tuple(s[:2]) for s in sessions] == [("gone", 1)], sessions

            # A long call (LoadKernel of a 16 MiB image) whose caller is gone before the reply,
            # then a Prepare whose caller is gone too.  Each is either refused (the agent cannot
            # identify a vanished caller: it fails closed) or carried out with the reply dropped;
            # never half done.  The same calls from a caller that stays settle which.
            kfd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
            await fire_and_vanish(
                box.bus_address,
                method(
                    "LoadKernel",
                    "hhsa{sv}",
                    [0, 0, "console=ttyS0", {"no-initrd": Variant("b", True)}],
                    unix_fds=[kfd],
                ),
            )
            os.close(kfd)
            await fire_and_vanish(
                box.bus_address, method("Prepare", "a{sv}", [{"id": Variant("s", update_id)}])
            )
            await ab.load_kernel(image)
            with contextlib.suppress(CallError):  # Busy: the vanished client's Prepare went on
                await ab.prepare(update_id)
            await ab.until_phase("prepared")
            assert await ab.prop("KernelLoaded") is True
            assert await ab.prop("CurrentUpdate") == update_id
            view = bed.machine.inspect()
            if bed.abi == Abi.SESSION:
                carried = {s["name"]: s for s in view["outgoing_sessions"]}
                assert [f["size"] for f in carried["gone"]["files"]] == [len(data)], view
            else:
                assert len(data) in [f["size"] for f in view["files"]], view
            await ab.agent("Cancel", "s", [update_id])
            entry = await ab.until_ended(update_id)
            assert entry["result"] == "cancelled", entry
            assert bed.kernel_clean()
            assert main_pid(box, AGENT) == pid
            # The preserved fd went with the cancelled update; the image fds stay (for the next).
            assert open_fds(pid) <= baseline + 2, os.listdir(f"/proc/{pid}/fd")


async def test_flood_of_calls_during_phase_changes(bed: FaultBed) -> None:
    update_id = "flooded"
    with contextlib.ExitStack() as stack:
        box = bed.boot(stack)
        async with AgentBus(box.bus_address) as ab:
            box.systemctl("start", AGENT)
            await ab.until_phase("idle")
            pid = main_pid(box, AGENT)
            baseline = open_fds(pid)
            clients = [
                await MessageBus(bus_address=box.bus_address, negotiate_unix_fd=True).connect()
                for _ in range(4)
            ]
            try:
                memfd = os.memfd_create("flood", os.MFD_CLOEXEC)
                os.write(memfd, b"x" * 4096)

                def calls(bus: MessageBus, n: int) -> list[Any]:
                    kinds: list[tuple[str, str, list[Any]]] = [
                        ("Check", "", []),
                        ("ListSessions", "", []),
                        ("Prepare", "a{sv}", [{"id": Variant("s", f"intruder-{n}")}]),
                        ("Execute", "s", ["no-such-update"]),
                        ("Finish", "s", [""]),
                        ("Unpreserve", "st", ["flood", n]),
                    ]
                    member, sig, body = kinds[n % len(kinds)]
                    return [bus.call(method(member, sig, body))]

                async def flood(bus: MessageBus, rounds: int) -> list[Message | None]:
                    pending = [c for n in range(rounds) for c in calls(bus, n)]
                    pending.append(
                        bus.call(
                            method("Preserve", "hsta{sv}", [0, "flood", 1, {}], unix_fds=[memfd])
                        )
                    )
                    return list(await asyncio.gather(*pending))

                # The one real update is accepted first: an intruder's Prepare sent before it
                # would legitimately start its own update (a race under load, not a fault).
                # The flood then runs through preparing -> prepared and the cancel.
                await ab.prepare(update_id)
                floods = [asyncio.create_task(flood(c, 60)) for c in clients]
                await ab.until_phase("prepared")
                more = [asyncio.create_task(flood(c, 30)) for c in clients]
                await ab.agent("Cancel", "s", [update_id])
                replies = [r for f in (*floods, *more) for r in await f]
                os.close(memfd)
            finally:
                for c in clients:
                    c.disconnect()
            entry = await ab.until_ended(update_id)

            assert len(replies) == 4 * (60 + 30 + 2)
            for reply in replies:
                assert reply is not None
                if reply.message_type == MessageType.ERROR:
                    # Refusals are the agent's own, registered errors: never a crash or timeout.
                    assert str(reply.error_name).startswith(ERROR_PREFIX), reply.error_name
            started = [
                r
                for r in replies
                if r is not None
                and r.body
                and isinstance(r.body[0], str)
                and "intruder" in r.body[0]
            ]
            assert started == []  # no second update was ever started
            assert entry["result"] == "cancelled", entry
            (history,) = await ab.agent("GetHistory", "u", [50])
            assert [e["id"].value for e in history] == [update_id]
            assert await ab.prop("Phase") == "idle"
            assert bed.kernel_clean()
            assert unit_property(box, AGENT, "NRestarts") == "0"
            assert main_pid(box, AGENT) == pid
            with contextlib.suppress(CallError):
                (sessions,) = await ab.agent("ListSessions")
                # Preserves that landed after the cancel wait, registered, for the next update.
                assert all(s[3] == "registered" for s in sessions), sessions
            assert open_fds(pid) <= baseline + 2, os.listdir(f"/proc/{pid}/fd")
