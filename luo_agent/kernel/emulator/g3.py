"""G3: ``[PATCH v3]`` ``/dev/liveupdate`` (kernel-abi.md §5): size-first ``_IO`` ioctls, exclusive
open, 1-based states, user tokens, close of the device drops every preserved file."""

from __future__ import annotations

import errno
import logging
import struct
from typing import Any, Final

from luo_agent.kernel.device import Abi
from luo_agent.kernel.uapi import IoctlOp
from luo_agent.kernel.uapi import v3 as uapi

from . import memfd
from .base import DeviceOpen
from .dispatch import Errno, IoctlResult, dispatch_sized, op_names
from .statemachine import Event, State, StateMachineKernel

log = logging.getLogger("luo_emu.v3")

_EVENTS: Final = {
    uapi.liveupdate_event.LIVEUPDATE_PREPARE: Event.PREPARE,
    uapi.liveupdate_event.LIVEUPDATE_FINISH: Event.FINISH,
    uapi.liveupdate_event.LIVEUPDATE_CANCEL: Event.CANCEL,
}


class V3Kernel(StateMachineKernel):
    generation = Abi.V3
    STATE_NUMBERS = {
        State.NORMAL: uapi.liveupdate_state.LIVEUPDATE_STATE_NORMAL,
        State.PREPARED: uapi.liveupdate_state.LIVEUPDATE_STATE_PREPARED,
        State.FROZEN: uapi.liveupdate_state.LIVEUPDATE_STATE_FROZEN,
        State.UPDATED: uapi.liveupdate_state.LIVEUPDATE_STATE_UPDATED,
    }

    holder: DeviceOpen | None = None

    def open_device(self, flags: int) -> DeviceOpen:
        self.faults.check("open")
        if self.holder is not None and not self.host.reap_if_closed(self.holder):
            raise Errno(errno.EBUSY, "/dev/liveupdate is already open")
        self.holder = DeviceOpen(flags)
        return self.holder

    def release_device(self, dev: DeviceOpen) -> None:
        # luo_release: unregister every preserved (outgoing) file; the global state is unchanged.
        if dev is self.holder:
            self.holder = None
            self.drop_outgoing("device closed")

    def device_ioctl(self, dev: DeviceOpen, pid: int, request: int, ubuf: bytes) -> IoctlResult:
        def execute(op: IoctlOp, kbuf: bytearray) -> IoctlResult:
            return self._execute(op, kbuf, pid)

        return dispatch_sized(
            uapi.DEVICE_OPS, uapi.LIVEUPDATE_CMD_BASE, request, ubuf, execute, faults=self.faults
        )

    def _execute(self, op: IoctlOp, kbuf: bytearray, pid: int) -> IoctlResult:
        match op.name:
            case "FD_PRESERVE":
                _size, fd, token = struct.unpack_from("<IiQ", kbuf)
                self.check_preserve_state()
                if token in self.outgoing:
                    raise Errno(errno.EEXIST, f"token {token:#x} is taken")
                self.outgoing[token] = memfd.preserve(pid, fd, token)
                return IoctlResult()
            case "FD_UNPRESERVE":
                (token,) = struct.unpack_from("<Q", kbuf, 8)
                self.unpreserve(token, allowed=(State.NORMAL, State.UPDATED))
                return IoctlResult()
            case "FD_RESTORE":
                (token,) = struct.unpack_from("<Q", kbuf, 8)
                pf = self.restore(token)
                struct.pack_into("<i", kbuf, 4, -1)
                return IoctlResult(fd=pf.fd, fd_offset=4)
            case "GET_STATE":
                struct.pack_into("<I", kbuf, 4, self.STATE_NUMBERS[self.state])
                return IoctlResult()
            case "SET_EVENT":
                (event,) = struct.unpack_from("<I", kbuf, 4)
                if event not in _EVENTS:
                    raise Errno(errno.EINVAL, f"event {event} not accepted")
                self.transition(_EVENTS[event])
                return IoctlResult()
            case _:
                raise AssertionError(op.name)

    def fault_names(self) -> set[str]:
        return {*op_names(uapi.DEVICE_OPS), "EVENT_PREPARE", "EVENT_FINISH", "EVENT_CANCEL"}

    def inspect(self) -> dict[str, Any]:
        return {**super().inspect(), "device_open": self.holder is not None}
