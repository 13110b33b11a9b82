"""ctypes mirrors of every ``include/uapi/linux/liveupdate.h`` generation the agent drives.

One module per generation (``rfc_v2`` = G1, ``v3`` = G3, ``session`` = G5/G6 in
``kernel-abi.md``); names keep their C spelling.  Request numbers are computed with the generic
``_IOC`` layout of ``asm-generic/ioctl.h`` (x86_64, arm64, riscv), never written as hex.  This
package does no I/O and imports nothing of luo_agent outside itself.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Final

_IOC_NRBITS: Final = 8
_IOC_TYPEBITS: Final = 8
_IOC_SIZEBITS: Final = 14
_IOC_NRSHIFT: Final = 0
_IOC_TYPESHIFT: Final = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT: Final = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT: Final = _IOC_SIZESHIFT + _IOC_SIZEBITS

_IOC_NONE: Final = 0
_IOC_WRITE: Final = 1
_IOC_READ: Final = 2

LIVEUPDATE_IOCTL_TYPE: Final = 0xBA


def _IOC(dir_: int, type_: int, nr: int, size: int) -> int:
    return (
        (dir_ << _IOC_DIRSHIFT)
        | (type_ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _IO(type_: int, nr: int) -> int:
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_: int, nr: int, size: int) -> int:
    return _IOC(_IOC_READ, type_, nr, size)


def _IOW(type_: int, nr: int, size: int) -> int:
    return _IOC(_IOC_WRITE, type_, nr, size)


def _IOWR(type_: int, nr: int, size: int) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, size)


def _IOC_NR(request: int) -> int:
    return (request >> _IOC_NRSHIFT) & ((1 << _IOC_NRBITS) - 1)


def _IOC_TYPE(request: int) -> int:
    return (request >> _IOC_TYPESHIFT) & ((1 << _IOC_TYPEBITS) - 1)


def _IOC_SIZE(request: int) -> int:
    return (request >> _IOC_SIZESHIFT) & ((1 << _IOC_SIZEBITS) - 1)


def _IOC_DIR(request: int) -> int:
    return (request >> _IOC_DIRSHIFT) & 0x3


@dataclass(frozen=True, slots=True)
class IoctlOp:
    """One row of a size-first dispatcher table (``luo_ioctl_op`` in the kernel).

    ``struct`` is the kernel's struct for the request (its ``sizeof`` is ``ksize``) and
    ``min_size`` is the end offset of the last mandatory field.
    """

    name: str
    request: int
    struct: type[ctypes.Structure]
    min_size: int


def min_size_of(struct: type[ctypes.Structure], last_field: str) -> int:
    """``offsetofend(struct, last_field)``, as the kernel's ``IOCTL_OP`` macro computes it."""
    field = getattr(struct, last_field)
    return int(field.offset + field.size)
