"""Custody: the fds handed to the agent, the kernel image it loaded for kexec, the kernel's steps
(preserve and prepare, freeze, cancel, finish), the kexec itself, and the fds handed back after
it.  Every kernel call runs on the kernel thread; each step returns the engine's event."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import structlog

from .. import phase as ph
from ..config import Config
from ..errors import InvalidArgument, KernelError, LuoError, PhaseError, Unsupported
from ..fdkind import close_fds
from ..kernel.backend import PreserveItem
from ..kexec_handover import hand_over_to_pid1, missing_kexec_image
from ..records import PreservedFd, UpdateRecord
from ..registry import FdRegistry
from ..systemd.gate import Gate
from .state import (
    CMDLINE_MARKER,
    AgentState,
    KernelThread,
    RebootStrategy,
    enables_liveupdate,
    with_marker,
)

log = structlog.get_logger("luo_agent.agent")

PRESERVED_PHASES = (
    ph.Phase.PREPARED,
    ph.Phase.COORDINATING,
    ph.Phase.FREEZING,
    ph.Phase.REBOOTING,
)


@dataclass(frozen=True, slots=True)
class LoadedKernel:
    """The agent's duplicates of the kexec image fds, and the command line without our marker."""

    kernel_fd: int
    initrd_fd: int
    base_cmdline: str


@dataclass(frozen=True, slots=True)
class CheckReport:
    ready: bool
    blockers: tuple[str, ...]
    warnings: tuple[str, ...]
    abi: str
    phase: str
    kernel_loaded: bool
    preserved: int


