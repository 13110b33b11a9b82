"""One call to the agent described as plain JSON, so the same description runs in the test process
(as root) and in a ``caller`` subprocess running as another uid.

Body values are JSON, with two escapes: ``{"$variant": [signature, value]}`` is a Variant and
``{"$fd": kind, "data": text}`` is a file descriptor the caller creates (``memfd`` with ``data``,
``pipe``, ``socket``, ``devnull``, ``directory``).  A result is ``{"error", "message", "body"}``;
a returned fd is read and given back as ``{"$data": text}``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from typing import Any

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from luo_agent.dbus.names import BUS_NAME, IFACE_MANAGER, OBJECT_PATH

Json = Any


def make_fd(kind: str, data: str = "") -> int:
    match kind:
        case "memfd":
            fd = os.memfd_create("luo-test", os.MFD_CLOEXEC)
            os.write(fd, data.encode())
            return fd
        case "pipe":
            read_end, write_end = os.pipe()
            os.close(write_end)
            return read_end
        case "socket":
            left, right = socket.socketpair()
            right.close()
            return left.detach()
        case "devnull":
            return os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        case "directory":
            return os.open(tempfile.gettempdir(), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        case "regular":
            return os.open(__file__, os.O_RDONLY | os.O_CLOEXEC)
    raise ValueError(f"unknown fd kind {kind!r}")


def decode(value: Json, fds: list[int]) -> Any:
    if isinstance(value, dict):
        if "$variant" in value:
            signature, inner = value["$variant"]
            return Variant(signature, decode(inner, fds))
        if "$fd" in value:
            fds.append(make_fd(value["$fd"], value.get("data", "")))
            return len(fds) - 1
        return {k: decode(v, fds) for k, v in value.items()}
    if isinstance(value, list):
        return [decode(v, fds) for v in value]
    return value


def encode(value: Any, reply: Message) -> Json:
    if isinstance(value, Variant):
        return {"$variant": [value.signature, encode(value.value, reply)]}
    if isinstance(value, dict):
        return {str(k): encode(v, reply) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [encode(v, reply) for v in value]
    return value


def _read_all(fd: int) -> str:
    return os.pread(fd, 1 << 16, 0).decode(errors="replace")


async def perform(bus: MessageBus, call: dict[str, Json]) -> dict[str, Json]:
    if call.get("op") == "whoami":
        return {"error": "", "message": "", "body": [os.getpid(), os.getuid()]}
    if call.get("op") == "request_name":
        try:
            owned = await bus.request_name(call["name"])
        except Exception as exc:  # the bus refused: the error name is the result
            return {"error": getattr(exc, "type", type(exc).__name__), "message": str(exc)}
        return {"error": "", "message": "", "body": [owned.name]}
    fds: list[int] = []
    try:
        body = decode(call.get("body", []), fds)
        reply = await bus.call(
            Message(
                destination=call.get("destination", BUS_NAME),
                path=call.get("path", OBJECT_PATH),
                interface=call.get("interface", IFACE_MANAGER),
                member=call["member"],
                signature=call.get("signature", ""),
                body=body,
                unix_fds=fds,
            )
        )
    finally:
        for fd in fds:
            os.close(fd)
    assert reply is not None
    if reply.message_type == MessageType.ERROR:
        return {
            "error": reply.error_name,
            "message": str(reply.body[0]) if reply.body else "",
            "body": [],
        }
    result: list[Json] = []
    for index, value in enumerate(reply.body):
        if reply.signature_tree.types[index].signature == "h":
            fd = reply.unix_fds[value]
            result.append({"$data": _read_all(fd)})
        else:
            result.append(encode(value, reply))
    for fd in reply.unix_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    return {"error": "", "message": "", "body": result}


async def perform_all(address: str, calls: list[dict[str, Json]]) -> list[dict[str, Json]]:
    bus = await MessageBus(bus_address=address, negotiate_unix_fd=True).connect()
    try:
        return [await perform(bus, call) for call in calls]
    finally:
        bus.disconnect()
