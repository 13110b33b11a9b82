"""``RfcV2Device``: the G1 (RFC v2 / ``luo/rfc-v2.1``) device, kernel-abi.md §3.

Size-encoded ``_IOWR/_IOW/_IOR/_IO`` requests, a global 0-based state machine driven by
EVENT_* ioctls, one global list of preserved fds with kernel-made tokens.  Opens are not
exclusive and closing the device does nothing to the preserved files.
"""

from __future__ import annotations

import ctypes

from .device import DeviceFile, GlobalState, unknown_state
from .errnomap import Op
from .uapi import rfc_v2 as uapi


class RfcV2Device(DeviceFile):
    """``with RfcV2Device(syscalls) as dev: token = dev.fd_preserve(memfd)``.

    Fds returned by ``fd_restore`` belong to the caller (``O_CLOEXEC``, close them yourself).
    """

    def fd_preserve(self, fd: int) -> int:
        """Preserve ``fd`` (the kernel takes its own reference); returns the kernel-made token."""
        arg = uapi.liveupdate_fd(fd=fd, flags=0, token=0)
        out = self._call(Op.FD_PRESERVE, uapi.LIVEUPDATE_IOCTL_FD_PRESERVE, arg, f"fd {fd}")
        return int(out.token)

    def fd_unpreserve(self, token: int) -> None:
        buf = bytearray(ctypes.c_uint64(token))  # a bare __u64, no struct
        self._ioctl(Op.FD_UNPRESERVE, uapi.LIVEUPDATE_IOCTL_FD_UNPRESERVE, buf, f"token {token}")

    def fd_restore(self, token: int) -> int:
        """The preserved file as a new fd owned by the caller (UPDATED state only)."""
        arg = uapi.liveupdate_fd(fd=-1, flags=0, token=token)
        out = self._call(Op.FD_RESTORE, uapi.LIVEUPDATE_IOCTL_FD_RESTORE, arg, f"token {token}")
        return int(out.fd)

    def get_state(self) -> GlobalState:
        buf = bytearray(ctypes.c_uint32(0))  # a bare enum liveupdate_state, no struct
        self._ioctl(Op.GET_STATE, uapi.LIVEUPDATE_IOCTL_GET_STATE, buf)
        number = ctypes.c_uint32.from_buffer_copy(buf).value
        try:
            return GlobalState.from_rfc_v2(number)
        except ValueError:
            raise unknown_state(number) from None

    def _event(self, op: Op, request: int) -> None:
        # _IO requests carry no argument; the kernel ignores the pointer.
        self._ioctl(op, request, bytearray())

    def event_prepare(self) -> None:
        self._event(Op.EVENT_PREPARE, uapi.LIVEUPDATE_IOCTL_EVENT_PREPARE)

    def event_freeze(self) -> None:
        self._event(Op.EVENT_FREEZE, uapi.LIVEUPDATE_IOCTL_EVENT_FREEZE)

    def event_cancel(self) -> None:
        self._event(Op.EVENT_CANCEL, uapi.LIVEUPDATE_IOCTL_EVENT_CANCEL)

    def event_finish(self) -> None:
        self._event(Op.EVENT_FINISH, uapi.LIVEUPDATE_IOCTL_EVENT_FINISH)
