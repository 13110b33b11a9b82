"""The VMM driver: one QEMU process whose guest RAM is a memfd the caller owns, its device state
saved into another memfd and loaded by a new QEMU (``docs/vm-participant.md``).

RAM is ``memory-backend-file`` on ``/proc/self/fd/N`` with ``share=on`` (a *file* backend: QEMU
leaves a shared RAM block out of the migration stream only when it is a named file), so a QEMU
started later on the same memfd finds the guest's RAM as it was.  The device state goes through
QEMU's migration with ``x-ignore-shared`` (RAM left out), or, as the copy-RAM baseline, without
it (RAM in the stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

from .qmp import Qmp, QmpError

MIGRATE_POLL = 0.005  # seconds between query-migrate polls (the pause is measured in ms)
STATE_FD_NAME = "luo-vm-state"
QUIT_GRACE = 10.0  # seconds for ``quit`` before the process is killed


class QemuError(RuntimeError):
    """QEMU failed to start, to save or to load, or died."""


@dataclass(frozen=True)
class VmConfig:
    """What the guest is; the same on both sides of an update (the argv is built from it)."""

    name: str
    ram_bytes: int
    kernel: str
    qemu: str = "qemu-system-x86_64"
    machine: str = "pc"
    serial_log: str = ""
    extra_args: tuple[str, ...] = ()

    def argv(self, ram_fd: int, qmp_path: str, *, incoming: bool) -> list[str]:
        size = f"{self.ram_bytes // (1 << 20)}M"
        argv = [
            self.qemu,
            "-name", self.name,
            "-machine", f"{self.machine},memory-backend=ram0",
            "-accel", "tcg",
            "-m", size,
            "-object",
            f"memory-backend-file,id=ram0,size={size},mem-path=/proc/self/fd/{ram_fd},share=on",
            "-nodefaults", "-no-user-config", "-display", "none",
            "-qmp", f"unix:{qmp_path},server=on,wait=off",
            "-kernel", self.kernel,
        ]  # fmt: skip
        if self.serial_log:
            argv += ["-chardev", f"file,id=serial0,path={self.serial_log},append=on"]
            argv += ["-serial", "chardev:serial0"]
        argv += list(self.extra_args)
        if incoming:
            argv += ["-S", "-incoming", "defer"]
        return argv


@dataclass
class Qemu:
    """A running QEMU and its monitor."""

    process: asyncio.subprocess.Process
    qmp: Qmp
    argv: list[str]
    version: str = ""
    machine: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    async def status(self) -> str:
        result = await self.qmp.execute("query-status")
        return str(result["status"])

    async def stop(self) -> float:
        """Pause the guest; returns the wall-clock time at which ``stop`` was sent."""
        stopped_at = time.time()
        await self.qmp.execute("stop")
        return stopped_at

    async def resume(self) -> float:
        """``cont``; returns the wall-clock time at which it returned."""
        await self.qmp.execute("cont")
        return time.time()

    async def save(self, state_fd: int, *, copy_ram: bool) -> int:
        """Save the stopped guest's device state (and its RAM with ``copy_ram``) into
        ``state_fd`` from its current position; returns the bytes written."""
        start = os.lseek(state_fd, 0, os.SEEK_CUR)
        await self._ignore_shared(not copy_ram)
        await self.qmp.execute("getfd", {"fdname": STATE_FD_NAME}, fd=state_fd)
        await self.qmp.execute("migrate", {"uri": f"fd:{STATE_FD_NAME}"})
        await self._migration_done()
        return os.lseek(state_fd, 0, os.SEEK_CUR) - start

    async def load(self, state_fd: int, *, copy_ram: bool) -> None:
        """Load the state from ``state_fd`` (an fd this QEMU inherited, at the stream's start)
        into a QEMU started with ``incoming=True``; the guest stays paused until ``resume``."""
        await self._ignore_shared(not copy_ram)
        await self.qmp.execute("migrate-incoming", {"uri": f"fd:{state_fd}"})
        await self._migration_done()

    async def quit(self) -> None:
        """``quit``, or kill: the process is gone when this returns; the monitor is closed."""
        try:
            async with asyncio.timeout(QUIT_GRACE):
                with contextlib.suppress(QmpError, OSError):
                    await self.qmp.execute("quit")
                await self.process.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()
        self.qmp.close()

    async def _ignore_shared(self, on: bool) -> None:
        capability = {"capability": "x-ignore-shared", "state": on}
        await self.qmp.execute("migrate-set-capabilities", {"capabilities": [capability]})

    async def _migration_done(self) -> None:
        while True:
            info = await self.qmp.execute("query-migrate")
            status = info.get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise QemuError(f"migration {status}: {info.get('error-desc', 'no reason given')}")
            if not self.alive:
                raise QemuError("QEMU died during the migration")
            await asyncio.sleep(MIGRATE_POLL)


async def start(
    config: VmConfig,
    ram_fd: int,
    qmp_path: str,
    *,
    incoming_fd: int | None = None,
) -> Qemu:
    """Start QEMU on ``ram_fd`` (inherited under the same number); with ``incoming_fd`` it waits
    for ``Qemu.load`` of that fd instead of booting the guest.  The caller bounds the wait for
    its monitor; a QEMU that exits first is reported at once."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(qmp_path)
    argv = config.argv(ram_fd, qmp_path, incoming=incoming_fd is not None)
    passed = [ram_fd] if incoming_fd is None else [ram_fd, incoming_fd]
    process = await asyncio.create_subprocess_exec(*argv, pass_fds=passed, stdin=subprocess.DEVNULL)
    try:
        qmp = await _connect(process, qmp_path)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise
    qemu = Qemu(process, qmp, argv)
    version = await qmp.execute("query-version")
    qemu.version = version_string(version)
    qemu.machine = str(await qmp.execute("qom-get", {"path": "/machine", "property": "type"}))
    return qemu


async def _connect(process: asyncio.subprocess.Process, path: str) -> Qmp:
    connect = asyncio.ensure_future(Qmp.connect(path))
    died = asyncio.ensure_future(process.wait())
    done, _ = await asyncio.wait({connect, died}, return_when=asyncio.FIRST_COMPLETED)
    if connect in done:
        died.cancel()
        return connect.result()
    connect.cancel()
    with contextlib.suppress(BaseException):
        await connect
    raise QemuError(f"QEMU exited with status {process.returncode} before its monitor answered")


def version_string(query_version: dict[str, Any]) -> str:
    """QEMU's full version as ``--version`` prints it (``7.2.22 (Debian 1:7.2+dfsg-7+…)``)."""
    q = query_version["qemu"]
    number = f"{q['major']}.{q['minor']}.{q['micro']}"
    package = str(query_version.get("package", "")).strip()
    return f"{number} ({package})" if package else number


def installed_version(qemu: str) -> str:
    """The full version of the QEMU binary ``qemu`` (what the next start will run)."""
    proc = subprocess.run([qemu, "--version"], capture_output=True, text=True, check=False)
    match = re.search(r"QEMU emulator version (.+)", proc.stdout)
    if proc.returncode != 0 or match is None:
        raise QemuError(f"{qemu} --version failed: {(proc.stdout + proc.stderr).strip()[:200]}")
    return match.group(1).strip()


def supports_machine(qemu: str, machine_type: str) -> bool:
    """Whether the QEMU binary ``qemu`` offers ``machine_type`` (``qom-get`` names it with a
    ``-machine`` suffix)."""
    name = machine_type.removesuffix("-machine")
    proc = subprocess.run([qemu, "-machine", "help"], capture_output=True, text=True, check=False)
    return proc.returncode == 0 and any(
        line.split()[:1] == [name] for line in proc.stdout.splitlines()
    )


def ram_memfd(name: str, size: int) -> int:
    fd = os.memfd_create(f"luo-vm-ram-{name}", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd
