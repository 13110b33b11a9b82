"""``EmulatedMachine``: boot, power off, inspect and fault-inject an emulated LUO machine."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from luo_agent.errors import HandoverCorrupt

from ..device import Abi
from .client import EmulatedSyscalls
from .config import ABIS, read_config, write_config
from .protocol import Layout, connect_seqpacket

_PACKAGE_PARENT = str(Path(__file__).resolve().parents[3])


def _wait_pid_exit(pid: int, timeout: float) -> bool:
    """True once ``pid`` has exited (waits on a pidfd, no polling)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([pidfd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(pidfd)


class EmulatedMachine:
    def __init__(
        self, root: str | os.PathLike[str], abi: str | None = None, profile: str | None = None
    ) -> None:
        self.root = Path(root).absolute()
        self.layout = Layout(self.root)
        self.layout.emu_dir.mkdir(parents=True, exist_ok=True)
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None
        config = read_config(self.layout)
        if abi is not None:
            if abi not in ABIS:
                raise ValueError(f"unknown abi {abi!r} (want one of {ABIS})")
            if abi == Abi.SESSION:
                profile = profile or config.get("profile") or "6.19"
                if profile not in ("6.19", "g6"):
                    raise ValueError(f"unknown session profile {profile!r}")
            else:
                profile = None
            if (config.get("abi"), config.get("profile")) != (abi, profile):
                if self.running:
                    raise RuntimeError("cannot change the abi of a running machine")
                config.update(abi=abi, profile=profile)
                write_config(self.layout, config)
        elif "abi" not in config:
            raise ValueError(f"{self.layout.machine_json}: no abi recorded; pass abi=")
        self.abi: str = read_config(self.layout)["abi"]
        self.profile: str | None = read_config(self.layout).get("profile")

    @property
    def syscalls(self) -> EmulatedSyscalls:
        return EmulatedSyscalls(self.root)

    @property
    def running(self) -> bool:
        try:
            sock = connect_seqpacket(self.layout.control)
        except OSError:
            return False
        sock.close()
        return True

    def boot(self, timeout: float = 10.0) -> None:
        if self.running:
            raise RuntimeError(f"emulated machine {self.root} is already running")
        self._reap()
        read_end, write_end = os.pipe()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH", "")) if p
        )
        log = open(self.layout.kernel_log, "ab")  # noqa: SIM115 - handed to the child
        try:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "luo_agent.kernel.emulator",
                    "boot",
                    "--foreground",
                    "--root",
                    str(self.root),
                    "--ready-fd",
                    str(write_end),
                ],
                pass_fds=(write_end,),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                env=env,
            )
        finally:
            log.close()
            os.close(write_end)
        self._proc, self._pid = proc, proc.pid
        try:
            line = self._read_ready(read_end, timeout)
        finally:
            os.close(read_end)
        if line == "ok":
            return
        proc.wait()
        self._proc = self._pid = None
        if line.startswith("panic "):
            raise HandoverCorrupt(line.removeprefix("panic "))
        raise RuntimeError(
            f"emulated kernel failed to boot: {line or 'no report'}; see {self.layout.kernel_log}"
        )

    def _read_ready(self, fd: int, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        data = b""
        while b"\n" not in data:
            left = deadline - time.monotonic()
            readable, _, _ = select.select([fd], [], [], max(left, 0))
            if not readable:
                self._kill()
                raise TimeoutError(f"emulated kernel did not boot within {timeout}s")
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
        return data.decode(errors="replace").strip()

    def _server_pid(self) -> int | None:
        if self._pid is not None:
            return self._pid
        try:
            return int(self.layout.pid_file.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def _kill(self) -> None:
        pid = self._server_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _wait_pid_exit(pid, 10.0)
        self._reap()

    def _reap(self) -> None:
        if self._proc is not None:
            self._proc.wait()
        self._proc = self._pid = None

    def poweroff(self) -> None:
        """Power cycle: the server is killed, nothing is handed over (a pending handover image
        from a kexec that has not booted yet is lost too, like RAM)."""
        if self.running:
            with contextlib.suppress(OSError):
                self._pid = int(self.syscalls.control({"op": "ping"})["pid"])
        self._kill()
        layout = self.layout
        for path in (
            layout.device,
            layout.control,
            layout.pid_file,
            layout.sysfs_state,
            layout.kexec_loaded,
            layout.handover,
            layout.handover_tmp,
        ):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def wait_down(self, timeout: float = 10.0) -> None:
        """Wait for the server to exit (after a kexec reboot)."""
        pid = self._server_pid()
        if pid is not None and not _wait_pid_exit(pid, timeout):
            raise TimeoutError(f"emulated kernel {pid} still running after {timeout}s")
        self._reap()

    def inspect(self) -> dict[str, Any]:
        result = self.syscalls.control({"op": "inspect"})
        assert isinstance(result, dict)
        return result

    def inject_fault(self, op: str, errno: int, count: int = 1) -> None:
        self.syscalls.control({"op": "inject_fault", "name": op, "errno": errno, "count": count})

    def kernel_log(self) -> str:
        try:
            return self.layout.kernel_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> EmulatedMachine:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.running or self._proc is not None:
            self.poweroff()
