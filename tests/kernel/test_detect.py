"""detect_abi: the right answer on every generation, and nothing but side-effect-free probes.

Every detection runs through ``RecordingSyscalls``, which records each call (request number,
the exact bytes sent, the errno that came back) and refuses kexec/reboot; the tests assert the
exact request sequence of kernel-abi.md §12 and, on the emulated kernels, that ``inspect()`` is
the same before and after.
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest

from luo_agent.errors import DeviceBusy, DeviceUnavailable, Unsupported
from luo_agent.kernel import detect
from luo_agent.kernel.detect import FORBIDDEN_PROBE, DetectedAbi, detect_abi
from luo_agent.kernel.device import Abi, GlobalEvent, GlobalState
from luo_agent.kernel.rfc_v2 import RfcV2Device
from luo_agent.kernel.session import SessionDevice
from luo_agent.kernel.syscalls import DEVICE_PATH, Syscalls
from luo_agent.kernel.v3 import V3Device
from tests.kernel.luo_raw import Target, kexec_reboot


@dataclass(frozen=True)
class Call:
    name: str  # "open", "ioctl", "close"
    request: int | None = None
    sent: bytes = b""
    errno: int = 0  # 0: success


class RecordingSyscalls:
    """A ``Syscalls`` that forwards to ``inner`` and records every call."""

    def __init__(self, inner: Syscalls) -> None:
        self.inner = inner
        self.calls: list[Call] = []

    def open(self, path: str, flags: int) -> int:
        try:
            fd = self.inner.open(path, flags)
        except OSError as exc:
            self.calls.append(Call("open", errno=exc.errno or 0))
            raise
        self.calls.append(Call("open"))
        return fd

    def ioctl(self, fd: int, request: int, buf: bytearray) -> int:
        sent = bytes(buf)
        try:
            rc = self.inner.ioctl(fd, request, buf)
        except OSError as exc:
            self.calls.append(Call("ioctl", request, sent, exc.errno or 0))
            raise
        self.calls.append(Call("ioctl", request, sent))
        return rc

    def close(self, fd: int) -> None:
        self.calls.append(Call("close"))
        self.inner.close(fd)

    def kexec_file_load(self, kernel_fd: int, initrd_fd: int, cmdline: str, flags: int) -> None:
        raise AssertionError("detection must never load a kernel")

    def reboot_kexec(self) -> None:
        raise AssertionError("detection must never reboot")

    def path(self, path: str) -> str:
        return self.inner.path(path)

    def ioctls(self) -> list[tuple[int, int]]:
        return [(c.request or 0, c.errno) for c in self.calls if c.name == "ioctl"]


def detect_recorded(target: Target) -> tuple[DetectedAbi, RecordingSyscalls]:
    recorder = RecordingSyscalls(target.sc)
    before = None if target.machine is None else target.machine.inspect()
    detected = detect_abi(recorder)
    if target.machine is not None:
        assert target.machine.inspect() == before, "detection changed the kernel's state"
    names = [c.name for c in recorder.calls]
    assert names[0] == "open" and names[-1] == "close" and names.count("open") == 1
    assert all(c.request != 0x4010BA00 for c in recorder.calls)  # G2 FD_PRESERVE
    return detected, recorder


def test_forbidden_probe_constant() -> None:
    assert FORBIDDEN_PROBE == 0x4010BA00


def size_first(size: int) -> bytes:
    return struct.pack("<II", size, 0)


# ------------------------------------------------------------------------------ generations
def test_detects_v3(v3_target: Target) -> None:
    detected, recorder = detect_recorded(v3_target)
    assert (detected.abi, detected.state) == (Abi.V3, GlobalState.NORMAL)
    assert detected.stray_session is None
    assert recorder.ioctls() == [(0xBA03, 0)]
    assert recorder.calls[1].sent == size_first(8)
    if v3_target.machine is not None:
        assert detected.sysfs_state


def test_detect_reports_the_v3_state(v3_target: Target) -> None:
    with V3Device(v3_target.sc) as dev:
        dev.set_event(GlobalEvent.PREPARE)
    try:
        detected, _ = detect_recorded(v3_target)
        assert detected.state is GlobalState.PREPARED
    finally:
        with V3Device(v3_target.sc) as dev:
            dev.set_event(GlobalEvent.CANCEL)


def test_detects_session(session_target: Target) -> None:
    detected, recorder = detect_recorded(session_target)
    assert (detected.abi, detected.state, detected.stray_session) == (Abi.SESSION, None, None)
    assert not detected.sysfs_state or session_target.machine is None
    assert recorder.ioctls() == [
        (0xBA03, errno.EINVAL),
        (0xBA00, errno.EINVAL),
        (0xBA01, errno.ENOENT),
    ]
    assert recorder.calls[1].sent == size_first(8)
    assert recorder.calls[2].sent == size_first(8)
    retrieve = recorder.calls[3].sent
    assert len(retrieve) == 72
    size, fd = struct.unpack_from("<Ii", retrieve)
    name = retrieve[8:].split(b"\0", 1)[0]
    assert (size, fd) == (72, -1)
    assert len(name) >= 40
    assert retrieve[8 + len(name) :] == bytes(72 - 8 - len(name))


def test_detects_rfc_v2(rfc_v2_target: Target) -> None:
    detected, recorder = detect_recorded(rfc_v2_target)
    assert (detected.abi, detected.state) == (Abi.RFC_V2, GlobalState.NORMAL)
    assert recorder.ioctls() == [(0xBA03, errno.ENOTTY), (0x8004BA03, 0), (0xC010BA00, errno.EBADF)]
    assert recorder.calls[2].sent == bytes(4)
    assert recorder.calls[3].sent == struct.pack("<iIQ", -1, 0, 0)


def test_detect_reports_the_rfc_v2_state(rfc_v2_target: Target) -> None:
    with RfcV2Device(rfc_v2_target.sc) as dev:
        dev.event_prepare()
        try:
            detected, recorder = detect_recorded(rfc_v2_target)
        finally:
            dev.event_cancel()
    assert (detected.abi, detected.state) == (Abi.RFC_V2, GlobalState.PREPARED)
    assert [request for request, _ in recorder.ioctls()] == [0xBA03, 0x8004BA03, 0xC010BA00]


def test_detection_is_repeatable(session_target: Target) -> None:
    first, _ = detect_recorded(session_target)
    second, _ = detect_recorded(session_target)
    assert first.abi == second.abi == Abi.SESSION


# ------------------------------------------------------------------------------ no device etc.
def test_missing_device_is_unavailable(tmp_path: Path) -> None:
    from luo_agent.kernel.emulator import EmulatedSyscalls

    recorder = RecordingSyscalls(EmulatedSyscalls(tmp_path))
    with pytest.raises(DeviceUnavailable, match="absent or disabled"):
        detect_abi(recorder)
    assert recorder.calls == []


def test_powered_off_machine_is_unavailable(session_machine: Target) -> None:
    # Emulated only: powering the real machine off would end the test run.
    session_machine.machine.poweroff()
    with pytest.raises(DeviceUnavailable):
        detect_abi(RecordingSyscalls(session_machine.sc))


def test_busy_device_is_device_busy(v3_target: Target) -> None:
    with V3Device(v3_target.sc):
        recorder = RecordingSyscalls(v3_target.sc)
        with pytest.raises(DeviceBusy):
            detect_abi(recorder)
    assert recorder.calls == [Call("open", errno=errno.EBUSY)]


def test_g0_sysfs_control_is_unsupported(session_machine: Target) -> None:
    # Emulated only: it writes a G0 control file into the machine's sysfs.
    prepare = Path(session_machine.sc.path(detect.G0_PREPARE_PATH))
    prepare.parent.mkdir(parents=True, exist_ok=True)
    prepare.write_text("0\n")
    recorder = RecordingSyscalls(session_machine.sc)
    with pytest.raises(Unsupported, match="G0"):
        detect_abi(recorder)
    assert recorder.calls == []


def test_successful_random_retrieve_keeps_the_session_open(
    session_machine: Target, kexec_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 'impossible' case: an incoming session has the probe's name.  Closing it would
    FINISH it, so detection hands it back open instead."""
    name = "luo-agent-detect-" + "5" * 32
    monkeypatch.setattr(detect, "random_probe_name", lambda: name)
    with SessionDevice(session_machine.sc) as dev:
        outgoing = dev.create_session(name)
    kexec_reboot(session_machine, kexec_image)
    outgoing.close()
    detected, recorder = detect_recorded_allowing_change(session_machine)
    assert detected.abi is Abi.SESSION
    stray = detected.stray_session
    assert stray is not None
    try:
        assert (stray.name, stray.incoming) == (name, True)
        (incoming,) = session_machine.machine.inspect()["incoming_sessions"]
        assert incoming["name"] == name
        assert incoming["retrieved"]
    finally:
        stray.close()
    assert recorder.ioctls()[-1] == (0xBA01, 0)