class Custody:
    def __init__(
        self, state: AgentState, kernel_thread: KernelThread, registry: FdRegistry, config: Config
    ) -> None:
        self._state = state
        self._kernel_thread = kernel_thread
        self.registry = registry
        self._config = config
        self.strategy = RebootStrategy()
        self.kernel_loaded = False
        self.kernel_cmdline = ""
        self._kexec: LoadedKernel | None = None
        # Whether the agent's image is in the kernel now: only while an update is prepared (an
        # image loaded while idle would turn an operator's plain `systemctl reboot` into a kexec,
        # logind's auto-kexec, under a marker that claims an update that does not exist).
        self.image_in_kernel = False
        self._retrieved: dict[tuple[str, int], str] = {}
        # The agent's own copy of every fd handed out after the reboot, until the update ends: a
        # Retrieve again (a participant that died after its first one) gets a duplicate of it,
        # since rfc-v2 and v3 restore a token only once.
        self._held: dict[tuple[str, int], int] = {}
        self._preserved: tuple[PreservedFd, ...] = ()  # the kernel's tokens, until prepared

    @property
    def abi(self) -> str:
        return str(self._state.kernel.abi) if self._state.kernel is not None else "none"

    def _require(self, request: ph.Request, what: str) -> None:
        if request not in ph.SPECS[self._state.phase].allows:
            raise PhaseError(self._state.phase, what)

    # ----------------------------------------------------------------- what callers hand in

    async def load_kernel(self, kernel_fd: int, initrd_fd: int, cmdline: str) -> str:
        """kexec_file_load with the agent's command-line marker (``luo_agent.update=<id>``)
        appended.  Returns the command line the new kernel will see.  The agent keeps its own
        duplicates of the fds.  Without a prepared update the image is only checked (loaded and
        unloaded again): prepare loads it with the update's marker (outside the blackout)."""
        self._require(ph.Request.LOAD_KERNEL, "LoadKernel")
        kernel = self._state.opened_kernel()
        if len(cmdline) > 4096 or "\0" in cmdline:
            raise InvalidArgument("the command line must be under 4096 bytes without NUL")
        base = " ".join(w for w in cmdline.split() if not w.startswith(CMDLINE_MARKER))
        own = (os.dup(kernel_fd), os.dup(initrd_fd) if initrd_fd >= 0 else -1)

        def load() -> str:
            # On the kernel thread, like the reload in preserve_registered: the loads and the
            # record of what is loaded keep one order, whatever the loop does meanwhile.
            full = with_marker(base, self._state.update_id or "pending")
            kernel.load_kernel(own[0], own[1], full)
            keep = self._state.phase in (
                ph.Phase.PREPARING,
                ph.Phase.PREPARED,
                ph.Phase.COORDINATING,
            )
            if not keep:
                kernel.unload_kernel()
            self.image_in_kernel = keep
            previous, self._kexec = self._kexec, LoadedKernel(own[0], own[1], base)
            self.kernel_cmdline = full
            self.kernel_loaded = True
            if previous is not None:
                close_fds(previous.kernel_fd, previous.initrd_fd)
            return full

        try:
            return await self._kernel_thread.call(load)
        except OSError as exc:
            close_fds(*own)
            # kexec_file_load refused the image (EPERM, ENOEXEC, EBADF): the caller's answer.
            raise KernelError("kexec_file_load", exc.errno or errno.EIO) from None
        except BaseException:
            close_fds(*own)
            raise

    def preserve(
        self, fd: int, session: str, token: int, depends_on: Sequence[tuple[str, int]], owner: str
    ) -> None:
        """Hand an fd in: checked now, preserved in the kernel during prepare.  The agent takes
        its own duplicate; the caller keeps (and closes) its fd."""
        self._require(ph.Request.PRESERVE, "Preserve (fds are handed in while idle or preparing)")
        sessions = self.registry.sessions()
        if session not in sessions and len(sessions) >= self._config.limits.max_sessions:
            raise InvalidArgument(f"too many sessions ({self._config.limits.max_sessions})")
        own = os.dup(fd)
        try:
            self.registry.add(session, token, own, owner=owner, depends_on=tuple(depends_on))
        except BaseException:
            os.close(own)
            raise

    def unpreserve(self, session: str, token: int) -> None:
        self._require(ph.Request.PRESERVE, "Unpreserve")
        self.registry.remove(session, token)

    async def retrieve(self, session: str, token: int, caller: str = "") -> int:
        self._require(ph.Request.RETRIEVE, "Retrieve (only after a live-update boot)")
        kernel = self._state.opened_kernel()
        key = (session, token)
        held = self._held.get(key)
        if held is None:
            held = self._held[key] = await self._kernel_thread.call(kernel.retrieve, session, token)
        self._retrieved[key] = caller
        log.info("fd_retrieved", session=session, token=token, caller=caller)
        return os.dup(held)

    def release_all(self) -> None:
        """The update is over: let go of every fd handed in and every copy held."""
        self.registry.close_all()
        close_fds(*self._held.values())
        self._held.clear()
        self._retrieved.clear()

    def close(self) -> None:
        self.release_all()
        if self._kexec is not None:
            close_fds(self._kexec.kernel_fd, self._kexec.initrd_fd)

    # ------------------------------------------------------------------------ what is shown

    def sessions(self) -> list[tuple[str, int, str, str]]:
        """(session, token, owner, state) of every fd the agent knows in this boot."""
        record = self._state.record
        if self._state.phase in ph.POST_REBOOT_PHASES and record is not None:
            return [
                (p.session, p.token, p.owner, self._carried_state(p.session, p.token))
                for p in record.preserved
            ]
        state = "preserved" if self._state.phase in PRESERVED_PHASES else "registered"
        return [(e.session, e.token, e.owner, state) for e in self.registry]

    def _carried_state(self, session: str, token: int) -> str:
        return "retrieved" if (session, token) in self._retrieved else "carried"

    def owner_of(self, session: str, token: int) -> str:
        if self._state.record is not None:
            for p in self._state.record.preserved:
                if (p.session, p.token) == (session, token):
                    return p.owner
        return ""

    def check(self, fd_store: tuple[int, int] | None = None) -> CheckReport:
        """What stands in the way of an update now; ``fd_store`` is the agent's unit's
        ``(NFileDescriptorStore, FileDescriptorStoreMax)`` under the systemd strategy."""
        phase, kernel = self._state.phase, self._state.kernel
        blockers: list[str] = []
        if kernel is None:
            blockers.append("no LUO kernel interface")
        if phase is not ph.Phase.IDLE:
            blockers.append(f"an update is in phase {phase}")
        if not self.kernel_loaded:
            blockers.append("no kernel loaded for kexec (LoadKernel)")
        if self.strategy.blocker:
            blockers.append(self.strategy.blocker)
        gone = missing_kexec_image(kernel) if self.strategy.chosen == "systemd" else ""
        if gone and self.image_in_kernel:
            blockers.append(gone)
        if fd_store is not None and (short := self._fd_store_short(*fd_store)):
            blockers.append(short)
        warnings = [self.strategy.warning] if self.strategy.warning else []
        if self.kernel_loaded and not enables_liveupdate(self.kernel_cmdline):
            warnings.append(
                "the loaded kernel's command line has no liveupdate=1: LUO (and so restore) "
                "would be disabled after the kexec unless the kernel enables it by default"
            )
        return CheckReport(
            ready=not blockers,
            blockers=tuple(blockers),
            warnings=tuple(warnings),
            abi=self.abi,
            phase=str(phase),
            kernel_loaded=self.kernel_loaded,
            preserved=len(self.registry),
        )

    def _fd_store_short(self, stored: int, room: int) -> str:
        """Why the fd store cannot carry the update's sessions ("" if it can).  A full store
        drops an fd with only a warning in PID 1's log; for a session that closes it, and the
        kernel ends it (service.c, service_add_fd_store)."""
        pushed = len(self.registry.sessions()) + 1  # one per client session, and the agent's own
        if stored + pushed <= room:
            return ""
        return (
            f"the agent's fd store would need {stored + pushed} fds ({stored} held, {pushed} "
            f"sessions to hand to PID 1 for the kexec) but FileDescriptorStoreMax={room}: PID 1 "
            "drops what does not fit, which ends those sessions; raise FileDescriptorStoreMax= "
            "(in this boot and the next)"
        )

    def refuse_execute(self) -> None:
        """Raise why Execute cannot start now (before the freeze gate: nothing is frozen, the
        update stays as it is)."""
        phase = self._state.phase
        if not self.kernel_loaded and phase is ph.Phase.PREPARED:
            raise PhaseError(phase, "Execute without a loaded kernel (LoadKernel first)")
        if self.strategy.blocker:
            raise Unsupported("Execute", errno.EOPNOTSUPP, self.strategy.blocker)
        if self.strategy.chosen == "systemd" and (gone := missing_kexec_image(self._state.kernel)):
            raise PhaseError(phase, f"Execute while {gone}")

    # ------------------------------------------------------------------------- kernel steps

    async def preserve_registered(self) -> ph.Event | None:
        """Every handed-in fd into the kernel, dependencies first, with the agent's metadata
        memfd (after reloading the kexec image with the update's marker if needed)."""
        kernel = self._state.opened_kernel()
        record = self._state.record
        assert record is not None
        entries = self.registry.preservation_order()

        def in_kernel() -> None:
            # What is loaded is read here, after any LoadKernel queued before (load_kernel).
            loaded = self._kexec
            marked = with_marker(loaded.base_cmdline if loaded else "", record.id)
            if loaded is not None and not (self.image_in_kernel and self.kernel_cmdline == marked):
                kernel.load_kernel(loaded.kernel_fd, loaded.initrd_fd, marked)
                self.kernel_cmdline = marked
                self.image_in_kernel = True
            items = [PreserveItem(e.session, e.token, e.fd) for e in entries]
            tokens = kernel.preserve(items, record)
            self._preserved = tuple(
                PreservedFd(e.session, e.token, e.owner, tokens[(e.session, e.token)], e.depends_on)
                for e in entries
            )

        return await self._step(in_kernel, None, ph.PreparationFailed)

    async def preserve_metadata(self) -> ph.Event | None:
        """Every kernel token is known now (rfc-v2 makes its own): rewrite the metadata."""
        assert self._state.record is not None
        record = replace(self._state.record, preserved=self._preserved)
        kernel = self._state.opened_kernel()
        return await self._step(lambda: kernel.update_metadata(record), None, ph.PreparationFailed)

    async def prepare(self) -> ph.Event | None:
        kernel = self._state.opened_kernel()
        failed = await self._step(kernel.prepare, None, ph.PreparationFailed)
        if failed is None and self._state.record is not None:
            self._state.record = replace(
                self._state.record, preserved=self._preserved, kernel_cmdline=self.kernel_cmdline
            )
        return failed or ph.PreparationDone()

    async def freeze(self) -> ph.Event | None:
        return await self._step(
            self._state.opened_kernel().freeze, ph.FreezeDone(), ph.FreezeFailed
        )

    async def finish(self) -> ph.Event | None:
        return await self._step(self._finish_kernel, ph.FinishDone(), ph.FinishFailed)

    def _finish_kernel(self) -> None:
        problems = self._state.opened_kernel().finish()
        if problems:
            raise KernelError("finish", errno.EBUSY, "; ".join(problems))

    async def _step(
        self, fn: Callable[[], object], ok: ph.Event | None, failed: Callable[[str], ph.Event]
    ) -> ph.Event | None:
        try:
            await self._kernel_thread.call(fn)
        except (LuoError, OSError) as exc:
            return failed(str(exc))
        return ok

    async def cancel(self) -> str:
        """Cancel in the kernel and let go of the handed-in fds; what went wrong ("" if nothing)."""
        problem = ""
        try:
            await self._kernel_thread.call(self._state.opened_kernel().cancel)
        except (LuoError, OSError) as exc:
            problem = f"kernel cancel: {exc}"
        self.registry.close_all()
        await self.unload_image()
        return problem

    async def unload_image(self) -> None:
        """The update ended before its kexec: its image out of the kernel, so that a plain
        reboot stays a reboot; unless someone else's shutdown is under way (a kexec asked for,
        or logind's auto-kexec, keeps the image it chose)."""
        if not self.image_in_kernel or self._state.shutdown_queued:
            return
        try:
            await self._kernel_thread.call(self._state.opened_kernel().unload_kernel)
        except OSError as exc:
            log.warning("kexec_unload_failed", error=str(exc))
            return
        self.image_in_kernel = False

    # ----------------------------------------------------------------------------- the kexec

    async def reboot(
        self, gate: Gate, blackout_started: float, announce: Callable[[], None]
    ) -> ph.Event | None:
        """The kexec: returns only if it failed (``announce`` publishes "rebooting" either way,
        once the blackout-critical path is behind)."""
        assert self._state.record is not None
        record = self._state.record.with_phase(ph.Phase.REBOOTING)
        started = time.monotonic()
        try:
            await self._kexec_now(gate, record, blackout_started, announce)
        except (LuoError, OSError) as exc:
            announce()
            log.error("kexec_failed", error=str(exc), update_id=record.id)
            reason = f"kexec reboot failed: {exc}"
            if self._state.opened_kernel().capabilities.irreversible_freeze:
                return ph.RebootFailedAfterFreeze(reason)
            return ph.RebootFailed(reason)
        announce()
        log.info(
            "kexec_issued",
            update_id=record.id,
            seconds=round(time.monotonic() - started, 6),
            strategy=self.strategy.chosen,
        )
        return None

    async def _kexec_now(
        self,
        gate: Gate,
        record: UpdateRecord,
        blackout_started: float,
        announce: Callable[[], None],
    ) -> None:
        kernel = self._state.opened_kernel()
        call = self._kernel_thread.call

        def final_metadata() -> None:
            """O(1) before the jump: one pwrite of the small metadata, stamped with the agent's
            share of the blackout so far."""
            blackout = time.monotonic() - blackout_started
            kernel.update_metadata(replace(record, blackout_critical=blackout))

        def entrust() -> int:
            final_metadata()
            return kernel.entrust_outgoing()

        def reboot() -> None:
            final_metadata()
            kernel.reboot()

        if self.strategy.chosen != "systemd":
            await call(reboot)
            return
        # The systemd strategy: the session fds go to the fd store, kexec.target stops every
        # unit (this agent too) and PID 1 carries the store through reboot(KEXEC) (>= 261).
        await hand_over_to_pid1(
            gate,
            image_loaded=lambda: call(kernel.kexec_image_loaded),
            entrust=lambda: call(entrust),
            reclaim=lambda: call(kernel.reclaim_outgoing),
            announce=announce,
        )
