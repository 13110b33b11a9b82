"""A real systemd user manager in a throw-away private mount namespace, for tests and the demo.

Layout: a holder process (``unshare -m --propagation private``) owns the namespace and has a fresh
tmpfs on ``/run``; ``/lib/systemd/systemd --user`` runs there with ``XDG_RUNTIME_DIR=/run/user/0``,
and its own socket-activated session ``dbus-daemon`` listens on ``workdir/bus`` (outside ``/run``,
so processes outside the namespace can reach it).  The host's ``/run`` is never touched.

Every process started here first joins the sandbox's own cgroups (``sandbox_cgroups``): a user
manager in a root cgroup would take over every process of it.

A "reboot" is ``stop()`` followed by a new ``Sandbox`` over the same ``workdir``: ``/run`` is
fresh, while anything kept under ``workdir`` (including ``HOME``) persists.  Stdlib only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

from .sandbox_cgroups import SandboxCgroups, own_cgroup_dirs

RUNTIME_DIR = "/run/user/0"
RUNTIME_UNIT_DIR = f"{RUNTIME_DIR}/systemd/user"
SYSTEMD_BINARY = "/lib/systemd/systemd"
_SYSTEMD_BUS_NAME = "org.freedesktop.systemd1"

_HOLDER_SCRIPT = (
    "mount -t tmpfs -o mode=0755 tmpfs /run"
    f" && mkdir -p /run/systemd/system {RUNTIME_UNIT_DIR} && chmod 0700 {RUNTIME_DIR}"
    " && echo ready && exec sleep infinity"
)


class SandboxError(RuntimeError):
    """The sandbox could not be started or torn down cleanly."""


def missing_requirements() -> str | None:
    """Why a sandbox cannot run here, or None: used by tests to skip with a clear reason."""
    if os.geteuid() != 0:
        return "needs root (mount namespaces, cgroups)"
    for tool in ("unshare", "nsenter", "dbus-daemon", "systemctl", "busctl"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    if not os.access(SYSTEMD_BINARY, os.X_OK):
        return f"{SYSTEMD_BINARY} missing"
    if not own_cgroup_dirs():
        return "no writable cgroup hierarchy"
    return None


class Sandbox:
    """A systemd user manager with its own bus, inside a private mount namespace."""

    def __init__(self, workdir: Path, *, start_timeout: float = 30.0) -> None:
        self.workdir = workdir
        self.start_timeout = start_timeout
        self._tag = f"luo-sandbox-{uuid.uuid4().hex[:12]}"
        self._cgroups = SandboxCgroups(self._tag)
        self._holder: subprocess.Popen[bytes] | None = None
        self._manager: subprocess.Popen[bytes] | None = None
        self._mnt_ns: tuple[int, int] | None = None  # (st_dev, st_ino) of the namespace

    # -- public surface -------------------------------------------------------------------
    @property
    def bus_path(self) -> Path:
        return self.workdir / "bus"

    @property
    def bus_address(self) -> str:
        return f"unix:path={self.bus_path}"

    @property
    def home(self) -> Path:
        return self.workdir / "home"

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    @property
    def env(self) -> dict[str, str]:
        """Environment for a process that talks to this manager.  ``XDG_RUNTIME_DIR`` only
        means something inside the namespace (``run``); outside, the bus address is enough."""
        return {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "LANG": "C.UTF-8",
            "HOME": str(self.home),
            "XDG_RUNTIME_DIR": RUNTIME_DIR,
            "DBUS_SESSION_BUS_ADDRESS": self.bus_address,
            # No journald here: liveupdatectl reads a failed unit's log lines from these files.
            "LUO_AGENT_UNIT_LOGS": str(self.log_dir),
            "SYSTEMD_PAGER": "",
            "SYSTEMD_COLORS": "0",
        }

    @property
    def manager_pid(self) -> int:
        """Host pid of ``systemd --user`` (e.g. for ``nsenter -t PID -m``)."""
        if self._manager is None:
            raise SandboxError("sandbox not started")
        return self._manager.pid

    def journal(self, unit: str) -> str:
        """What ``unit`` wrote to stdout/stderr.  The sandbox has no journald: a type-wide
        drop-in sends every service's output to ``workdir/logs/<unit>.log`` instead."""
        try:
            return (self.log_dir / f"{unit}.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> Sandbox:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        if self._holder is not None:
            raise SandboxError("sandbox already started")
        reason = missing_requirements()
        if reason is not None:
            raise SandboxError(reason)
        for directory in (self.workdir, self.home, self.log_dir):
            directory.mkdir(parents=True, exist_ok=True)
        try:
            self._cgroups.create()
            self._start_holder()
            self._redirect_bus_socket()
            self._redirect_service_output()
            self._start_manager()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """End every process of the sandbox (manager first, so it can stop its units), then
        remove the cgroups.  Raises SandboxError if anything survives."""
        if self._manager is not None:
            self._terminate(self._manager, grace=15.0)
        deadline = time.monotonic() + 10.0
        while pids := self._pids_excluding_holder():
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)  # reparented processes are reaped by PID 1, not by us
        if self._holder is not None:
            self._terminate(self._holder, grace=0.0)
        leftover = self.processes()
        removed = self._cgroups.remove(deadline=time.monotonic() + 5.0)
        self._manager = self._holder = None
        if leftover or not removed:
            raise SandboxError(
                f"sandbox left processes {leftover} or cgroups {self._cgroups.paths}"
            )
        self._cgroups.paths = []

    def processes(self) -> list[int]:
        """Pids of every live process in the sandbox: its mount namespace or its cgroups."""
        pids = self._cgroups.pids()
        if self._mnt_ns is not None:
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    st = os.stat(entry / "ns" / "mnt")
                except OSError:
                    continue
                if (st.st_dev, st.st_ino) == self._mnt_ns:
                    pids.add(int(entry.name))
        return sorted(pid for pid in pids if Path(f"/proc/{pid}").exists())

    def path_inside(self, path: str) -> Path:
        """A host path that reaches ``path`` as seen inside the namespace."""
        return Path(f"/proc/{self._holder_pid()}/root") / path.lstrip("/")

    def install_units(
        self, paths: Iterable[Path] = (), dropins: Mapping[str, str] | None = None
    ) -> None:
        """Copy unit files into the runtime unit dir, write drop-ins (keys like
        ``"x.target.d/10-y.conf"``, relative to that dir), then daemon-reload."""
        unit_dir = self.path_inside(RUNTIME_UNIT_DIR)
        for path in paths:
            shutil.copyfile(path, unit_dir / path.name)
        for relative, text in (dropins or {}).items():
            target = unit_dir / relative
            if target.resolve().parent.parent != unit_dir.resolve():
                raise ValueError(f"drop-in {relative!r} must be <unit>.d/<name>.conf")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        self.systemctl("daemon-reload")

    def write_units(self, units: Mapping[str, str]) -> None:
        """Write unit files given as name -> text into the runtime unit dir and daemon-reload."""
        unit_dir = self.path_inside(RUNTIME_UNIT_DIR)
        for name, text in units.items():
            if "/" in name:
                raise ValueError(f"bad unit name {name!r}")
            (unit_dir / name).write_text(text)
        self.systemctl("daemon-reload")

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        check: bool = True,
        timeout: float = 60.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespace with the sandbox environment (plus ``env``)."""
        full_env = self.env | dict(env or {})
        return subprocess.run(
            self._inside(argv),
            env=full_env,
            check=check,
            timeout=timeout,
            input=input,
            capture_output=True,
            text=True,
        )

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run(["systemctl", "--user", "--no-pager", *args], check=check)

    # -- internals ------------------------------------------------------------------------
    def _holder_pid(self) -> int:
        if self._holder is None:
            raise SandboxError("sandbox not started")
        return self._holder.pid

    def _inside(self, argv: Sequence[str]) -> list[str]:
        return [
            "nsenter",
            f"--target={self._holder_pid()}",
            "--mount",
            "--",
            *self._cgroups.join_prefix(),
            *argv,
        ]

    def _pids_excluding_holder(self) -> list[int]:
        holder = self._holder.pid if self._holder is not None else -1
        return [pid for pid in self.processes() if pid != holder]

    def _start_holder(self) -> None:
        argv = [
            *self._cgroups.join_prefix(),
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "/bin/sh",
            "-c",
            _HOLDER_SCRIPT,
        ]
        self._holder = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        assert self._holder.stdout is not None
        line = self._holder.stdout.readline()  # EOF if the mount failed and the shell exited
        self._holder.stdout.close()
        if line.strip() != b"ready":
            raise SandboxError("namespace holder failed to set up /run")
        st = os.stat(f"/proc/{self._holder.pid}/ns/mnt")
        if (st.st_dev, st.st_ino) == _own_mnt_ns():
            raise SandboxError("holder is not in a private mount namespace")
        self._mnt_ns = (st.st_dev, st.st_ino)

    def _redirect_service_output(self) -> None:
        dropin = self.path_inside(f"{RUNTIME_UNIT_DIR}/service.d/50-luo-sandbox-log.conf")
        dropin.parent.mkdir(parents=True, exist_ok=True)
        dropin.write_text(
            f"[Service]\nStandardOutput=append:{self.log_dir}/%n.log\nStandardError=inherit\n"
        )

    def _redirect_bus_socket(self) -> None:
        """The user manager only connects its API to a bus that its own ``dbus.socket`` and
        ``dbus.service`` provide (it checks those units), so the sandbox's session bus is the
        stock socket-activated one, moved to ``workdir/bus`` by a drop-in."""
        with contextlib.suppress(FileNotFoundError):
            self.bus_path.unlink()
        dropin = self.path_inside(f"{RUNTIME_UNIT_DIR}/dbus.socket.d/50-luo-sandbox.conf")
        dropin.parent.mkdir(parents=True, exist_ok=True)
        dropin.write_text(
            "[Socket]\nListenStream=\n"
            f"ListenStream={self.bus_path}\n"
            "ExecStartPost=\n"
            "ExecStartPost=-/bin/systemctl --user set-environment"
            f" DBUS_SESSION_BUS_ADDRESS={self.bus_address}\n"
        )

    def _start_manager(self) -> None:
        notify_path = self.workdir / "manager.notify"
        with contextlib.suppress(FileNotFoundError):
            notify_path.unlink()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify_sock:
            notify_sock.bind(str(notify_path))
            env = self.env | {"NOTIFY_SOCKET": str(notify_path), "SYSTEMD_LOG_TARGET": "console"}
            with open(self.log_dir / "systemd.log", "ab") as log:
                self._manager = subprocess.Popen(
                    self._inside([SYSTEMD_BINARY, "--user"]),
                    env=env,
                    stdout=log,
                    stderr=log,
                    stdin=subprocess.DEVNULL,
                )
            self._await_ready(notify_sock, time.monotonic() + self.start_timeout)
        notify_path.unlink()
        self._check_manager_cgroup()
        self._await_bus_name(time.monotonic() + self.start_timeout)

    def _await_ready(self, notify_sock: socket.socket, deadline: float) -> None:
        assert self._manager is not None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._manager.poll() is not None:
                raise SandboxError(f"systemd --user did not become ready; see {self.log_dir}")
            notify_sock.settimeout(min(remaining, 0.5))  # bounded so a dead manager is noticed
            try:
                message = notify_sock.recv(4096)
            except TimeoutError:
                continue
            if b"READY=1" in message.split(b"\n"):
                return

    def _check_manager_cgroup(self) -> None:
        assert self._manager is not None
        if self._manager.pid not in self._cgroups.pids():
            raise SandboxError("systemd --user escaped the sandbox cgroup")

    def _await_bus_name(self, deadline: float) -> None:
        """The first connection socket-activates dbus.service; the manager then connects and
        takes its name asynchronously: wait for the owner."""
        argv = [
            "busctl",
            f"--address={self.bus_address}",
            "call",
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "NameHasOwner",
            "s",
            _SYSTEMD_BUS_NAME,
        ]
        while True:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
            if result.stdout.strip() == "b true":
                return
            if time.monotonic() > deadline:
                raise SandboxError(f"{_SYSTEMD_BUS_NAME} never appeared on {self.bus_address}")
            time.sleep(0.05)

    @staticmethod
    def _terminate(proc: subprocess.Popen[bytes], grace: float) -> None:
        if proc.poll() is None and grace > 0:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def _own_mnt_ns() -> tuple[int, int]:
    st = os.stat("/proc/self/ns/mnt")
    return (st.st_dev, st.st_ino)
