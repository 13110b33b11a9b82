"""systemd 262's PID 1 for the agent's unit, on an emulated machine: what the systemd reboot
strategy relies on, modelled on systemd's sources (``src/core/luo.c``, ``src/shared/luo-util.c``,
``src/core/service.c``, ``src/shutdown/shutdown.c``; each behaviour below names the function).

No systemd >= 261 runs here, so this emulates it; everything on the agent's side is the real
code (``SystemdFdStore`` over an sd_notify socket, the session backend, the emulated kernel).
``tests/vm/test_systemd262.py`` and ``tests/vm/test_plain_reboot.py`` hold the real thing to it.

* **The unit's fd store** is fed over a real notify socket (``service_add_fd_store_set``,
  ``service_add_fd_store``): ``FDSTORE=1`` + ``FDNAME=`` adds the passed fds under that name, in
  order; an fd whose open file is already in the store is dropped ("Suppressing duplicate fd",
  debug); once ``FileDescriptorStoreMax=`` is reached the fd and the rest of the message's are
  closed ("Hit fd store limit." at debug, then "Cannot store more fds than
  FileDescriptorStoreMax=..., closing remaining." at warning), and the sender is told nothing.
  ``FDSTOREREMOVE=1`` drops every entry of that name (``service_remove_fd_store``), ``BARRIER=1``
  closes the passed pipe once every earlier message is processed (sd_notify_barrier(3)).
* **kexec.target** (``kexec_target_job``, the gate's ``kexec``): the job is queued and does not
  end while units are stopped; the test then stops the agent, as PID 1 does on the way.
* **PID 1's exit and systemd-shutdown** (``shutdown``): with ``FileDescriptorStorePreserve=``
  ``yes``/``on-success`` the *whole* store is serialized (``manager_luo_serialize_fd_stores``),
  each fd classified by what ``readlink(/proc/self/fd/N)`` shows (``fd_get_luo_session_name``):
  a LUO session is recorded by its kernel name and its fd kept open to ``reboot(KEXEC)``; a
  session named ``systemd`` is skipped; anything else is preserved in PID 1's own session
  ``systemd`` at tokens 1, 2, ... (``luo_preserve_fd_stores``; a kind LUO refuses is lost), with
  the mapping JSON at token 0 (``{"version": 1, "state": {"kexecsCount": N}, "units": ...}``).
  With nothing serialized there is no ``systemd`` session at all.  If the device is busy (a
  survivor holds it) or the session cannot be created, the sessions still travel but nothing
  maps them back.  With no kexec image loaded ``reboot(KEXEC)`` fails and systemd-shutdown falls
  back to an ordinary reboot (here: a power cycle), which carries nothing.
* **The next boot's first PID 1** (``boot``, ``manager_luo_restore_fd_stores``; an initrd's
  PID 1 if there is one, the fds then cross switch-root): RETRIEVE_SESSION("systemd"), the
  mapping (a ``version`` above 1, e.g. from another systemd build, is skipped with a warning),
  each fd back into its unit's store under its original FDNAME by the rules above (a full store
  closes an incoming session, which ends it; an incoming session the kernel did not carry fails
  to come back, logged), and FINISH of ``systemd`` on every exit path (``luo_session_finishp``):
  what the mapping did not take back stays in the kernel, retrievable by name.  The unit's next
  start gets the store in ``LISTEN_FDNAMES`` order; ``AgentFdStore`` feeds that to the real
  ``SystemdFdStore.adopt`` (a test process cannot put them at fd 3 onwards, where
  ``LISTEN_FDS`` has them).

Not modelled: user managers forwarding their stores into ``user@.service``'s (the systemd
strategy needs the system manager: ``startup.py`` refuses it under a user manager).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import ctypes
import fcntl
import json
import logging
import os
import secrets
import select
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from luo_agent.errors import DeviceBusy, KernelError, NoSuchSession
from luo_agent.kernel.emulator import EmulatedMachine, EmulatedSyscalls
from luo_agent.kernel.session import LuoSession, SessionDevice
from luo_agent.systemd.fdstore import SystemdFdStore

log = logging.getLogger(__name__)

PID1_SESSION: Final = "systemd"
LUO_PROTOCOL_VERSION: Final = 1  # src/shared/luo-util.h
SESSION_LINK: Final = "anon_inode:[luo_session] "
AGENT_UNIT: Final = "luo-agent.service"
PreserveMode = Literal["no", "yes", "restart", "on-success"]


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


@dataclass
class FakeSystemd262:
    """PID 1 of the emulated ``machine``, for the agent's unit (one boot after another)."""

    machine: EmulatedMachine
    max_fds: int = 512  # FileDescriptorStoreMax=
    preserve: PreserveMode = "yes"  # FileDescriptorStorePreserve=
    # (FDNAME, fd) in the order stored: PID 1's own references.
    store: list[tuple[str, int]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # FDNAMEs the full store refused
    kexec_count: int = 0  # the mapping's kexecsCount (the manager's KExecsCount property)
    # The mapping version this PID 1 writes (another systemd build may write a newer one).
    mapping_version: int = LUO_PROTOCOL_VERSION
    kexec_jobs: list[str] = field(default_factory=list)
    kexec_queued: asyncio.Event = field(default_factory=asyncio.Event)
    # How the last shutdown ended: "kexec" or "reboot" (no image: RB_AUTOBOOT).
    last_shutdown: str = ""
    # Session names of the last boot's mapping that could not be retrieved.
    not_restored: list[str] = field(default_factory=list)
    notify_address: str = field(default_factory=lambda: f"@luo-fake-pid1-{secrets.token_hex(6)}")

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._wake_r, self._wake_w = -1, -1
        self._thread: threading.Thread | None = None
        self._listen()

    @property
    def syscalls(self) -> EmulatedSyscalls:
        return EmulatedSyscalls(self.machine.root)

    # ---- the notify socket ---------------------------------------------------------------
    def _listen(self) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.bind("\0" + self.notify_address[1:])
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._serve, name="fake-pid1", daemon=True)
        self._thread.start()

    def _unlisten(self) -> None:
        if self._thread is None:
            return
        os.write(self._wake_w, b"x")
        self._thread.join()
        self._thread = None
        assert self._sock is not None
        self._sock.close()
        _close(self._wake_r)
        _close(self._wake_w)

    def _serve(self) -> None:
        assert self._sock is not None
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if self._wake_r in ready:
                return
            fd_size = array.array("i").itemsize
            data, ancdata, _flags, _addr = self._sock.recvmsg(
                4096, socket.CMSG_SPACE(253 * fd_size)
            )
            fds = array.array("i")
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - len(payload) % fd_size])
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self._message(fields, list(fds))

    def _message(self, fields: dict[str, str], fds: list[int]) -> None:
        with self._lock:
            if fields.get("FDSTORE") == "1":
                self._add_set(fields.get("FDNAME", "stored"), fds)
                return
            if fields.get("FDSTOREREMOVE") == "1":
                name = fields.get("FDNAME", "")
                for entry in [e for e in self.store if e[0] == name]:
                    self.store.remove(entry)
                    _close(entry[1])
        for fd in fds:  # BARRIER=1's pipe; fds sent without FDSTORE=1 are closed too
            _close(fd)

    def _add_set(self, name: str, fds: list[int]) -> None:
        """service_add_fd_store_set: each fd in turn; the first that does not fit ends it and
        the remaining ones are closed too."""
        for index, fd in enumerate(fds):
            if not self._add(name, fd):
                log.warning(
                    "Cannot store more fds than FileDescriptorStoreMax=%d, closing remaining.",
                    self.max_fds,
                )
                for rest in fds[index + 1 :]:
                    self.dropped.append(name)
                    _close(rest)
                return

    def _add(self, name: str, fd: int) -> bool:
        """service_add_fd_store: False (and ``fd`` closed) if the store is full."""
        if len(self.store) >= self.max_fds:
            log.debug("Hit fd store limit.")  # -EXFULL
            self.dropped.append(name)
            _close(fd)
            return False
        if any(_same_open_file(fd, held) for _name, held in self.store):
            log.debug("Suppressing duplicate fd %d in fd store.", fd)  # same_fd(): stored once
            _close(fd)
            return True
        self.store.append((name, fd))
        return True

    def fill(self) -> tuple[int, int]:
        """``(NFileDescriptorStore, FileDescriptorStoreMax)`` of the unit."""
        with self._lock:
            return len(self.store), self.max_fds

    def stored_names(self) -> list[str]:
        with self._lock:
            return [name for name, _fd in self.store]

    def pass_fds(self) -> list[tuple[str, int]]:
        """What the unit's next start gets (LISTEN_FDS/LISTEN_FDNAMES): duplicates; PID 1 keeps
        its own until FDSTOREREMOVE=1."""
        with self._lock:
            return [(name, os.dup(fd)) for name, fd in self.store]

    # ---- kexec.target ----------------------------------------------------------------------
    async def kexec_target_job(self) -> None:
        """``StartUnit("kexec.target", "replace-irreversibly")``: queued; it ends only once
        every unit is stopped, so the caller (a unit itself) never sees it end."""
        self.kexec_jobs.append("kexec.target")
        self.kexec_queued.set()
        await asyncio.Event().wait()

    # ---- PID 1's exit and systemd-shutdown -------------------------------------------------
    def shutdown(self) -> None:
        """Every unit is stopped: serialize the store, exec systemd-shutdown, kexec."""
        self._unlisten()
        with self._lock:
            carried, self.store = self.store, []
        if self.preserve not in ("yes", "on-success"):
            # Not serialized: closed when PID 1 execs systemd-shutdown (a session so unpreserved).
            for _name, fd in carried:
                _close(fd)
            carried = []
        sc = self.syscalls
        entries: list[dict[str, Any]] = []
        for name, fd in carried:
            link = sc.fd_link(fd)
            if link.startswith(SESSION_LINK):
                session = link.removeprefix(SESSION_LINK)
                if session == PID1_SESSION:
                    log.warning("Skipping fd '%s': 'systemd' is systemd's own session", name)
                    _close(fd)
                    continue
                entries.append({"type": "luo_session", "name": name, "sessionName": session})
            else:
                entries.append({"type": "fd", "name": name, "fd": fd})
        held = [fd for _name, fd in carried if any(e.get("name") == _name for e in entries)]
        try:
            # Nothing serialized: no file for systemd-shutdown, so no `systemd` session.
            own = self._preserve_fd_stores(sc, entries) if entries else None
            if own is not None:
                held.append(own)
            try:
                sc.reboot_kexec()
                self.last_shutdown = "kexec"
            except OSError as exc:
                # "If we are still running, then the kexec can't have worked": RB_AUTOBOOT.
                log.warning("kexec failed (%s): ordinary reboot", exc)
                self.machine.poweroff()
                self.last_shutdown = "reboot"
        finally:
            for fd in held:
                _close(fd)

    def _preserve_fd_stores(
        self, sc: EmulatedSyscalls, entries: list[dict[str, Any]]
    ) -> int | None:
        """luo_preserve_fd_stores(): the ``systemd`` session, or None (then nothing is mapped;
        the session fds still travel, held open by the caller)."""
        dev = SessionDevice(sc)
        try:
            dev.open()
        except KernelError as exc:  # EBUSY included: logged, and the kexec goes ahead
            log.error("Failed to open /dev/liveupdate: %s", exc)
            return None
        with dev:
            try:
                own = dev.create_session(PID1_SESSION)
            except KernelError as exc:
                log.error("Failed to create LUO session 'systemd': %s", exc)
                return None
            mapped: list[dict[str, Any]] = []
            token = 1
            for entry in entries:
                if entry["type"] == "fd":
                    try:
                        own.preserve_fd(entry["fd"], token)
                    except KernelError as exc:
                        log.warning("Failed to preserve LUO fd '%s', will be lost: %s", entry, exc)
                        continue
                    mapped.append({"type": "fd", "name": entry["name"], "token": token})
                    token += 1
                else:
                    mapped.append(entry)
            mapping = {
                "version": self.mapping_version,
                "state": {"kexecsCount": self.kexec_count},
                "units": {AGENT_UNIT: {"fdstore": mapped}},
            }
            mapping_fd = _sealed_memfd("luo-mapping", json.dumps(mapping).encode())
            try:
                own.preserve_fd(mapping_fd, 0)
            finally:
                _close(mapping_fd)
            return own.detach()

    # ---- the next boot ---------------------------------------------------------------------
    def boot(self) -> None:
        """The new boot's PID 1, before any unit starts (manager_luo_restore_fd_stores)."""
        self.store, self.dropped, self.not_restored = [], [], []
        self.kexec_count = 0
        self.kexec_jobs.clear()
        self.kexec_queued = asyncio.Event()
        self._listen()
        dev = SessionDevice(self.syscalls)
        try:
            dev.open()
        except DeviceBusy as exc:
            log.warning("Failed to open /dev/liveupdate: %s", exc)  # restore skipped
            return
        with dev:
            try:
                own = dev.retrieve_session(PID1_SESSION)
            except NoSuchSession:
                return  # a cold boot, or a kexec without the systemd session
            with own:
                try:
                    self._restore(dev, own)
                finally:
                    own.finish()  # luo_session_finishp: on every exit path

    def _restore(self, dev: SessionDevice, own: LuoSession) -> None:
        mapping_fd = own.retrieve_fd(0)
        try:
            mapping = json.loads(os.pread(mapping_fd, 1 << 20, 0))
        finally:
            _close(mapping_fd)
        if int(mapping["version"]) > LUO_PROTOCOL_VERSION:
            log.warning(
                "LUO mapping has unsupported version %s, skipping state restoration.",
                mapping["version"],
            )
            return
        self.kexec_count = int(mapping.get("state", {}).get("kexecsCount", 0)) + 1
        for entry in mapping.get("units", {}).get(AGENT_UNIT, {}).get("fdstore", []):
            try:
                if entry["type"] == "fd":
                    fd = own.retrieve_fd(int(entry["token"]))
                else:
                    fd = dev.retrieve_session(entry["sessionName"]).detach()
            except KernelError as exc:
                log.warning("Failed to retrieve LUO %s: %s", entry, exc)
                self.not_restored.append(entry.get("sessionName", entry["name"]))
                continue
            with self._lock:
                self._add_set(entry["name"], [fd])  # manager_dispatch_external_fd_to_unit

    def close(self) -> None:
        self._unlisten()
        with self._lock:
            for _name, fd in self.store:
                _close(fd)
            self.store = []


