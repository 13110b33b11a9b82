"""The state-machine backends (rfc-v2 = G1, v3 = G3): one global list of preserved files behind a
device fd the agent holds, driven through PREPARE/FREEZE/CANCEL/FINISH events."""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import ClassVar

from ..errors import HandoverCorrupt, KernelError, NoSuchSession, Unsupported
from ..persist import write_atomic
from ..records import UpdateRecord
from .backend import (
    METADATA_TOKEN,
    BootState,
    Capabilities,
    MetadataMemfd,
    PreserveItem,
    new_metadata_memfd,
    read_metadata,
)
from .device import Abi, GlobalEvent, GlobalState
from .rfc_v2 import RfcV2Device
from .syscalls import KEXEC_FILE_UNLOAD, Syscalls, kexec_image_loaded
from .v3 import V3Device


class GlobalListBackend(MetadataMemfd):
    """Shared by rfc-v2 and v3: one global preserved list behind a held device fd."""

    abi: Abi
    _meta_fd: int = -1

    def __init__(self, syscalls: Syscalls) -> None:
        self.syscalls = syscalls
        self.kernel_tokens: dict[tuple[str, int], int] = {}
        self.meta_kernel_token: int | None = None

    def reboot(self) -> None:
        self.syscalls.reboot_kexec()

    def entrust_outgoing(self) -> int:
        # The held device fd must stay open through the reboot, and PID 1 >= 261 needs the
        # device itself at shutdown: an fd store cannot carry a state-machine update.
        raise Unsupported(
            "entrust_outgoing", errno.EOPNOTSUPP, f"{self.abi} keeps the update in the device fd"
        )

    def reclaim_outgoing(self) -> None:
        pass

    def load_kernel(self, kernel_fd: int, initrd_fd: int, cmdline: str) -> None:
        self.syscalls.kexec_file_load(kernel_fd, initrd_fd, cmdline, 0)

    def unload_kernel(self) -> None:
        self.syscalls.kexec_file_load(-1, -1, "", KEXEC_FILE_UNLOAD)

    def kexec_image_loaded(self) -> bool:
        return kexec_image_loaded(self.syscalls)

    # Generation-specific primitives.
    def _state(self) -> GlobalState:
        raise NotImplementedError

    def _preserve_one(self, fd: int, wanted_token: int) -> int:
        raise NotImplementedError

    def _unpreserve(self, token: int) -> None:
        raise NotImplementedError

    def _restore(self, token: int) -> int:
        raise NotImplementedError

    def _event_prepare(self) -> None:
        raise NotImplementedError

    def _event_cancel(self) -> None:
        raise NotImplementedError

    def _event_finish(self) -> None:
        raise NotImplementedError

    def _metadata_token_on_boot(self) -> int | None:
        raise NotImplementedError

    def _remember_metadata_token(self, token: int) -> None:
        pass

    def start(self) -> BootState:
        state = self._state()
        if state is GlobalState.UPDATED:
            token = self._metadata_token_on_boot()
            if token is None:
                return BootState(state, notes=("no agent metadata token for this boot",))
            try:
                self._meta_fd = self._restore(token)
                record = read_metadata(self._meta_fd)
            except (KernelError, HandoverCorrupt) as exc:
                return BootState(state, notes=(f"agent metadata unusable: {exc}",))
            self.meta_kernel_token = token
            self.kernel_tokens = {(p.session, p.token): p.kernel_token for p in record.preserved}
            return BootState(state, incoming=record)
        if state in (GlobalState.PREPARED, GlobalState.FROZEN):
            return BootState(state, stale_prepared=True)
        return BootState(state)

    def preserve(
        self, items: Sequence[PreserveItem], record: UpdateRecord
    ) -> dict[tuple[str, int], int]:
        try:
            self._meta_fd = new_metadata_memfd(record)
            self.meta_kernel_token = self._preserve_one(self._meta_fd, METADATA_TOKEN)
            self._remember_metadata_token(self.meta_kernel_token)
            for index, item in enumerate(items, start=1):
                self.kernel_tokens[(item.session, item.token)] = self._preserve_one(item.fd, index)
        except BaseException:
            self._unpreserve_all()
            raise
        return dict(self.kernel_tokens)

    def _unpreserve_all(self) -> None:
        tokens: Iterable[int] = list(self.kernel_tokens.values())
        if self.meta_kernel_token is not None:
            tokens = [self.meta_kernel_token, *tokens]
        for token in tokens:
            with contextlib.suppress(KernelError):
                self._unpreserve(token)
        self.kernel_tokens.clear()
        self.meta_kernel_token = None
        self._drop_metadata()

    def prepare(self) -> None:
        self._event_prepare()

    def freeze(self) -> None:
        pass

    def cancel(self) -> None:
        if self._state() in (GlobalState.PREPARED, GlobalState.FROZEN):
            self._event_cancel()
        self._unpreserve_all()

    def adopt(self, record: UpdateRecord) -> None:
        self.kernel_tokens = {(p.session, p.token): p.kernel_token for p in record.preserved}
        self.meta_kernel_token = self._metadata_token_on_boot()

    def take_over_carried(self, record: UpdateRecord) -> bool:
        return False  # the handover is the kernel's global state: recovery takes it from there

    def retrieve(self, session: str, token: int) -> int:
        kernel_token = self.kernel_tokens.get((session, token))
        if kernel_token is None:
            raise NoSuchSession(
                "FD_RESTORE", errno.ENOENT, f"nothing carried for {session!r}/{token}"
            )
        return self._restore(kernel_token)

    def finish(self) -> list[str]:
        try:
            self._event_finish()
        except KernelError as exc:
            return [str(exc)]
        self.kernel_tokens.clear()
        self.meta_kernel_token = None
        self._drop_metadata()
        return []

    def describe_state(self) -> str:
        return str(self._state())


