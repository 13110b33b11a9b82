"""A small asyncio client of QEMU's monitor protocol (QMP) over a Unix socket, with fd passing
(``getfd`` needs the fd attached to the command, SCM_RIGHTS).  Commands are answered in order;
events are kept in ``events``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from typing import Any


class QmpError(Exception):
    """QEMU answered a command with an error, or the monitor went away."""


class Qmp:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._buffer = b""
        self._lock = asyncio.Lock()
        self.events: list[dict[str, Any]] = []
        self.greeting: dict[str, Any] = {}

    @classmethod
    async def connect(cls, path: str) -> Qmp:
        """Connect (retrying until QEMU listens: the caller bounds it), read the greeting and
        leave capability negotiation."""
        loop = asyncio.get_running_loop()
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                await asyncio.sleep(0.02)
        qmp = cls(sock)
        try:
            qmp.greeting = await qmp._message()
            await qmp.execute("qmp_capabilities")
        except BaseException:
            qmp.close()
            raise
        return qmp

    def close(self) -> None:
        self._sock.close()

    async def execute(
        self, command: str, arguments: dict[str, Any] | None = None, *, fd: int | None = None
    ) -> Any:
        """Run one command and return its ``return`` value; ``fd`` travels with it."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        data = json.dumps(request).encode() + b"\n"
        async with self._lock:
            if fd is None:
                await self._loop.sock_sendall(self._sock, data)
            else:
                await self._send_with_fd(data, fd)
            while True:
                message = await self._message()
                if "event" in message:
                    self.events.append(message)
                    continue
                if "error" in message:
                    error = message["error"]
                    raise QmpError(f"{command}: {error.get('class')}: {error.get('desc')}")
                return message.get("return")

    async def _send_with_fd(self, data: bytes, fd: int) -> None:
        # A QMP command is far smaller than a socket buffer: one sendmsg takes it whole.
        fds = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd.to_bytes(4, "little", signed=True))]
        sent = 0
        while not sent:
            try:
                sent = self._sock.sendmsg([data], fds)
            except BlockingIOError:
                await asyncio.sleep(0.001)
        if sent < len(data):
            await self._loop.sock_sendall(self._sock, data[sent:])

    async def _message(self) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            chunk = await self._loop.sock_recv(self._sock, 65536)
            if not chunk:
                raise QmpError("QEMU closed its monitor")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        message: dict[str, Any] = json.loads(line)
        return message

    async def __aenter__(self) -> Qmp:
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self.close()