class AgentFdStore(SystemdFdStore):
    """The agent's real ``SystemdFdStore``, talking to ``pid1``'s notify socket; only what a
    start is passed comes from ``pid1.pass_fds()`` instead of fds 3, 4, ... (LISTEN_FDS)."""

    def __init__(self, pid1: FakeSystemd262, runtime_directory: Path) -> None:
        super().__init__(
            env={"NOTIFY_SOCKET": pid1.notify_address}, runtime_directory=runtime_directory
        )
        self._pid1 = pid1
        self._started = False

    def inherited(self) -> dict[str, int]:
        if self._started:
            return {}
        self._started = True
        return self.adopt(self._pid1.pass_fds())


_KCMP_FILE: Final = 0
_SYS_KCMP: Final = 312  # x86_64
_libc = ctypes.CDLL(None, use_errno=True)


def _same_open_file(a: int, b: int) -> bool:
    """same_fd(): both fds refer to one open file description (kcmp(KCMP_FILE))."""
    pid = os.getpid()
    order = int(_libc.syscall(_SYS_KCMP, pid, pid, _KCMP_FILE, a, b))
    if order < 0:
        raise OSError(ctypes.get_errno(), "kcmp(KCMP_FILE)")
    return order == 0


def _sealed_memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    seals = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd
