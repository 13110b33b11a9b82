"""sd_notify(3) over ``$NOTIFY_SOCKET`` with plain ``socket.sendmsg``.

pystemd's ``daemon.notify`` cannot pass file descriptors, which ``FDSTORE=1`` needs
(landscape.md §6.4), so this is the small stdlib version.  Every function is a no-op returning
False when ``$NOTIFY_SOCKET`` is unset (not started by systemd, or ``NotifyAccess=none``).
"""

from __future__ import annotations

import array
import errno
import os
import select
import socket
from collections.abc import Mapping, Sequence


def _address(env: Mapping[str, str]) -> str | None:
    raw = env.get("NOTIFY_SOCKET", "")
    if not raw:
        return None
    if raw.startswith("@"):  # abstract namespace
        return "\0" + raw[1:]
    if raw.startswith("/"):
        return raw
    raise ValueError(f"unsupported NOTIFY_SOCKET address {raw!r}")  # e.g. vsock: not used here


def _format(fields: Mapping[str, object]) -> bytes:
    lines = []
    for key, value in fields.items():
        text = str(value)
        if not key or "=" in key or "\n" in key or "\n" in text:
            raise ValueError(f"bad sd_notify field {key!r}={text!r}")
        lines.append(f"{key}={text}")
    return ("\n".join(lines) + "\n").encode()


def notify(
    *, fds: Sequence[int] = (), env: Mapping[str, str] | None = None, **fields: object
) -> bool:
    """Send ``fields`` (e.g. ``READY=1``, ``STATUS=...``) and optionally ``fds`` via SCM_RIGHTS.

    Returns True if a message was sent, False if there is no notify socket.  ``env`` defaults to
    ``os.environ`` (tests pass their own)."""
    return _send(fields, fds, env)


def _send(fields: Mapping[str, object], fds: Sequence[int], env: Mapping[str, str] | None) -> bool:
    address = _address(os.environ if env is None else env)
    if address is None:
        return False
    payload = _format(fields)
    ancillary = []
    if fds:
        ancillary.append((socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes()))
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sent = sock.sendmsg([payload], ancillary, 0, address)
    if sent != len(payload):
        raise OSError(f"sd_notify: short send ({sent} of {len(payload)} bytes)")
    return True


def ready(status: str | None = None, *, env: Mapping[str, str] | None = None) -> bool:
    fields: dict[str, object] = {"READY": 1}
    if status is not None:
        fields["STATUS"] = status
    return _send(fields, (), env)


def status(text: str, *, env: Mapping[str, str] | None = None) -> bool:
    return notify(env=env, STATUS=text)


def watchdog(*, env: Mapping[str, str] | None = None) -> bool:
    return notify(env=env, WATCHDOG=1)


def stopping(*, env: Mapping[str, str] | None = None) -> bool:
    return notify(env=env, STOPPING=1)


def store_fds(name: str, fds: Sequence[int], *, env: Mapping[str, str] | None = None) -> bool:
    """Push ``fds`` into the service's fd store under ``name`` (``FDSTORE=1`` + ``FDNAME=``)."""
    return notify(fds=fds, env=env, FDSTORE=1, FDNAME=name)


def barrier(timeout: float, *, env: Mapping[str, str] | None = None) -> bool:
    """sd_notify_barrier(3): return once the manager has processed every message sent before
    (``BARRIER=1`` with the write end of a pipe, which the manager closes; EOF on the read end).
    Blocking: call it off the event loop.  False without a notify socket; OSError(ETIMEDOUT) if
    the manager does not close the pipe within ``timeout`` seconds."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        try:
            sent = _send({"BARRIER": 1}, (write_end,), env)
        finally:
            os.close(write_end)
        if not sent:
            return False
        poller = select.poll()
        poller.register(read_end, select.POLLHUP)
        if not poller.poll(max(0, int(timeout * 1000))):
            raise OSError(errno.ETIMEDOUT, f"sd_notify: no BARRIER=1 answer in {timeout} s")
        return True
    finally:
        os.close(read_end)


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between required ``WATCHDOG=1`` pings, or None if the watchdog is off or meant
    for another process (``WATCHDOG_PID``), as sd_watchdog_enabled(3) decides."""
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid is not None:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 1_000_000
