"""``SessionDevice`` and ``LuoSession``: the session ABI of Linux 6.19 (G5) and later (G6),
kernel-abi.md §7 and §9.

``/dev/liveupdate`` only creates (outgoing) and retrieves (incoming) named sessions; closing it
does not affect them.  Each session is its own fd:

* outgoing (``create_session``): ``preserve_fd``; closing its last fd **unpreserves everything**
  (a per-session cancel); it must stay open until ``reboot(LINUX_REBOOT_CMD_KEXEC)``.
* incoming (``retrieve_session``): ``retrieve_fd``, ``finish``; closing its last fd is an
  implicit **FINISH**, which discards every file not yet retrieved.

Wrong-kind calls (preserve on incoming, retrieve/finish on outgoing) are refused here before the
kernel sees them: 6.19 does not check and misbehaves, G6 answers EINVAL (WrongKernelState).
"""

from __future__ import annotations

import ctypes
import errno

from luo_agent.errors import InvalidArgument

from .device import DeviceFile, FdHandle, sized
from .errnomap import Op, os_error, translate
from .syscalls import Syscalls
from .uapi import session as uapi

MAX_NAME_BYTES = uapi.LIVEUPDATE_SESSION_NAME_LENGTH - 1  # the field holds the NUL too


def encode_session_name(name: str) -> bytes:
    """The kernel's name field content (without the NUL); InvalidArgument if the kernel would
    reject or silently truncate it (1..63 bytes of UTF-8, no NUL)."""
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
        raw = b""
    if not 1 <= len(raw) <= MAX_NAME_BYTES or b"\0" in raw:
        raise InvalidArgument(
            f"session name must be 1..{MAX_NAME_BYTES} bytes of UTF-8 without NUL: {name!r}"
        )
    return raw


def name_field(raw: bytes) -> ctypes.Array[ctypes.c_uint8]:
    """The u8[64] name field holding ``raw`` and zero padding (so always NUL-terminated)."""
    field = (ctypes.c_uint8 * uapi.LIVEUPDATE_SESSION_NAME_LENGTH)()
    ctypes.memmove(field, raw, len(raw))
    return field


class LuoSession(FdHandle):
    """A session fd, owned by this object (``detach()`` hands it over, e.g. to an fd store).

    ``incoming`` is True for a session retrieved after a live-update boot.  Fds returned by
    ``retrieve_fd`` belong to the caller (``O_CLOEXEC``, close them yourself).
    """

    def __init__(self, syscalls: Syscalls, fd: int, name: str, *, incoming: bool) -> None:
        super().__init__(syscalls, fd)
        self.name = name
        self.incoming = incoming

    @property
    def fd(self) -> int:
        return self.fileno()

    def __repr__(self) -> str:
        kind = "incoming" if self.incoming else "outgoing"
        return f"<LuoSession {self.name!r} {kind} fd={self._fd}>"

    def _require(self, op: Op, incoming: bool) -> None:
        if self.incoming != incoming:
            kind = "incoming" if incoming else "outgoing"
            raise translate(op, os_error(errno.EINVAL), f"session {self.name!r} is not {kind}")

    def preserve_fd(self, fd: int, token: int) -> None:
        """Preserve ``fd`` under ``token`` (any u64, unique in this session).  The kernel takes
        its own reference: the caller may close ``fd`` afterwards."""
        self._require(Op.PRESERVE_FD, incoming=False)
        arg = sized(uapi.liveupdate_session_preserve_fd, fd=fd, token=token)
        self._call(Op.PRESERVE_FD, uapi.LIVEUPDATE_SESSION_PRESERVE_FD, arg, self._what(token))

    def retrieve_fd(self, token: int) -> int:
        """The file preserved under ``token``, as a new fd owned by the caller.  Retrieving the
        same token again gives another fd for the same open file."""
        self._require(Op.RETRIEVE_FD, incoming=True)
        arg = sized(uapi.liveupdate_session_retrieve_fd, fd=-1, token=token)
        out = self._call(
            Op.RETRIEVE_FD, uapi.LIVEUPDATE_SESSION_RETRIEVE_FD, arg, self._what(token)
        )
        return int(out.fd)

    def finish(self) -> None:
        """Complete the session: every file not retrieved is discarded.  Repeating it is a no-op
        in the kernel; the fd stays open until ``close()``."""
        self._require(Op.FINISH, incoming=True)
        arg = sized(uapi.liveupdate_session_finish)
        self._call(Op.FINISH, uapi.LIVEUPDATE_SESSION_FINISH, arg, f"session {self.name!r}")

    def get_name(self) -> str:
        """The kernel's name for this session (G6).  ``Unsupported`` on 6.19."""
        # A fresh struct is all zeros: the kernel writes name + NUL over the input bytes and
        # leaves the rest of the field as the caller passed it.
        arg = sized(uapi.liveupdate_session_get_name)
        out = self._call(Op.GET_NAME, uapi.LIVEUPDATE_SESSION_GET_NAME, arg, f"fd {self._fd}")
        raw = bytes(out.name).split(b"\0", 1)[0]
        return raw.decode("utf-8", errors="replace")

    def _what(self, token: int) -> str:
        return f"session {self.name!r}, token {token}"


class SessionDevice(DeviceFile):
    """``with SessionDevice(syscalls) as dev: session = dev.create_session("vm-1")``.

    Sessions outlive the device fd: close the device as soon as the sessions are obtained
    (exclusive open; PID 1 may need it).
    """

    def _open_session(self, op: Op, request: int, name: str, incoming: bool) -> LuoSession:
        raw = encode_session_name(name)
        struct = (
            uapi.liveupdate_ioctl_retrieve_session
            if incoming
            else uapi.liveupdate_ioctl_create_session
        )
        arg = struct(size=ctypes.sizeof(struct), fd=-1, name=name_field(raw))
        out = self._call(op, request, arg, f"session {name!r}")
        return LuoSession(self._syscalls, int(out.fd), name, incoming=incoming)

    def create_session(self, name: str) -> LuoSession:
        """A new outgoing session.  ``AlreadyExists`` if an outgoing session has this name."""
        return self._open_session(
            Op.CREATE_SESSION, uapi.LIVEUPDATE_IOCTL_CREATE_SESSION, name, incoming=False
        )

    def retrieve_session(self, name: str) -> LuoSession:
        """The incoming session carried by the last live update.  ``NoSuchSession`` if there
        is none with this name (also on every boot that was not a live update)."""
        return self._open_session(
            Op.RETRIEVE_SESSION, uapi.LIVEUPDATE_IOCTL_RETRIEVE_SESSION, name, incoming=True
        )