def detect_recorded_allowing_change(target: Target) -> tuple[DetectedAbi, RecordingSyscalls]:
    recorder = RecordingSyscalls(target.sc)
    return detect_abi(recorder), recorder


# ------------------------------------------------------------------------------ G2 / G4 / unknown
class ScriptedKernel:
    """Answers for generations no emulator implements (G2, G4): errno per request, per §11."""

    def __init__(self, root: Path, answers: dict[int, int]) -> None:
        self.root, self.answers = root, answers
        device = Path(self.path(DEVICE_PATH))
        device.parent.mkdir(parents=True)
        device.touch()

    def open(self, path: str, flags: int) -> int:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)

    def ioctl(self, fd: int, request: int, buf: bytearray) -> int:
        err = self.answers.get(request, errno.ENOTTY)
        if err:
            raise OSError(err, os.strerror(err))
        return 0

    def close(self, fd: int) -> None:
        os.close(fd)

    def kexec_file_load(self, kernel_fd: int, initrd_fd: int, cmdline: str, flags: int) -> None:
        raise AssertionError

    def reboot_kexec(self) -> None:
        raise AssertionError

    def path(self, path: str) -> str:
        return str(self.root) + path


G2 = {0x8004BA03: 0}  # size-encoded GET_STATE works; 0xC010BA00 is not G2's PRESERVE
G4 = {0xBA03: errno.EINVAL, 0xBA00: 0}  # 0xBA03 = RETRIEVE_SESSION (size < 72), 0xBA00 = GET_STATE
UNKNOWN = {0xBA03: errno.EINVAL, 0xBA00: errno.EINVAL, 0xBA01: errno.E2BIG}


@pytest.mark.parametrize(
    ("answers", "match", "sequence"),
    [
        (G2, "G2", [0xBA03, 0x8004BA03, 0xC010BA00]),
        (G4, "G4", [0xBA03, 0xBA00]),
        (UNKNOWN, "unrecognised", [0xBA03, 0xBA00, 0xBA01]),
    ],
    ids=["G2", "G4", "unknown"],
)
def test_generations_without_backend_are_unsupported(
    tmp_path: Path, answers: dict[int, int], match: str, sequence: list[int]
) -> None:
    recorder = RecordingSyscalls(ScriptedKernel(tmp_path, answers))
    with pytest.raises(Unsupported, match=match):
        detect_abi(recorder)
    assert [request for request, _ in recorder.ioctls()] == sequence
    assert recorder.calls[-1].name == "close"
