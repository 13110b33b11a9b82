"""G1: the RFC v2 ``/dev/liveupdate`` (kernel-abi.md §3).

Dispatcher: type != 0xBA -> ENOTTY, then a switch on the full request number (unknown ->
ENOTTY); the argument is a plain pointer (no size header).  Multiple opens, close does nothing,
0-based states, kernel-made tokens.

Token rule (the emulator's choice; the RFC code's generator is not documented): a counter that
starts at 1 on a cold boot and never repeats within a boot; a live-update boot continues after
the largest carried token, so outgoing and incoming tokens never collide either.
"""

from __future__ import annotations

import errno
import os
import struct
from typing import Any, Final

from luo_agent.errors import HandoverCorrupt
from luo_agent.kernel.device import Abi
from luo_agent.kernel.uapi import _IOC_TYPE, LIVEUPDATE_IOCTL_TYPE
from luo_agent.kernel.uapi import rfc_v2 as uapi

from . import memfd
from .base import DeviceOpen
from .dispatch import Errno, IoctlResult
from .handover import Image
from .statemachine import Event, State, StateMachineKernel

_FD: Final = struct.Struct("<iIQ")  # struct liveupdate_fd

REQUEST_NAMES: Final = {
    uapi.LIVEUPDATE_IOCTL_FD_PRESERVE: "FD_PRESERVE",
    uapi.LIVEUPDATE_IOCTL_FD_UNPRESERVE: "FD_UNPRESERVE",
    uapi.LIVEUPDATE_IOCTL_FD_RESTORE: "FD_RESTORE",
    uapi.LIVEUPDATE_IOCTL_GET_STATE: "GET_STATE",
    uapi.LIVEUPDATE_IOCTL_EVENT_PREPARE: "EVENT_PREPARE",
    uapi.LIVEUPDATE_IOCTL_EVENT_FREEZE: "EVENT_FREEZE",
    uapi.LIVEUPDATE_IOCTL_EVENT_CANCEL: "EVENT_CANCEL",
    uapi.LIVEUPDATE_IOCTL_EVENT_FINISH: "EVENT_FINISH",
}
_EVENTS: Final = {
    "EVENT_PREPARE": Event.PREPARE,
    "EVENT_FREEZE": Event.FREEZE,
    "EVENT_CANCEL": Event.CANCEL,
    "EVENT_FINISH": Event.FINISH,
}


class RfcV2Kernel(StateMachineKernel):
    generation = Abi.RFC_V2
    STATE_NUMBERS = {
        State.NORMAL: uapi.liveupdate_state.LIVEUPDATE_STATE_NORMAL,
        State.PREPARED: uapi.liveupdate_state.LIVEUPDATE_STATE_PREPARED,
        State.FROZEN: uapi.liveupdate_state.LIVEUPDATE_STATE_FROZEN,
        State.UPDATED: uapi.liveupdate_state.LIVEUPDATE_STATE_UPDATED,
    }

    next_token = 1

    def open_device(self, flags: int) -> DeviceOpen:
        self.faults.check("open")
        if flags & os.O_EXCL:
            raise Errno(errno.EINVAL, "O_EXCL is meaningless for /dev/liveupdate")
        # CAP_SYS_ADMIN is not checked: access is whoever can reach the emulated device node.
        return DeviceOpen(flags)

    def release_device(self, dev: DeviceOpen) -> None:
        """RFC v2 has no release handler: preserved files stay registered."""

    def device_ioctl(self, dev: DeviceOpen, pid: int, request: int, ubuf: bytes) -> IoctlResult:
        if _IOC_TYPE(request) != LIVEUPDATE_IOCTL_TYPE:
            raise Errno(errno.ENOTTY, f"type {_IOC_TYPE(request):#x}")
        name = REQUEST_NAMES.get(request)
        if name is None:
            # Includes SELFTESTS: it lives on the debugfs luo_selftest file, not on the device.
            raise Errno(errno.ENOTTY, f"request {request:#x}")
        self.faults.check(name)
        match name:
            case "FD_PRESERVE":
                if len(ubuf) < _FD.size:
                    raise Errno(errno.EFAULT, "short struct liveupdate_fd")
                fd, flags, _token = _FD.unpack_from(ubuf)
                # RFC v2's ioctl resolves the fd (EBADF) before the registry checks the state.
                os.close(memfd.take_fd(pid, fd))
                self.check_preserve_state()
                token = self.next_token
                pf = memfd.preserve(pid, fd, token)
                self.next_token += 1
                self.outgoing[token] = pf
                return IoctlResult(out=_FD.pack(fd, flags, token))
            case "FD_UNPRESERVE":
                if len(ubuf) < 8:
                    raise Errno(errno.EFAULT, "short token")
                (token,) = struct.unpack_from("<Q", ubuf)
                self.unpreserve(token, allowed=(State.NORMAL,))
                return IoctlResult()
            case "FD_RESTORE":
                if len(ubuf) < _FD.size:
                    raise Errno(errno.EFAULT, "short struct liveupdate_fd")
                _fd, flags, token = _FD.unpack_from(ubuf)
                pf = self.restore(token)
                return IoctlResult(out=_FD.pack(-1, flags, token), fd=pf.fd, fd_offset=0)
            case "GET_STATE":
                if len(ubuf) < 4:
                    raise Errno(errno.EFAULT, "short state buffer")
                return IoctlResult(out=struct.pack("<I", self.STATE_NUMBERS[self.state]))
            case _:
                # EVENT_* ignore their argument entirely.
                self.transition(_EVENTS[name])
                return IoctlResult()

    def extra_handover(self) -> dict[str, Any]:
        return {"next_token": self.next_token}

    def validate_extra(self, luo: dict[str, Any]) -> None:
        value = luo.get("next_token")
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise HandoverCorrupt("handover image rejected: bad next_token")

    def load_handover(self, parsed: object, image: Image) -> None:
        super().load_handover(parsed, image)
        if self.incoming:
            self.next_token = max(self.incoming) + 1

    def fault_names(self) -> set[str]:
        return set(REQUEST_NAMES.values())

    def inspect(self) -> dict[str, Any]:
        return {**super().inspect(), "next_token": self.next_token}
