"""Which LUO ABI does the running kernel speak?  kernel-abi.md §12, side-effect-free probes only.

Request numbers collide across generations (§11: ``0xBA00`` is G3 FD_PRESERVE, G4 GET_STATE and
G5 CREATE_SESSION), so every probe is chosen to be harmless on *every* generation:

1. filesystem: ``/sys/kernel/liveupdate/prepare`` ⇒ G0 (unsupported); no ``/dev/liveupdate`` ⇒
   ``DeviceUnavailable``; note whether ``/sys/kernel/liveupdate/state`` exists.
2. ``open(O_RDWR|O_CLOEXEC)``: EBUSY ⇒ ``DeviceBusy`` (the caller owns the backoff), EIO ⇒
   ``DeviceUnavailable`` (failed deserialization), … via ``errnomap``.
3. ``0xBA03 {size=8}``: success ⇒ **v3** (G3 GET_STATE).  EINVAL ⇒ go on.
4. ``0xBA00 {size=8}``: success ⇒ G4 (GET_STATE; unsupported).  On G5 it is CREATE_SESSION and
   fails EINVAL on the size check before doing anything.
5. ``0xBA01 {size=72, fd=-1, name=<random>}``: ENOENT ⇒ **session** (RETRIEVE_SESSION of a name
   no one uses).
6. ENOTTY at any of 3-5 ⇒ the size-encoded generations: ``0x8004BA03`` (4-byte GET_STATE), then
   ``0xC010BA00 {fd=-1}``: EBADF ⇒ **rfc-v2** (G1 FD_PRESERVE rejects fd -1); ENOTTY ⇒ G2
   (unsupported).  ``0x4010BA00`` is never sent: on G2 it is FD_PRESERVE.

The device fd is closed before returning.  That is harmless even on v3, whose close unpreserves
every file: v3 opens are exclusive, so if our open succeeded nobody holds preserved files.

If the random-name RETRIEVE_SESSION ever *succeeds*, we now own an incoming session whose close
would FINISH it (discarding its files).  It is not closed: it is returned as
``DetectedAbi.stray_session`` for the caller to keep, hand on or close deliberately.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
from dataclasses import dataclass
from typing import Final

from luo_agent.errors import KernelError, Unsupported

from .device import OPEN_FLAGS, Abi, GlobalState, sized
from .errnomap import Op, os_error, translate
from .session import LuoSession, name_field
from .syscalls import DEVICE_PATH, SYSFS_STATE_PATH, Syscalls
from .uapi import _IOW, LIVEUPDATE_IOCTL_TYPE, rfc_v2, session, v3

G0_PREPARE_PATH: Final = "/sys/kernel/liveupdate/prepare"

# The probe requests, named by what they are on the generation they identify.
PROBE_V3_GET_STATE: Final = v3.LIVEUPDATE_IOCTL_GET_STATE  # 0xBA03
PROBE_G4_GET_STATE: Final = v3.LIVEUPDATE_IOCTL_FD_PRESERVE  # 0xBA00, G4 GET_STATE
PROBE_RETRIEVE_SESSION: Final = session.LIVEUPDATE_IOCTL_RETRIEVE_SESSION  # 0xBA01
PROBE_RFC_V2_GET_STATE: Final = rfc_v2.LIVEUPDATE_IOCTL_GET_STATE  # 0x8004BA03
PROBE_RFC_V2_FD_PRESERVE: Final = rfc_v2.LIVEUPDATE_IOCTL_FD_PRESERVE  # 0xC010BA00
# G2's FD_PRESERVE (_IOW, 16 bytes): preserves on G2, so never a probe.
FORBIDDEN_PROBE: Final = _IOW(LIVEUPDATE_IOCTL_TYPE, 0x00, ctypes.sizeof(rfc_v2.liveupdate_fd))


@dataclass(frozen=True, slots=True)
class DetectedAbi:
    abi: Abi
    state: GlobalState | None = None  # the global state read while probing (rfc-v2, v3)
    sysfs_state: bool = False  # /sys/kernel/liveupdate/state exists (rfc-v2, v3 only)
    notes: tuple[str, ...] = ()
    stray_session: LuoSession | None = None  # see the module docstring


def random_probe_name() -> str:
    """A session name nobody uses (49 characters), for the RETRIEVE_SESSION probe."""
    return f"luo-agent-detect-{secrets.token_hex(16)}"


def _unsupported(err: int, detail: str) -> Unsupported:
    return Unsupported("detect", err, detail)


class _Prober:
    def __init__(self, syscalls: Syscalls, fd: int) -> None:
        self._syscalls, self._fd = syscalls, fd

    def ioctl(self, request: int, buf: bytearray) -> int:
        """0 on success, else the errno."""
        try:
            self._syscalls.ioctl(self._fd, request, buf)
        except OSError as exc:
            return exc.errno if exc.errno is not None else errno.EIO
        return 0

    def size_first(self, request: int) -> tuple[int, bytearray]:
        """``{u32 size = 8; u32 0}``: the 8-byte GET_STATE shape of G3/G4."""
        buf = bytearray(sized(v3.liveupdate_ioctl_get_state))
        return self.ioctl(request, buf), buf


def _unexpected(request: int, err: int) -> KernelError:
    if err == errno.EIO:
        return KernelError(f"probe {request:#x}", err, "device failed during detection")
    return _unsupported(err, f"unrecognised LUO ABI: probe {request:#x} answered {err}")


def detect_abi(syscalls: Syscalls) -> DetectedAbi:
    """The running kernel's LUO ABI.  Raises ``Unsupported`` for generations without a backend
    (G0, G2, G4, unknown), ``DeviceUnavailable``/``DeviceBusy`` from the open."""
    if os.path.exists(syscalls.path(G0_PREPARE_PATH)):
        raise _unsupported(
            errno.EOPNOTSUPP, "G0 (RFC v1, sysfs-only control): no backend drives it"
        )
    device = syscalls.path(DEVICE_PATH)
    if not os.path.exists(device):
        raise translate(Op.OPEN, os_error(errno.ENOENT), device)
    sysfs_state = os.path.exists(syscalls.path(SYSFS_STATE_PATH))
    notes = [f"sysfs state file {'present' if sysfs_state else 'absent'}"]
    try:
        fd = syscalls.open(device, OPEN_FLAGS)
    except OSError as exc:
        raise translate(Op.OPEN, exc, device) from exc
    try:
        return _probe(syscalls, fd, sysfs_state, notes)
    finally:
        syscalls.close(fd)


def _probe(syscalls: Syscalls, fd: int, sysfs_state: bool, notes: list[str]) -> DetectedAbi:
    prober = _Prober(syscalls, fd)

    err, buf = prober.size_first(PROBE_V3_GET_STATE)
    if err == 0:
        number = int(v3.liveupdate_ioctl_get_state.from_buffer_copy(buf).state)
        try:
            state = GlobalState.from_v3(number)
        except ValueError:
            raise _unsupported(errno.EPROTO, f"G3-like kernel, state number {number}") from None
        notes.append(f"0xBA03 GET_STATE answered: state {state.value}")
        return DetectedAbi(Abi.V3, state, sysfs_state, tuple(notes))
    if err == errno.ENOTTY:
        return _probe_size_encoded(prober, sysfs_state, notes)
    if err != errno.EINVAL:
        raise _unexpected(PROBE_V3_GET_STATE, err)

    err, _ = prober.size_first(PROBE_G4_GET_STATE)
    if err == 0:
        raise _unsupported(
            errno.EOPNOTSUPP, "G4 (PATCH v4: sessions on a global state machine): no backend"
        )
    if err == errno.ENOTTY:
        return _probe_size_encoded(prober, sysfs_state, notes)
    if err != errno.EINVAL:
        raise _unexpected(PROBE_G4_GET_STATE, err)

    name = random_probe_name()
    arg = sized(session.liveupdate_ioctl_retrieve_session, fd=-1)
    arg.name = name_field(name.encode())
    buf = bytearray(arg)
    err = prober.ioctl(PROBE_RETRIEVE_SESSION, buf)
    if err == errno.ENOENT:
        notes.append("0xBA01 RETRIEVE_SESSION of a random name: ENOENT")
        return DetectedAbi(Abi.SESSION, None, sysfs_state, tuple(notes))
    if err == 0:
        out = session.liveupdate_ioctl_retrieve_session.from_buffer_copy(buf)
        stray = LuoSession(syscalls, int(out.fd), name, incoming=True)
        notes.append(f"RETRIEVE_SESSION of random name {name!r} succeeded; session kept open")
        return DetectedAbi(Abi.SESSION, None, sysfs_state, tuple(notes), stray)
    if err == errno.ENOTTY:
        return _probe_size_encoded(prober, sysfs_state, notes)
    raise _unexpected(PROBE_RETRIEVE_SESSION, err)


def _probe_size_encoded(prober: _Prober, sysfs_state: bool, notes: list[str]) -> DetectedAbi:
    """G1 or G2: both answer ENOTTY to every ``_IO`` request."""
    state_buf = bytearray(ctypes.sizeof(ctypes.c_uint32))
    err = prober.ioctl(PROBE_RFC_V2_GET_STATE, state_buf)
    if err != 0:
        raise _unexpected(PROBE_RFC_V2_GET_STATE, err)
    number = ctypes.c_uint32.from_buffer_copy(state_buf).value

    arg = rfc_v2.liveupdate_fd(fd=-1, flags=0, token=0)
    err = prober.ioctl(PROBE_RFC_V2_FD_PRESERVE, bytearray(arg))
    if err == errno.ENOTTY:
        raise _unsupported(err, "G2 (PATCH v1/v2: per-open sessions): no backend")
    # EBADF is G1's answer to fd -1 in any state.  EBUSY (state checked before the fd, outside
    # NORMAL/UPDATED) also proves the request was recognised, and G2 would have said ENOTTY.
    if err not in (errno.EBADF, errno.EBUSY):
        raise _unexpected(PROBE_RFC_V2_FD_PRESERVE, err)
    try:
        state = GlobalState.from_rfc_v2(number)
    except ValueError:
        raise _unsupported(errno.EPROTO, f"G1-like kernel, state number {number}") from None
    answer = errno.errorcode[err]
    notes.append(f"0x8004BA03 GET_STATE: state {state.value}; 0xC010BA00 fd -1: {answer}")
    return DetectedAbi(Abi.RFC_V2, state, sysfs_state, tuple(notes))
