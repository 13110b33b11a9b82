"""What others do behind the agent's back: the kernel's state file changing (another process
cancelled the update), and a reboot, poweroff or kexec queued by someone else while an update is
prepared.  Both end in the agent cancelling its update, so the cancel hooks run."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace

import structlog

from .. import phase as ph
from ..errors import LuoError, PhaseError
from ..kernel.device import GlobalState
from ..systemd.gate import Gate
from .state import HOLDS_PREPARED_KERNEL, AgentListener, AgentState, KernelThread

log = structlog.get_logger("luo_agent.agent")


class Watchers:
    def __init__(
        self,
        state: AgentState,
        kernel_thread: KernelThread,
        listeners: Sequence[AgentListener],
        post: Callable[[ph.Event], None],
        submit: Callable[[ph.Event], Awaitable[ph.Step]],
    ) -> None:
        self._state = state
        self._kernel_thread = kernel_thread
        self._listeners = listeners
        self._post = post
        self._submit = submit
        # The last value of the kernel's state file (daemon's sysfs watcher); None if unwatched.
        self.observed_kernel_state: str | None = None
        self._state_check: asyncio.Task[None] | None = None
        self._shutdown_watch: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------------- the kernel's state

    @property
    def kernel_state_text(self) -> str:
        kernel = self._state.kernel
        if kernel is None:
            return "unavailable"
        if self.observed_kernel_state is not None:
            return self.observed_kernel_state
        try:
            return kernel.describe_state()
        except (LuoError, OSError) as exc:
            return f"unknown ({exc})"

    def observe_kernel_state(self, value: str) -> None:
        """A value of the kernel's state file (the daemon's sysfs watcher): publish it, log a
        change the agent did not make, and act if it contradicts the phase."""
        previous, self.observed_kernel_state = self.observed_kernel_state, value
        if value != previous:
            if previous is not None and value not in ph.SPECS[self._state.phase].own_kernel_states:
                log.warning(
                    "kernel_state_changed_externally",
                    state=value,
                    previous=previous,
                    phase=str(self._state.phase),
                    update_id=self._state.update_id,
                )
            for listener in self._listeners:
                listener.kernel_state_changed(value)
        self.check_kernel_state()

    def check_kernel_state(self) -> None:
        """Kernel NORMAL while the agent holds a prepared update: someone cancelled it.  The
        watcher's value may be stale, so the kernel itself is asked before acting."""
        if self.observed_kernel_state != GlobalState.NORMAL:
            return
        if self._state.phase not in HOLDS_PREPARED_KERNEL or self._state.kernel is None:
            return
        if self._state_check is None or self._state_check.done():
            self._state_check = asyncio.create_task(
                self._cancel_if_kernel_normal(), name="kernel-state-check"
            )

    async def _cancel_if_kernel_normal(self) -> None:
        kernel = self._state.opened_kernel()
        try:
            state = await self._kernel_thread.call(kernel.describe_state)
        except (LuoError, OSError) as exc:
            log.warning("kernel_state_unreadable", error=str(exc))
            return
        phase = self._state.phase
        if state != GlobalState.NORMAL or phase not in HOLDS_PREPARED_KERNEL:
            return  # a stale notification, or the phase moved on meanwhile
        if self._state.record is None:
            return
        reason = (
            f"the kernel left the prepared state behind the agent's back (kernel {state} in "
            f"phase {phase}): another process cancelled the live update"
        )
        log.warning(
            "kernel_state_contradicts_phase", reason=reason, update_id=self._state.update_id
        )
        self._state.record = replace(self._state.record, message=reason)
        self._post(ph.Cancel())

    # ------------------------------------------------------------------ shutdowns of others

    async def watch_shutdown(self, gate: Gate) -> None:
        """Notice a normal reboot/poweroff/halt/kexec queued by someone else while an update is
        prepared: the kernel would drop the update anyway, so cancel it (cancel hooks run)."""
        try:
            watch = await gate.watch_shutdown_jobs()
        except LuoError as exc:
            log.warning("shutdown_watch_unavailable", error=str(exc))
            return

        async def consume() -> None:
            try:
                async for target in watch:
                    if self._state.phase is not ph.Phase.REBOOTING:  # there, the agent's own job
                        self._state.shutdown_queued = target
                    if self._state.phase in (
                        ph.Phase.PREPARING,
                        ph.Phase.PREPARED,
                        ph.Phase.COORDINATING,
                    ):
                        await self._cancel_for_shutdown(target)
                    else:
                        log.info("shutdown_job_seen", target=target, phase=str(self._state.phase))
            finally:
                with contextlib.suppress(Exception):
                    await watch.aclose()

        self._shutdown_watch = asyncio.create_task(consume(), name="shutdown-watch")

    async def _cancel_for_shutdown(self, target: str) -> None:
        phase = self._state.phase
        reason = f"{target} was queued by someone else while the update was {phase}"
        log.warning("shutdown_while_prepared", target=target, phase=str(phase))
        if self._state.record is not None:
            self._state.record = replace(self._state.record, message=reason)
        with contextlib.suppress(PhaseError):
            await self._submit(ph.Cancel())

    async def close(self) -> None:
        if self._state_check is not None:
            self._state_check.cancel()
        if self._shutdown_watch is not None:
            self._shutdown_watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._shutdown_watch
