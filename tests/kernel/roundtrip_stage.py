"""One stage of the two-process kexec round trip (test_roundtrip_kexec.py), run as its own
process: ``python roundtrip_stage.py {stage1,stage2} ROOT ABI [ARGS...]``.  Prints one JSON line.

stage1 ROOT ABI IMAGE: preserve a 1 MiB random memfd at position 12345 plus one that will never
be retrieved, load IMAGE and reboot_kexec.
stage2 ROOT ABI TOKEN OTHER_TOKEN: retrieve TOKEN, measure it, finish, then try OTHER_TOKEN.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sys

from luo_agent.kernel.device import Abi
from luo_agent.kernel.emulator import EmulatedSyscalls
from luo_agent.kernel.syscalls import DEVICE_PATH
from luo_agent.kernel.uapi import rfc_v2, v3
from tests.kernel import luo_raw as raw

SIZE = 1 << 20
POSITION = 12345


def measure(fd: int) -> dict[str, object]:
    return {
        "sha256": hashlib.sha256(raw.read_all(fd)).hexdigest(),
        "size": os.fstat(fd).st_size,
        "pos": os.lseek(fd, 0, os.SEEK_CUR),
        "cloexec": raw.cloexec(fd),
    }


def stage1(root: str, abi: str, image: str) -> dict[str, object]:
    sc = EmulatedSyscalls(root)
    dev = sc.open(sc.path(DEVICE_PATH), os.O_RDWR | os.O_CLOEXEC)
    data = os.urandom(SIZE)
    kept = raw.memfd(data, "vm-ram")
    os.lseek(kept, POSITION, os.SEEK_SET)
    lost = raw.memfd(os.urandom(4096), "never-retrieved")
    out = measure(kept)
    if abi == Abi.SESSION:
        sess = raw.create_session(sc, dev, "vm-1")  # held open until the reboot
        raw.preserve_fd(sc, sess, kept, 7)
        raw.preserve_fd(sc, sess, lost, 8)
        sc.close(dev)  # like the selftests: only session fds matter
        out |= {"token": 7, "other_token": 8}
    elif abi == Abi.V3:
        raw.v3_preserve(sc, dev, kept, 7)
        raw.v3_preserve(sc, dev, lost, 8)
        raw.v3_set_event(sc, dev, v3.liveupdate_event.LIVEUPDATE_PREPARE)
        out |= {"token": 7, "other_token": 8}  # dev stays open: its close drops every fd
    else:
        token = raw.g1_preserve(sc, dev, kept)
        other = raw.g1_preserve(sc, dev, lost)
        raw.g1_event(sc, dev, rfc_v2.LIVEUPDATE_IOCTL_EVENT_PREPARE)
        out |= {"token": token, "other_token": other}
    image_fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    sc.kexec_file_load(image_fd, -1, "luo_emu liveupdate=1 roundtrip", 0)
    os.close(image_fd)
    sc.reboot_kexec()
    return out | {"pid": os.getpid()}


def stage2(root: str, abi: str, token: int, other: int) -> dict[str, object]:
    sc = EmulatedSyscalls(root)
    dev = sc.open(sc.path(DEVICE_PATH), os.O_RDWR | os.O_CLOEXEC)
    if abi == Abi.SESSION:
        inc = raw.retrieve_session(sc, dev, "vm-1")
        fd = raw.retrieve_fd(sc, inc, token)
        out = measure(fd)
        raw.finish(sc, inc)
        other_errno = raw.errno_of(raw.retrieve_fd, sc, inc, other)
        sc.close(inc)
    elif abi == Abi.V3:
        fd = raw.v3_restore(sc, dev, token)
        out = measure(fd)
        raw.v3_set_event(sc, dev, v3.liveupdate_event.LIVEUPDATE_FINISH)
        other_errno = raw.errno_of(raw.v3_restore, sc, dev, other)
    else:
        fd = raw.g1_restore(sc, dev, token)
        out = measure(fd)
        raw.g1_event(sc, dev, rfc_v2.LIVEUPDATE_IOCTL_EVENT_FINISH)
        other_errno = raw.errno_of(raw.g1_restore, sc, dev, other)
    sc.close(dev)
    return out | {"other_errno": errno.errorcode[other_errno], "pid": os.getpid()}


def main(argv: list[str]) -> None:
    stage, root, abi, *rest = argv
    if stage == "stage1":
        result = stage1(root, abi, rest[0])
    else:
        result = stage2(root, abi, int(rest[0]), int(rest[1]))
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
