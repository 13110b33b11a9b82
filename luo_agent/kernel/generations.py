"""The backend of each ABI generation, in one table: adding a generation is a row here, its
``Abi`` member and its backend (with its ``Capabilities``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Final

from .backend import FdCustody, KernelBackend
from .device import Abi
from .syscalls import Syscalls

BackendMaker = Callable[[Syscalls, FdCustody, Path], KernelBackend]


def _session(syscalls: Syscalls, custody: FdCustody, state_directory: Path) -> KernelBackend:
    from .session_backend import SessionBackend

    return SessionBackend(syscalls, custody=custody)


def _v3(syscalls: Syscalls, custody: FdCustody, state_directory: Path) -> KernelBackend:
    from .global_list_backends import V3Backend  # the state-machine devices: loaded when used

    return V3Backend(syscalls)


def _rfc_v2(syscalls: Syscalls, custody: FdCustody, state_directory: Path) -> KernelBackend:
    from .global_list_backends import RfcV2Backend

    return RfcV2Backend(syscalls, state_directory)


BACKENDS: Final[Mapping[Abi, BackendMaker]] = MappingProxyType(
    {Abi.RFC_V2: _rfc_v2, Abi.V3: _v3, Abi.SESSION: _session}
)
