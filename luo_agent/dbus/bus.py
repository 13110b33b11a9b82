"""The agent's bus connection: dbus-fast's asyncio ``MessageBus`` with back-pressure on send.

dbus-fast 5.2's ``_MessageWriter.write_callback`` writes with ``sock.send``/``sock.sendmsg`` on a
non-blocking socket and treats every exception as fatal, BlockingIOError (EAGAIN) included: when
the bus daemon reads the agent's replies slower than the agent writes them (a flood of calls from
many connections fills the socket buffer), the library closes the connection and the agent is off
the bus for good while its process lives on (issue 13).  ``BackPressureWriter`` is the same loop
with the fix an upstream patch would make: a full socket buffer (EAGAIN, EINTR) leaves the unsent
message where it is and waits for the socket to become writable (the writer callback stays
registered with the loop), exactly as a partial write already did.  Nothing is sent twice or
dropped: on EAGAIN the kernel took no bytes (and no fds) of the message.

What a connection that is lost anyway means for the agent is ``wait_until_stopped``'s business.
"""

from __future__ import annotations

import array
import asyncio
import socket
from typing import Any

from dbus_fast.aio import MessageBus
from dbus_fast.aio.message_bus import _MessageWriter


class BackPressureWriter(_MessageWriter):
    """dbus-fast's writer, except that EAGAIN/EINTR on send waits for writability."""

    def write_callback(self, remove_writer: bool = True) -> None:
        sock, fd = self.sock, self.fd
        assert sock is not None and fd is not None  # set by connect(), before any write
        try:
            while True:
                if self.buf is None:
                    if not self.messages:
                        if remove_writer:
                            self.loop.remove_writer(fd)
                        return
                    buf, unix_fds, fut = self.messages.popleft()
                    self.unix_fds = unix_fds
                    self.buf = memoryview(buf)
                    self.offset = 0
                    self.fut = fut
                try:
                    if self.unix_fds and self.negotiate_unix_fd:
                        fds = array.array("i", self.unix_fds)
                        ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)]
                        self.offset += sock.sendmsg([self.buf[self.offset :]], ancdata)
                        self.unix_fds = None  # the fds went with the first byte
                    else:
                        self.offset += sock.send(self.buf[self.offset :])
                except (BlockingIOError, InterruptedError):
                    # The socket buffer is full: the loop calls again once it is writable (the
                    # caller of a direct write registers the callback when ``buf`` is pending).
                    return
                if self.offset < len(self.buf):
                    return  # partial write: wait for writable
                self.buf = None
                _settle(self.fut)
        except Exception as exc:
            _settle(self.fut, None if self.bus._user_disconnect else exc)
            self.bus._finalize(exc)


def _settle(fut: asyncio.Future[None] | None, exc: Exception | None = None) -> None:
    if fut is None or fut.done():
        return
    if exc is None:
        fut.set_result(None)
    else:
        fut.set_exception(exc)


class AgentMessageBus(MessageBus):
    """``MessageBus`` whose writer waits for writability instead of closing on EAGAIN."""

    async def connect(self) -> AgentMessageBus:
        await super().connect()
        writer: Any = self._writer
        # The writer is created inside connect(); it has no slots and only its method differs.
        writer.__class__ = BackPressureWriter
        return self


async def wait_until_stopped(bus: MessageBus, stop: asyncio.Event) -> bool:
    """Wait until ``stop`` is set (True) or the bus connection is lost (False): an agent that is
    off the bus can do nothing its callers see, so it must end and let systemd restart it."""
    stopped = asyncio.ensure_future(stop.wait())
    lost = asyncio.ensure_future(bus.wait_for_disconnect())  # type: ignore[no-untyped-call]
    try:
        await asyncio.wait({stopped, lost}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (stopped, lost):
            task.cancel()
    if lost.done() and not lost.cancelled():
        lost.exception()  # the reason is logged by the caller; retrieved so asyncio stays quiet
    return stop.is_set()
