"""What every generation's emulated LUO implements, and what it may ask of the server."""

from __future__ import annotations

import abc
from typing import Any, Protocol

from .dispatch import Faults, IoctlResult
from .handover import BlobSink, Image


class DeviceOpen:
    """One open file of /dev/liveupdate (one device socket)."""

    __slots__ = ("flags",)

    def __init__(self, flags: int) -> None:
        self.flags = flags


class Host(Protocol):
    """Services of the server process that a generation needs."""

    def open_session_channel(self, session: object) -> int:
        """A new session socket pair: the server keeps one end (attached to ``session``); the
        returned fd is the client end, to be sent and then closed."""
        ...

    def reap_if_closed(self, handle: object) -> bool:
        """Process the close of ``handle``'s socket now if its last reference is already gone
        (the kernel runs release before close() returns; a socket's EOF is only seen later).
        True if it was closed."""
        ...

    def state_changed(self) -> None:
        """Republish the sysfs state file."""
        ...


class GenerationKernel(abc.ABC):
    generation: str

    def __init__(self, host: Host, profile: str | None) -> None:
        self.host = host
        self.profile = profile
        self.faults = Faults()

    # --- device -------------------------------------------------------------------------------
    @abc.abstractmethod
    def open_device(self, flags: int) -> DeviceOpen: ...

    @abc.abstractmethod
    def release_device(self, dev: DeviceOpen) -> None: ...

    @abc.abstractmethod
    def device_ioctl(self, dev: DeviceOpen, pid: int, request: int, ubuf: bytes) -> IoctlResult: ...

    # --- sessions (session generation only) ----------------------------------------------------
    def session_ioctl(self, session: object, pid: int, request: int, ubuf: bytes) -> IoctlResult:
        raise NotImplementedError

    def release_session(self, session: object) -> None:
        raise NotImplementedError

    # --- boot / kexec ------------------------------------------------------------------------
    @abc.abstractmethod
    def validate_handover(self, luo: Any, image: Image) -> object:
        """Parse the generation's part of a handover image completely (HandoverCorrupt on any
        defect) without creating anything; the result goes to ``load_handover``."""

    @abc.abstractmethod
    def load_handover(self, parsed: object, image: Image) -> None: ...

    @abc.abstractmethod
    def serialize(self, sink: BlobSink) -> Any:
        """The generation's part of the handover image for a kexec happening now (JSON-able;
        None if nothing is carried).  Must not change any state: the reboot may still fail."""

    @abc.abstractmethod
    def carries_luo_data(self) -> bool:
        """Whether a kexec now is a live update (counts towards the live-update number)."""

    def sysfs_state(self) -> str | None:
        """The sysfs ``state`` string, or None when this generation has no sysfs file."""
        return None

    @abc.abstractmethod
    def fault_names(self) -> set[str]: ...

    @abc.abstractmethod
    def inspect(self) -> dict[str, Any]: ...

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Release every file reference (the server is going down)."""