class V3Backend(GlobalListBackend):
    """PATCH v3: exclusive device held for the agent's lifetime; closing it drops every preserved
    file, so the kernel itself aborts the update if the agent dies."""

    abi = Abi.V3
    capabilities: ClassVar[Capabilities] = Capabilities(
        irreversible_freeze=False, pid1_can_carry=False, sysfs_state=True
    )

    def __init__(self, syscalls: Syscalls) -> None:
        super().__init__(syscalls)
        self.device = V3Device(syscalls)
        self.device.open()

    def _state(self) -> GlobalState:
        return self.device.get_state()

    def _preserve_one(self, fd: int, wanted_token: int) -> int:
        self.device.fd_preserve(fd, wanted_token)
        return wanted_token

    def _unpreserve(self, token: int) -> None:
        self.device.fd_unpreserve(token)

    def _restore(self, token: int) -> int:
        return self.device.fd_restore(token)

    def _event_prepare(self) -> None:
        self.device.set_event(GlobalEvent.PREPARE)

    def _event_cancel(self) -> None:
        self.device.set_event(GlobalEvent.CANCEL)

    def _event_finish(self) -> None:
        self.device.set_event(GlobalEvent.FINISH)

    def _metadata_token_on_boot(self) -> int | None:
        return METADATA_TOKEN

    def close(self) -> None:
        self._drop_metadata()
        self.device.close()


class RfcV2Backend(GlobalListBackend):
    """RFC v2: the kernel makes the tokens and nothing is dropped on close, so the agent cancels
    on stop and a restarted agent cancels a stale PREPARED.  The metadata memfd's kernel-made token
    cannot be known in advance: it is kept in the state directory (fsync'd) for the next boot."""

    abi = Abi.RFC_V2
    capabilities: ClassVar[Capabilities] = Capabilities(
        irreversible_freeze=True, pid1_can_carry=False, sysfs_state=True
    )

    def __init__(self, syscalls: Syscalls, state_directory: Path) -> None:
        super().__init__(syscalls)
        self.token_file = state_directory / "rfc-v2-metadata-token"
        self.device = RfcV2Device(syscalls)
        self.device.open()

    def _state(self) -> GlobalState:
        return self.device.get_state()

    def _preserve_one(self, fd: int, wanted_token: int) -> int:
        return self.device.fd_preserve(fd)

    def _unpreserve(self, token: int) -> None:
        self.device.fd_unpreserve(token)

    def _restore(self, token: int) -> int:
        return self.device.fd_restore(token)

    def _event_prepare(self) -> None:
        self.device.event_prepare()

    def _event_cancel(self) -> None:
        self.device.event_cancel()

    def _event_finish(self) -> None:
        self.device.event_finish()
        with contextlib.suppress(FileNotFoundError):
            self.token_file.unlink()

    def freeze(self) -> None:
        self.device.event_freeze()

    def _metadata_token_on_boot(self) -> int | None:
        try:
            return int(self.token_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def _remember_metadata_token(self, token: int) -> None:
        self.token_file.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.token_file, f"{token}\n".encode(), durable=True)

    def close(self) -> None:
        self._drop_metadata()
        self.device.close()
