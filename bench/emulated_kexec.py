"""The emulated kernel's kexec carrying one large preserved memfd: how long the kexec and the next
boot take, and the emulator servers' peak RSS (VmHWM), against the same kexec carrying a 1 MiB
memfd in the same run.  Not part of ``bench/run``: ``python -m bench.emulated_kexec [MiB]``.

The memfd's every page is written (no holes), its bytes are compared after the kexec.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from luo_agent.kernel.device import Abi
from luo_agent.kernel.emulator import EmulatedMachine
from luo_agent.kernel.syscalls import DEVICE_PATH
from tests.kernel.luo_raw import create_session, preserve_fd, retrieve_fd, retrieve_session


def _hwm_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class _PeakRss:
    """The largest VmHWM seen of ``pid`` until it exits or ``stop`` is called."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.02):
            hwm = _hwm_kib(self.pid)
            if not hwm and not os.path.exists(f"/proc/{self.pid}"):
                return
            self.peak = max(self.peak, hwm)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def one_kexec(root: Path, mib: int) -> dict[str, float]:
    machine = EmulatedMachine(root, Abi.SESSION, profile="g6")
    machine.boot()
    sc = machine.syscalls
    dev = sc.open(sc.path(DEVICE_PATH), os.O_RDWR)
    sess = create_session(sc, dev, b"big")
    memfd = os.memfd_create("big", os.MFD_CLOEXEC)
    page = bytes(range(256)) * 16
    block = page * 256  # 1 MiB, every page written
    digest = hashlib.sha256()
    for i in range(mib):
        chunk = i.to_bytes(8, "little") + block[8:]
        os.write(memfd, chunk)
        digest.update(chunk)
    preserve_fd(sc, sess, memfd, 1)
    kernel = root / "k"
    kernel.write_bytes(b"k")
    kfd = os.open(kernel, os.O_RDONLY)
    sc.kexec_file_load(kfd, -1, "", 0)
    os.close(kfd)
    pid = int(machine.inspect()["pid"])
    watch = _PeakRss(pid)
    start = time.monotonic()
    sc.reboot_kexec()
    machine.wait_down(timeout=600)
    kexec_s = time.monotonic() - start
    old_rss = watch.stop()
    for fd in (memfd, sess, dev):
        os.close(fd)
    start = time.monotonic()
    machine.boot(timeout=600)
    boot_s = time.monotonic() - start
    new_pid = int(machine.inspect()["pid"])
    new_rss = _hwm_kib(new_pid)
    inc = retrieve_session(sc, sc.open(sc.path(DEVICE_PATH), os.O_RDWR), b"big")
    got = retrieve_fd(sc, inc, 1)
    assert os.lseek(got, 0, os.SEEK_CUR) == mib << 20  # the position is carried too
    check = hashlib.sha256()
    offset = 0
    while data := os.pread(got, 1 << 20, offset):
        check.update(data)
        offset += len(data)
    assert check.digest() == digest.digest(), "the carried bytes differ"
    machine.poweroff()
    return {"kexec_s": kexec_s, "boot_s": boot_s, "old_rss_mib": old_rss / 1024,
            "new_rss_mib": new_rss / 1024}  # fmt: skip


def main() -> None:
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 2048
    print(f"# emulated kexec (session ABI, g6) carrying one preserved memfd; {time.ctime()}")
    print(f"# load average {os.getloadavg()[0]:.2f}")
    for size in (1, mib):
        with tempfile.TemporaryDirectory(prefix="luo-bench-kexec-") as tmp:
            r = one_kexec(Path(tmp), size)
        print(f"  {size:>5} MiB: kexec (reboot → server gone) {r['kexec_s']:.3f} s, "
              f"next boot {r['boot_s']:.3f} s; server peak RSS {r['old_rss_mib']:.0f} MiB "
              f"(kexec side), {r['new_rss_mib']:.0f} MiB (next boot)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
