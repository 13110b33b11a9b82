"""The seam under every kernel backend: ``open``/``ioctl``/``close`` on ``/dev/liveupdate`` and
its session fds, plus ``kexec_file_load`` and ``reboot(LINUX_REBOOT_CMD_KEXEC)``.

``RealSyscalls`` is ``os``/``fcntl``/libc; ``luo_agent.kernel.emulator.EmulatedSyscalls`` sends the
same request numbers and bytes to the emulated kernel.  The backends above are the same code for
both.  Errors are ``OSError`` with the kernel's errno; translation to domain errors happens once,
in ``kernel.errnomap``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import os
from typing import Final, Protocol

DEVICE_PATH: Final = "/dev/liveupdate"
SYSFS_STATE_PATH: Final = "/sys/kernel/liveupdate/state"
# "1" while a kexec image is loaded (kernel/ksysfs.c); absent without CONFIG_KEXEC_CORE.
KEXEC_LOADED_PATH: Final = "/sys/kernel/kexec_loaded"

# <linux/reboot.h>
LINUX_REBOOT_MAGIC1: Final = 0xFEE1DEAD
LINUX_REBOOT_MAGIC2: Final = 672274793
LINUX_REBOOT_CMD_KEXEC: Final = 0x45584543
# <linux/kexec.h>
KEXEC_FILE_UNLOAD: Final = 0x1
KEXEC_FILE_NO_INITRAMFS: Final = 0x4


class Syscalls(Protocol):
    """What a backend needs from the kernel.  ``ioctl`` mutates ``buf`` in place, exactly like
    ``fcntl.ioctl(fd, request, buf, True)``, and returns the ioctl's return value."""

    def open(self, path: str, flags: int) -> int: ...

    def ioctl(self, fd: int, request: int, buf: bytearray) -> int: ...

    def close(self, fd: int) -> None: ...

    def kexec_file_load(self, kernel_fd: int, initrd_fd: int, cmdline: str, flags: int) -> None: ...

    def reboot_kexec(self) -> None:
        """``reboot(LINUX_REBOOT_CMD_KEXEC)``.  Returns only on failure (raises OSError), except on
        the emulated kernel, where returning means the emulated machine has gone down."""
        ...

    def path(self, path: str) -> str:
        """Where an absolute kernel path (``/dev/liveupdate``, ``/sys/...``) lives."""
        ...

    def fd_link(self, fd: int) -> str:
        """``readlink(/proc/self/fd/<fd>)``: what PID 1 reads a session's name from."""
        ...


_SYS_kexec_file_load: Final = {"x86_64": 320, "aarch64": 294, "riscv64": 294}
_SYS_reboot: Final = {"x86_64": 169, "aarch64": 142, "riscv64": 142}


class RealSyscalls:
    """The running kernel."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self._machine = os.uname().machine

    def open(self, path: str, flags: int) -> int:
        return os.open(path, flags)

    def fd_link(self, fd: int) -> str:
        return os.readlink(f"/proc/self/fd/{fd}")

    def ioctl(self, fd: int, request: int, buf: bytearray) -> int:
        return int(fcntl.ioctl(fd, request, buf, True))

    def close(self, fd: int) -> None:
        os.close(fd)

    def _syscall(self, table: dict[str, int], *args: object) -> None:
        nr = table.get(self._machine)
        if nr is None:
            raise OSError(38, f"no syscall number known for {self._machine}")  # ENOSYS
        if self._libc.syscall(nr, *args) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def kexec_file_load(self, kernel_fd: int, initrd_fd: int, cmdline: str, flags: int) -> None:
        raw = cmdline.encode() + b"\0"
        if initrd_fd < 0:
            flags |= KEXEC_FILE_NO_INITRAMFS
        self._syscall(
            _SYS_kexec_file_load,
            ctypes.c_int(kernel_fd),
            ctypes.c_int(initrd_fd),
            ctypes.c_ulong(len(raw)),
            ctypes.c_char_p(raw),
            ctypes.c_ulong(flags),
        )

    def reboot_kexec(self) -> None:
        os.sync()
        self._syscall(
            _SYS_reboot,
            ctypes.c_uint(LINUX_REBOOT_MAGIC1),
            ctypes.c_uint(LINUX_REBOOT_MAGIC2),
            ctypes.c_uint(LINUX_REBOOT_CMD_KEXEC),
            ctypes.c_void_p(None),
        )

    def path(self, path: str) -> str:
        return path


def kexec_image_loaded(syscalls: Syscalls) -> bool:
    """Whether ``reboot(KEXEC)`` has an image to jump to (``/sys/kernel/kexec_loaded``)."""
    try:
        with open(syscalls.path(KEXEC_LOADED_PATH)) as f:
            return f.read().strip() == "1"
    except OSError:
        return False
