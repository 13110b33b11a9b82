"""Custody of the agent's incoming session fds in the service's systemd fd store.

On the session ABI, closing an incoming session is an implicit FINISH: the kernel discards every
file not yet retrieved.  An agent killed after a live-update boot would lose its participants'
data with it, so each incoming session fd is also pushed to the fd store (``FDSTORE=1``,
``FileDescriptorStoreMax=`` in the unit).  systemd keeps the store across an automatic restart and
passes the fds back (``LISTEN_FDS``/``LISTEN_FDNAMES``); the restarted agent adopts them instead of
RETRIEVE_SESSION, which the kernel refuses for a session that is still open.  Once a session is
finished it is removed from the store (``FDSTOREREMOVE=1``).

The systemd reboot strategy also pushes every *outgoing* session fd (``luo-out-<hex>``) before it
starts ``kexec.target``: systemd >= 261 with ``FileDescriptorStorePreserve=yes`` carries the store
through the kexec (PID 1 serializes it, systemd-shutdown keeps session fds open to
``reboot(KEXEC)``, the next boot's PID 1 retrieves each session by its kernel name and puts the
fd back under the same FDNAME), so they come back as *incoming* sessions named ``luo-out-<hex>``.
``FDSTORE=1`` is not acknowledged and a full store drops the fd silently, so ``sync()`` waits
for PID 1 with ``BARRIER=1`` before the agent counts the store (docs/architecture.md, "systemd
262 and /dev/liveupdate").

fd names allow only a restricted character set (no ``:``), so the session name is hex-encoded.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import MutableMapping, Sequence
from pathlib import Path
from typing import Final

import structlog

from . import notify

log = structlog.get_logger(__name__)

SD_LISTEN_FDS_START: Final = 3
NAME_PREFIX: Final = "luo-in-"
OUTGOING_PREFIX: Final = "luo-out-"
OUTGOING_MARKER: Final = "outgoing-in-fd-store"
# sd_notify_barrier(3)'s default: PID 1 answers within milliseconds unless it is wedged.
BARRIER_TIMEOUT_SECONDS: Final = 5.0


def fd_name(session: str, prefix: str = NAME_PREFIX) -> str:
    return prefix + session.encode().hex()


def session_of(name: str) -> str | None:
    """The session an fd store name stands for: ``luo-in-`` (kept incoming) or ``luo-out-``
    (carried through a kexec by PID 1, incoming now)."""
    for prefix in (NAME_PREFIX, OUTGOING_PREFIX):
        if name.startswith(prefix):
            try:
                return bytes.fromhex(name.removeprefix(prefix)).decode()
            except (ValueError, UnicodeDecodeError):
                return None
    return None


def listen_fds(env: MutableMapping[str, str]) -> list[tuple[str, int]]:
    """The fds systemd passed (sd_listen_fds_with_names(3) with unset_environment=1)."""
    try:
        pid = int(env.get("LISTEN_PID", ""))
        count = int(env.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    names = env.get("LISTEN_FDNAMES", "").split(":")
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(key, None)
    if pid != os.getpid() or count <= 0:
        return []
    fds = []
    for index in range(count):
        fd = SD_LISTEN_FDS_START + index
        name = names[index] if index < len(names) else "unknown"
        with contextlib.suppress(OSError):
            os.set_inheritable(fd, False)
            fds.append((name, fd))
    return fds


class SystemdFdStore:
    """``FdCustody`` over the service's fd store (a no-op outside systemd)."""

    def __init__(
        self,
        env: MutableMapping[str, str] | None = None,
        runtime_directory: Path | None = None,
    ) -> None:
        self._env = os.environ if env is None else env
        self._consumed = False
        # Written when outgoing sessions go into the store for a systemd kexec.  It lives on the
        # runtime tmpfs, which no reboot survives: found at start, it means the kexec never
        # happened and the luo-out- fds are still this boot's outgoing sessions.
        self._marker = runtime_directory / OUTGOING_MARKER if runtime_directory else None

    def inherited(self) -> dict[str, int]:
        """Session name → fd handed back by systemd; only the first call returns them."""
        if self._consumed:
            return {}
        self._consumed = True
        return self.adopt(listen_fds(self._env))

    def adopt(self, passed: Sequence[tuple[str, int]]) -> dict[str, int]:
        """Session name → fd of what systemd passed (``LISTEN_FDNAMES`` order); anything that
        is no session of ours is closed."""
        sessions: dict[str, int] = {}
        same_boot = self._marker is not None and self._marker.exists()
        for name, fd in passed:
            if same_boot and name.startswith(OUTGOING_PREFIX):
                # Still outgoing: the kexec PID 1 accepted never happened.  Closing the last
                # reference unpreserves the session: the update is cancelled, not half-restored.
                log.warning("fd_store_stale_outgoing", name=name)
                notify.notify(env=self._env, FDSTOREREMOVE=1, FDNAME=name)
                os.close(fd)
                continue
            session = session_of(name)
            if session is None or session in sessions:
                log.warning("fd_store_unknown_fd", name=name, fd=fd)
                os.close(fd)
                continue
            sessions[session] = fd
        if sessions:
            log.info("fd_store_adopted", sessions=sorted(sessions))
        self._clear_marker()
        return sessions

    def _clear_marker(self) -> None:
        if self._marker is not None:
            with contextlib.suppress(FileNotFoundError):
                self._marker.unlink()

    def keep(self, name: str, fd: int) -> None:
        try:
            notify.store_fds(fd_name(name), [fd], env=self._env)
        except OSError as exc:
            # Without the store the session is still held; only a crash would lose it.
            log.warning("fd_store_failed", session=name, error=str(exc))

    def drop(self, name: str) -> None:
        # After a systemd kexec the session came back under its outgoing name.
        for prefix in (NAME_PREFIX, OUTGOING_PREFIX):
            with contextlib.suppress(OSError):
                notify.notify(env=self._env, FDSTOREREMOVE=1, FDNAME=fd_name(name, prefix))

    def keep_outgoing(self, name: str, fd: int) -> None:
        # Not best effort: a session missing from the store is lost at the kexec.  FDSTORE=1 is
        # not acknowledged: the hand-over counts the store after sync() (kexec_handover.py).
        if self._marker is not None:
            self._marker.parent.mkdir(parents=True, exist_ok=True)
            self._marker.touch()
        if not notify.store_fds(fd_name(name, OUTGOING_PREFIX), [fd], env=self._env):
            raise OSError(errno.EOPNOTSUPP, "not run by systemd: no fd store (NOTIFY_SOCKET)")
        log.info("fd_store_outgoing", session=name)

    def sync(self) -> None:
        if not notify.barrier(BARRIER_TIMEOUT_SECONDS, env=self._env):
            raise OSError(errno.EOPNOTSUPP, "not run by systemd: no fd store (NOTIFY_SOCKET)")

    def drop_outgoing(self, name: str) -> None:
        # PID 1 refused the kexec: the agent holds its outgoing sessions itself again.
        self._clear_marker()
        with contextlib.suppress(OSError):
            notify.notify(env=self._env, FDSTOREREMOVE=1, FDNAME=fd_name(name, OUTGOING_PREFIX))
