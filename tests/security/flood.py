"""Flood the agent with read-only calls: ``python -m tests.security.flood ADDRESS CONNECTIONS
IN_FLIGHT TOTAL``.  Started under ``setpriv`` as an unprivileged uid.  Prints one JSON object:
how many calls got a reply, and how many got each error name.

Every connection keeps IN_FLIGHT calls outstanding (the calls the bus policy lets anyone make:
Get, GetAll, Check, GetHistory, ListSessions) until TOTAL calls were made across all of them.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import sys
from typing import Any

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from luo_agent.dbus.names import BUS_NAME, IFACE_MANAGER, OBJECT_PATH

PROPERTIES = "org.freedesktop.DBus.Properties"
READS: list[tuple[str, str, str, list[Any]]] = [
    (PROPERTIES, "Get", "ss", [IFACE_MANAGER, "Phase"]),
    (PROPERTIES, "GetAll", "s", [IFACE_MANAGER]),
    (IFACE_MANAGER, "Check", "", []),
    (IFACE_MANAGER, "GetHistory", "u", [50]),
    (IFACE_MANAGER, "ListSessions", "", []),
]


async def flood(address: str, connections: int, in_flight: int, total: int) -> dict[str, int]:
    outcomes: collections.Counter[str] = collections.Counter()
    numbers = itertools.count()

    async def one_connection() -> None:
        bus = await MessageBus(bus_address=address).connect()
        try:

            async def worker() -> None:
                while (number := next(numbers)) < total:
                    interface, member, signature, body = READS[number % len(READS)]
                    try:
                        reply = await bus.call(
                            Message(
                                destination=BUS_NAME,
                                path=OBJECT_PATH,
                                interface=interface,
                                member=member,
                                signature=signature,
                                body=body,
                            )
                        )
                    except Exception as exc:  # the connection itself failed: count it
                        outcomes[type(exc).__name__] += 1
                        return
                    assert reply is not None
                    if reply.message_type is MessageType.ERROR:
                        outcomes[reply.error_name or "?"] += 1
                    else:
                        outcomes["reply"] += 1

            await asyncio.gather(*(worker() for _ in range(in_flight)))
        finally:
            bus.disconnect()

    await asyncio.gather(*(one_connection() for _ in range(connections)))
    return dict(outcomes)


def main() -> None:
    address, connections, in_flight, total = sys.argv[1], *map(int, sys.argv[2:5])
    json.dump(asyncio.run(flood(address, connections, in_flight, total)), sys.stdout)


if __name__ == "__main__":
    main()
