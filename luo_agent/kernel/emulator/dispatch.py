"""The kernel's ioctl plumbing: the size-first dispatcher of G3-G6 (kernel-abi.md §1.2), results,
errno exceptions and fault injection."""

from __future__ import annotations

import ctypes
import errno
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from luo_agent.kernel.uapi import _IOC_NR, IoctlOp


class Errno(Exception):
    """An ioctl (or open, or control op) fails with this errno."""

    def __init__(self, code: int, why: str = "") -> None:
        super().__init__(f"{errno.errorcode.get(code, code)}: {why}" if why else str(code))
        self.code = code
        self.why = why


@dataclass(slots=True)
class IoctlResult:
    """What goes back to the caller: return value, bytes copied to the start of its buffer, and
    optionally one fd whose number the client writes at ``fd_offset`` of the buffer.

    ``close_after_send``: the server's copy of ``fd`` is only a vehicle (a new session socket's
    client end) and is closed once sent; otherwise the server keeps its reference (a memfd)."""

    rc: int = 0
    out: bytes = b""
    fd: int = -1
    fd_offset: int = -1
    close_after_send: bool = False


class Faults:
    """inject_fault: the next ``count`` calls of an op fail with ``errno`` before doing anything."""

    def __init__(self) -> None:
        self._pending: dict[str, list[int]] = {}

    def arm(self, op: str, code: int, count: int) -> None:
        if count <= 0:
            self._pending.pop(op, None)
        else:
            self._pending[op] = [code, count]

    def check(self, op: str) -> None:
        entry = self._pending.get(op)
        if entry is None:
            return
        code, count = entry
        if count <= 1:
            del self._pending[op]
        else:
            entry[1] = count - 1
        raise Errno(code, f"injected fault on {op}")

    def snapshot(self) -> dict[str, list[int]]:
        return {op: list(entry) for op, entry in self._pending.items()}


# Executes one op on the kernel-side copy of the struct (mutating it in place).  Returns the
# result; ``out`` (``luo_ucmd_respond``: min(size, ksize) bytes of the kernel's copy) is filled
# in by the dispatcher unless the executor set it.
Executor = Callable[[IoctlOp, bytearray], IoctlResult]


def dispatch_sized(
    table: Sequence[IoctlOp],
    base: int,
    request: int,
    ubuf: bytes,
    execute: Executor,
    kind_check: Callable[[IoctlOp], None] | None = None,
    faults: Faults | None = None,
) -> IoctlResult:
    """``luo_ioctl()``/``luo_session_ioctl()``: the exact order of kernel-abi.md §1.2."""
    nr = _IOC_NR(request)
    if nr < base or nr - base >= len(table):
        raise Errno(errno.EINVAL, f"nr {nr:#x} outside the table")
    if len(ubuf) < 4:
        raise Errno(errno.EFAULT, "cannot read the size field")
    (size,) = struct.unpack_from("<I", ubuf, 0)
    op = table[nr - base]
    if request != op.request:
        raise Errno(errno.ENOTTY, f"request {request:#x} is not {op.name}")
    if faults is not None:
        faults.check(op.name)
    if kind_check is not None:
        kind_check(op)
    if size < op.min_size:
        raise Errno(errno.EINVAL, f"size {size} < min_size {op.min_size}")
    kbuf = copy_struct_from_user(ctypes.sizeof(op.struct), ubuf, size)
    result = execute(op, kbuf)
    if not result.out:
        result.out = bytes(kbuf[: min(size, len(kbuf))])
    return result


def copy_struct_from_user(ksize: int, ubuf: bytes, usize: int) -> bytearray:
    """``copy_struct_from_user``: zero-fill a short struct; a longer one must have only zero
    bytes past ``ksize`` (E2BIG); reading past the caller's buffer is EFAULT."""
    kbuf = bytearray(ksize)
    if usize > ksize:
        tail = ubuf[ksize:usize]
        if tail.count(0) != len(tail):
            raise Errno(errno.E2BIG, "non-zero bytes beyond the kernel's struct")
        if usize > len(ubuf):
            raise Errno(errno.EFAULT, f"size {usize} exceeds the {len(ubuf)}-byte buffer")
        kbuf[:] = ubuf[:ksize]
    else:
        if usize > len(ubuf):
            raise Errno(errno.EFAULT, f"size {usize} exceeds the {len(ubuf)}-byte buffer")
        kbuf[:usize] = ubuf[:usize]
    return kbuf


def op_names(table: Sequence[IoctlOp]) -> list[str]:
    return [op.name for op in table]
