"""``V3Device``: the G3 (``[PATCH v3]``) device, kernel-abi.md §5.

Size-first ``_IO`` requests, exclusive open (a second open is EBUSY), a global 1-based state
machine driven by SET_EVENT, one global set of preserved fds with user-chosen tokens.
**Closing the device unpreserves every file** (the kernel's release handler), so hold it open
from the first preserve until the kexec reboot.
"""

from __future__ import annotations

from typing import Final

from luo_agent.errors import InvalidArgument

from .device import DeviceFile, GlobalEvent, GlobalState, sized, unknown_state
from .errnomap import Op
from .uapi import v3 as uapi

_EVENTS: Final = {
    GlobalEvent.PREPARE: uapi.liveupdate_event.LIVEUPDATE_PREPARE,
    GlobalEvent.FINISH: uapi.liveupdate_event.LIVEUPDATE_FINISH,
    GlobalEvent.CANCEL: uapi.liveupdate_event.LIVEUPDATE_CANCEL,
}


class V3Device(DeviceFile):
    """``with V3Device(syscalls) as dev: dev.fd_preserve(memfd, token=1)``.

    Fds returned by ``fd_restore`` belong to the caller (``O_CLOEXEC``, close them yourself).
    """

    def fd_preserve(self, fd: int, token: int) -> None:
        arg = sized(uapi.liveupdate_ioctl_fd_preserve, fd=fd, token=token)
        self._call(Op.FD_PRESERVE, uapi.LIVEUPDATE_IOCTL_FD_PRESERVE, arg, f"token {token}")

    def fd_unpreserve(self, token: int) -> None:
        arg = sized(uapi.liveupdate_ioctl_fd_unpreserve, token=token)
        self._call(Op.FD_UNPRESERVE, uapi.LIVEUPDATE_IOCTL_FD_UNPRESERVE, arg, f"token {token}")

    def fd_restore(self, token: int) -> int:
        """The preserved file as a new fd owned by the caller (UPDATED state only)."""
        arg = sized(uapi.liveupdate_ioctl_fd_restore, fd=-1, token=token)
        out = self._call(Op.FD_RESTORE, uapi.LIVEUPDATE_IOCTL_FD_RESTORE, arg, f"token {token}")
        return int(out.fd)

    def get_state(self) -> GlobalState:
        arg = sized(uapi.liveupdate_ioctl_get_state, state=0)
        number = int(self._call(Op.GET_STATE, uapi.LIVEUPDATE_IOCTL_GET_STATE, arg).state)
        try:
            return GlobalState.from_v3(number)
        except ValueError:
            raise unknown_state(number) from None

    def set_event(self, event: GlobalEvent) -> None:
        """PREPARE, CANCEL or FINISH.  v3 freezes inside ``reboot()``; FREEZE is refused here
        (the kernel would answer EINVAL, indistinguishable from a wrong state)."""
        number = _EVENTS.get(event)
        if number is None:
            raise InvalidArgument(f"v3 has no {event.value} event (it freezes inside reboot())")
        arg = sized(uapi.liveupdate_ioctl_set_event, event=number)
        self._call(Op.SET_EVENT, uapi.LIVEUPDATE_IOCTL_SET_EVENT, arg, f"event {event.value}")
