"""G5 (Linux 6.19, profile "6.19") and G6 (profile "g6"): the session ABI (kernel-abi.md §7, §9).

No global state.  ``/dev/liveupdate`` creates outgoing and retrieves incoming named sessions;
session fds preserve, retrieve and finish.  Every kexec carries every open outgoing session.

The g6 profile is a copy of Linux 7.2 (kernel/liveupdate/luo_session.c, luo_file.c,
mm/memfd_luo.c); docs/emulator.md lists each behaviour with its source line.
"""

from __future__ import annotations

import errno
import itertools
import logging
import mmap
import struct
from dataclasses import dataclass, field
from typing import Any, Final

from luo_agent.errors import HandoverCorrupt
from luo_agent.kernel.device import Abi
from luo_agent.kernel.uapi import IoctlOp
from luo_agent.kernel.uapi import session as uapi

from . import memfd
from .base import DeviceOpen, GenerationKernel, Host
from .dispatch import Errno, IoctlResult, dispatch_sized, op_names
from .handover import BlobSink, CarriedFile, Image, parse_files

log = logging.getLogger("luo_emu.session")

PROFILES: Final = ("6.19", "g6")
# 6.19's fixed serialization areas (kernel-abi.md §7.2/§7.3); G6 grows them on demand.
MAX_OUTGOING_SESSIONS_619: Final = 744
MAX_FILES_PER_SESSION_619: Final = 128
NAME_LEN: Final = uapi.LIVEUPDATE_SESSION_NAME_LENGTH
# 7.2 grows KHO serialization blocks (one page each, 16-byte header) on demand, at most
# KHO_MAX_BLOCKS = 10000 per block set (kho_block.c:38, kho_block_add): ENOSPC beyond.
_KHO_MAX_BLOCKS: Final = 10000
_KHO_BLOCK_ENTRIES: Final = mmap.PAGESIZE - 16
MAX_OUTGOING_SESSIONS_G6: Final = _KHO_MAX_BLOCKS * (_KHO_BLOCK_ENTRIES // 80)  # luo_session_ser
MAX_FILES_PER_SESSION_G6: Final = _KHO_MAX_BLOCKS * (_KHO_BLOCK_ENTRIES // 64)  # luo_file_ser


@dataclass(eq=False, slots=True)
class Session:
    name: bytes
    outgoing: bool
    seq: int
    files: dict[int, memfd.PreservedFile] = field(default_factory=dict)
    open: bool = False  # a session socket exists (outgoing: always; incoming: retrieved)
    finished: bool = False

    def display_name(self) -> str:
        return self.name.decode("utf-8", "backslashreplace")

    def drop_files(self) -> None:
        for pf in self.files.values():
            pf.close()
        self.files.clear()

    def snapshot(self) -> dict[str, Any]:
        return {
            "name": self.display_name(),
            "name_hex": self.name.hex(),
            "open": self.open,
            "retrieved": self.open and not self.outgoing,
            "finished": self.finished,
            "tokens": list(self.files),
            "files": [pf.snapshot() for pf in self.files.values()],
        }


def _strscpy_name(raw: bytes) -> bytes:
    """``strscpy(session->name, argp->name, 64)``: up to the first NUL, at most 63 bytes."""
    return raw[:NAME_LEN].split(b"\0", 1)[0][: NAME_LEN - 1]


def _strncmp_matches(stored: bytes, raw: bytes) -> bool:
    """7.2 ``strncmp(it->name, name, 64) == 0`` (luo_session.c:513): an unterminated 64-byte
    name never equals a stored name (at most 63 bytes and a NUL)."""
    field = raw[:NAME_LEN]
    return b"\0" in field and field.split(b"\0", 1)[0] == stored


class SessionKernel(GenerationKernel):
    generation = Abi.SESSION

    def __init__(self, host: Host, profile: str | None) -> None:
        super().__init__(host, profile or "6.19")
        if self.profile not in PROFILES:
            raise ValueError(f"unknown session profile {self.profile!r} (want one of {PROFILES})")
        self.g6 = self.profile == "g6"
        self.session_ops = uapi.SESSION_OPS_G6 if self.g6 else uapi.SESSION_OPS_G5
        self.outgoing: list[Session] = []  # creation order = serialization order
        self.incoming: list[Session] = []
        self.holder: DeviceOpen | None = None
        self.handover_failed = False  # deserialization failed: every open is EIO
        self._seq = itertools.count()

    # --- device -------------------------------------------------------------------------------
    def open_device(self, flags: int) -> DeviceOpen:
        self.faults.check("open")
        if self.holder is not None and not self.host.reap_if_closed(self.holder):
            raise Errno(errno.EBUSY, "/dev/liveupdate is already open")
        if self.handover_failed:
            raise Errno(errno.EIO, "incoming sessions failed to deserialize")
        self.holder = DeviceOpen(flags)
        return self.holder

    def release_device(self, dev: DeviceOpen) -> None:
        # Only clears the in-use flag: sessions live on as their own fds.
        if dev is self.holder:
            self.holder = None

    def device_ioctl(self, dev: DeviceOpen, pid: int, request: int, ubuf: bytes) -> IoctlResult:
        return dispatch_sized(
            uapi.DEVICE_OPS,
            uapi.LIVEUPDATE_CMD_BASE,
            request,
            ubuf,
            lambda op, kbuf: self._device_execute(op, kbuf, pid),
            faults=self.faults,
        )

    def _need_free_fd(self, pid: int) -> None:
        """7.2 takes the new fd first (get_unused_fd_flags, luo_core.c:276, 306;
        luo_session.c:289): EMFILE before any other check of the op."""
        if self.g6 and not memfd.caller_has_free_fd(pid):
            raise Errno(errno.EMFILE, "no free fd in the caller")

    def _device_execute(self, op: IoctlOp, kbuf: bytearray, pid: int) -> IoctlResult:
        self._need_free_fd(pid)
        raw_name = bytes(kbuf[8 : 8 + NAME_LEN])
        if op.name == "CREATE_SESSION":
            session = self._create(raw_name)
        else:
            session = self._retrieve(raw_name)
        fd = self.host.open_session_channel(session)
        session.open = True
        struct.pack_into("<i", kbuf, 4, -1)
        return IoctlResult(fd=fd, fd_offset=4, close_after_send=True)

    def _create(self, raw_name: bytes) -> Session:
        if self.g6 and (raw_name[0] == 0 or b"\0" not in raw_name):
            # luo_session_create (luo_session.c:469-474): strnlen 0 or 64.
            raise Errno(errno.EINVAL, "empty or unterminated session name")
        name = _strscpy_name(raw_name)
        limit = MAX_OUTGOING_SESSIONS_G6 if self.g6 else MAX_OUTGOING_SESSIONS_619
        if len(self.outgoing) >= limit:
            self._reap_outgoing()
            if len(self.outgoing) >= limit:
                # 6.19: fixed array; 7.2: kho_block_set_grow before the EEXIST loop.
                code = errno.ENOSPC if self.g6 else errno.ENOMEM
                raise Errno(code, "outgoing session table full")
        for other in self.outgoing:
            if other.name == name and not self.host.reap_if_closed(other):
                raise Errno(errno.EEXIST, f"outgoing session {other.display_name()!r} exists")
        session = Session(name=name, outgoing=True, seq=next(self._seq))
        self.outgoing.append(session)
        log.info("created outgoing session %r", session.display_name())
        return session

    def _reap_outgoing(self) -> None:
        for session in list(self.outgoing):
            self.host.reap_if_closed(session)

    def _retrieve(self, raw_name: bytes) -> Session:
        name = _strscpy_name(raw_name)
        for session in self.incoming:
            if _strncmp_matches(session.name, raw_name) if self.g6 else session.name == name:
                if session.open and not self.host.reap_if_closed(session):
                    raise Errno(errno.EINVAL, f"session {session.display_name()!r} is open")
                if session in self.incoming:
                    log.info("retrieved incoming session %r", session.display_name())
                    return session
                break
        raise Errno(errno.ENOENT, "no such incoming session")

    # --- session fds ------------------------------------------------------------------------
    def session_ioctl(self, session: object, pid: int, request: int, ubuf: bytes) -> IoctlResult:
        assert isinstance(session, Session)

        def kind_check(op: IoctlOp) -> None:
            # G6 stable fix: PRESERVE_FD only on outgoing, RETRIEVE_FD/FINISH only on incoming.
            if op.name == "PRESERVE_FD" and not session.outgoing:
                raise Errno(errno.EINVAL, "PRESERVE_FD on an incoming session")
            if op.name in ("RETRIEVE_FD", "FINISH") and session.outgoing:
                raise Errno(errno.EINVAL, f"{op.name} on an outgoing session")

        def execute(op: IoctlOp, kbuf: bytearray) -> IoctlResult:
            if not self.g6:
                # 6.19 has no such check: wrong-kind use reaches the file handlers and WARNs.
                # kernel-abi.md §7.3 asks the emulator for the fixed behaviour (EINVAL); on 6.19
                # it comes after the size checks, where the handler would have failed.
                kind_check(op)
            return self._session_execute(session, op, kbuf, pid)

        return dispatch_sized(
            self.session_ops,
            uapi.LIVEUPDATE_CMD_SESSION_BASE,
            request,
            ubuf,
            execute,
            kind_check=kind_check if self.g6 else None,
            faults=self.faults,
        )

    def _session_execute(
        self, session: Session, op: IoctlOp, kbuf: bytearray, pid: int
    ) -> IoctlResult:
        match op.name:
            case "PRESERVE_FD":
                _size, fd, token = struct.unpack_from("<IiQ", kbuf)
                self._preserve(session, pid, fd, token)
                return IoctlResult()
            case "RETRIEVE_FD":
                self._need_free_fd(pid)
                (token,) = struct.unpack_from("<Q", kbuf, 8)
                pf = session.files.get(token)
                if pf is None:
                    raise Errno(errno.ENOENT, f"token {token:#x} not in session")
                pf.retrieved = True  # idempotent: the same open file again
                struct.pack_into("<i", kbuf, 4, -1)
                return IoctlResult(fd=pf.fd, fd_offset=4)
            case "FINISH":
                (reserved,) = struct.unpack_from("<I", kbuf, 4)
                if self.g6 and reserved != 0:  # luo_session_finish (luo_session.c:321)
                    raise Errno(errno.EINVAL, "reserved must be 0")
                self._finish(session)
                return IoctlResult()
            case "GET_NAME":
                # luo_session_get_name (luo_session.c:331-342): strscpy over the caller's bytes.
                # On x86-64 it copies whole words (CONFIG_DCACHE_WORD_ACCESS, lib/string.c:131-143):
                # the word holding the NUL is written with zeros after it; the rest of the field
                # is copied back as it came.  Found by the VM's differential vectors.
                (reserved,) = struct.unpack_from("<I", kbuf, 4)
                if reserved != 0:
                    raise Errno(errno.EINVAL, "reserved must be 0")
                written = min(NAME_LEN, (len(session.name) // 8 + 1) * 8)
                kbuf[8 : 8 + written] = (session.name + b"\0").ljust(written, b"\0")
                return IoctlResult()
            case _:
                raise AssertionError(op.name)

    def _preserve(self, session: Session, pid: int, fd: int, token: int) -> None:
        """``luo_preserve_file`` check order: EEXIST, ENOSPC, EBADF, ENOENT, (G6) EBUSY."""
        if token in session.files:
            raise Errno(errno.EEXIST, f"token {token:#x} already in session")
        limit = MAX_FILES_PER_SESSION_G6 if self.g6 else MAX_FILES_PER_SESSION_619
        if len(session.files) >= limit:
            raise Errno(errno.ENOSPC, "session file table full")
        pf = memfd.preserve(pid, fd, token)
        if self.g6 and self._already_preserved(session, pf.identity):
            pf.close()
            raise Errno(errno.EBUSY, "file is already preserved")
        session.files[token] = pf

    def _already_preserved(self, session: Session, identity: tuple[int, int]) -> bool:
        """7.2's ``luo_preserved_files`` xarray, keyed by inode (memfd_luo_get_id): every file of
        an open outgoing session, and every *retrieved* file of an incoming session until its
        FINISH (luo_retrieve_file xa_insert, luo_file_finish xa_erase)."""
        for other in [*self.outgoing, *self.incoming]:
            files = other.files.values()
            if other.outgoing:
                clash = any(f.identity == identity for f in files)
            else:
                clash = any(f.retrieved and f.identity == identity for f in files)
            if clash and (other is session or not self.host.reap_if_closed(other)):
                return True
        return False

    def _finish(self, session: Session) -> None:
        if not session.finished:
            discarded = [pf.token for pf in session.files.values() if not pf.retrieved]
            if discarded:
                log.info(
                    "finish %r: discarding unretrieved tokens %s",
                    session.display_name(),
                    [hex(t) for t in discarded],
                )
            session.drop_files()
            session.finished = True

    def release_session(self, session: object) -> None:
        assert isinstance(session, Session)
        session.open = False
        if session.outgoing:
            # close of an outgoing session = unpreserve everything and remove it (cancel).
            session.drop_files()
            self.outgoing.remove(session)
            log.info("closed outgoing session %r", session.display_name())
        else:
            self._finish(session)  # implicit FINISH, then the session is gone
            self.incoming.remove(session)
            log.info("closed incoming session %r", session.display_name())

    # --- kexec --------------------------------------------------------------------------------
    def carries_luo_data(self) -> bool:
        return True  # any kexec is a live update on a LUO-enabled 6.19

    def serialize(self, sink: BlobSink) -> Any:
        sessions = []
        for session in self.outgoing:
            files = []
            for pf in session.files.values():
                seals = pf.seals if self.g6 else 0  # 6.19: seals not carried (unchanged)
                files.append(memfd.carry(pf, sink, seals).to_json())
            sessions.append({"name": session.name.hex(), "files": files})
        skipped = [s.display_name() for s in self.incoming if not s.open]
        if skipped:
            log.info("kexec: never-retrieved incoming sessions are not carried: %s", skipped)
        log.info("kexec: carrying %d outgoing sessions", len(sessions))
        return {"sessions": sessions}

    def validate_handover(self, luo: Any, image: Image) -> object:
        if not isinstance(luo, dict) or not isinstance(luo.get("sessions"), list):
            raise HandoverCorrupt("handover image rejected: no session list")
        parsed: list[tuple[bytes, list[CarriedFile]]] = []
        seen: set[bytes] = set()
        for index, raw in enumerate(luo["sessions"]):
            where = f"sessions[{index}]"
            if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
                raise HandoverCorrupt(f"handover image rejected: {where}: bad session")
            try:
                name = bytes.fromhex(raw["name"])
            except ValueError as exc:
                raise HandoverCorrupt(f"handover image rejected: {where}: bad name") from exc
            if len(name) >= NAME_LEN or b"\0" in name or name in seen:
                raise HandoverCorrupt(f"handover image rejected: {where}: bad or duplicate name")
            seen.add(name)
            files = parse_files(raw.get("files"), image, f"{where}.files")
            if len({f.token for f in files}) != len(files):
                raise HandoverCorrupt(f"handover image rejected: {where}: duplicate tokens")
            parsed.append((name, files))
        return parsed

    def load_handover(self, parsed: object, image: Image) -> None:
        assert isinstance(parsed, list)
        sessions: list[Session] = []
        try:
            for name, files in parsed:
                session = Session(name=name, outgoing=False, seq=next(self._seq))
                sessions.append(session)
                for cf in files:
                    fd = memfd.incoming_memfd(image, cf)
                    session.files[cf.token] = memfd.PreservedFile(
                        cf.token, fd, cf.size, identity=memfd.file_identity(fd)
                    )
        except BaseException:
            for session in sessions:
                session.drop_files()
            raise
        self.incoming = sessions
        log.info("live-update boot: %d incoming sessions", len(sessions))

    def fault_names(self) -> set[str]:
        return {*op_names(uapi.DEVICE_OPS), *op_names(self.session_ops)}

    def inspect(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "device_open": self.holder is not None,
            "handover_failed": self.handover_failed,
            "outgoing_sessions": [s.snapshot() for s in self.outgoing],
            "incoming_sessions": [s.snapshot() for s in self.incoming],
        }

    def shutdown(self) -> None:
        for session in [*self.outgoing, *self.incoming]:
            session.drop_files()
