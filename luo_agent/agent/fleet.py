"""The fleet slot: taken before the freeze, held across the kexec, released after a healthy finish.

``take`` is the ``coordinating`` phase's work (``TakeSlot``).  The rest listens to the update's
end (``update_finished``) and decides, once per update, from one fact: did the machine go down
since the slot was taken?  A random token written both to the runtime directory (cleared by any
boot) and to the slot file in the state directory (kept) tells.

- Same boot: nothing irreversible happened (cancelled, refused, the kexec returned, the agent was
  killed and its successor cancelled): the slot is released.
- A new boot and the update ended ``success`` (the restore gate passed, finish done): the health
  target (``fleet.health_target``, when configured) must pass, then the slot is released.
- A new boot otherwise (the update lost in the reboot, a cold boot, restore failed): the slot is
  kept and the failure reported, which past the failure budget halts the rollout for everyone.

A release is retried until the coordinator answers (Zincati's steady-state rule); an agent that
restarts meanwhile takes it up again from the slot file.  Nothing here has a TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

import structlog

from .. import phase as ph
from ..config import FleetConfig
from ..errors import CoordinatorError, LuoError
from ..fleet.port import Acquired, Coordinator
from ..persist import History, PersistError, write_atomic
from ..records import UpdateRecord
from ..systemd.gate import Gate
from .state import AgentState

log = structlog.get_logger("luo_agent.agent")

# One exchange with the coordinator (the coordinate step's timeout bounds the whole wait).
REQUEST_SECONDS: Final = 10.0
FIRST_RETRY_SECONDS: Final = 0.5
SLOT_FILE: Final = "fleet-slot.json"
BOOT_TOKEN_FILE: Final = "fleet-boot"


class SlotState(StrEnum):
    NONE = ""  # no slot (or no fleet)
    TAKING = "taking"  # asking the coordinator (it may already have said yes)
    HELD = "held"
    RELEASING = "releasing"  # the update is over; waiting for health, then for the coordinator
    FAILED = "failed"  # the update failed after going down: the slot is kept


@dataclass(frozen=True, slots=True)
class SlotFile:
    update_id: str
    host_id: str
    state: SlotState
    boot_token: str
    taken_at: float = 0.0

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "update_id": self.update_id,
                "host_id": self.host_id,
                "state": str(self.state),
                "boot_token": self.boot_token,
                "taken_at": self.taken_at,
            }
        ).encode()


class FleetSlot:
    """One room of the agent (``agent/__init__``): this host's slot in the fleet."""

    def __init__(
        self,
        state: AgentState,
        coordinator: Coordinator | None,
        config: FleetConfig,
        *,
        state_directory: Path,
        runtime_directory: Path,
        history: History,
        gate: Callable[[], Gate],
        changed: Callable[[], None],
    ) -> None:
        self._state = state
        self.coordinator = coordinator
        self._config = config
        self._slot_path = state_directory / SLOT_FILE
        self._token_path = runtime_directory / BOOT_TOKEN_FILE
        self._history = history
        self._gate = gate
        self._changed = changed
        self._slot = self._load()
        self._release: asyncio.Task[None] | None = None
        self.last_error = ""

    @property
    def enabled(self) -> bool:
        return self.coordinator is not None

    @property
    def slot_state(self) -> SlotState:
        return self._slot.state if self._slot is not None else SlotState.NONE

    @property
    def update_id(self) -> str:
        return self._slot.update_id if self._slot is not None else ""

    @property
    def host_id(self) -> str:
        return self.coordinator.host_id if self.coordinator is not None else ""

    @property
    def coordinator_text(self) -> str:
        return self.coordinator.describe if self.coordinator is not None else ""

    # ------------------------------------------------------------------------- the slot file

    def _load(self) -> SlotFile | None:
        try:
            data = json.loads(self._slot_path.read_bytes())
            return SlotFile(
                str(data["update_id"]),
                str(data["host_id"]),
                SlotState(data["state"]),
                str(data["boot_token"]),
                float(data.get("taken_at", 0.0)),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Unreadable: assume a slot is held by this host, so that nobody loses one.
            log.error("fleet_slot_file_unreadable", path=str(self._slot_path), error=str(exc))
            return SlotFile("", "", SlotState.FAILED, "")

    async def _save(self, slot: SlotFile | None) -> None:
        self._slot = slot
        self._changed()
        path = self._slot_path
        try:
            if slot is None:
                await asyncio.to_thread(_unlink, path)
            else:
                await asyncio.to_thread(write_atomic, path, slot.to_bytes(), durable=True)
        except (PersistError, OSError) as exc:
            log.error("fleet_slot_file_unwritable", path=str(path), error=str(exc))

    def _same_boot(self, slot: SlotFile) -> bool:
        try:
            return bool(slot.boot_token) and self._token_path.read_text() == slot.boot_token
        except OSError:
            return False

    # ------------------------------------------------------------------------------- take

    async def take(self) -> ph.Event:
        """The coordinating phase's work: a slot, or why not (then the update is cancelled)."""
        coordinator, record = self.coordinator, self._state.record
        if coordinator is None or record is None:
            return ph.SlotRefused("no fleet coordinator is configured")
        slot = self._slot
        if slot is None or slot.update_id != record.id:
            # Written (durably) before asking: a crash after the coordinator said yes must still
            # find out that it holds a slot.
            token = secrets.token_hex(16)
            try:
                await asyncio.to_thread(self._token_path.write_text, token)
            except OSError as exc:
                return ph.SlotRefused(f"cannot write {self._token_path}: {exc.strerror}")
            slot = SlotFile(record.id, coordinator.host_id, SlotState.TAKING, token)
            await self._save(slot)
        waited = False
        while True:
            try:
                async with asyncio.timeout(REQUEST_SECONDS):
                    got = await coordinator.acquire()
            except TimeoutError:
                return ph.SlotRefused(
                    f"{coordinator.describe} did not answer within {REQUEST_SECONDS:g}s"
                )
            except CoordinatorError as exc:
                return ph.SlotRefused(str(exc))
            if got is Acquired.HELD:
                break
            if not waited:
                log.info("fleet_slot_waiting", coordinator=coordinator.describe)
                waited = True
            await asyncio.sleep(self._config.retry_interval)
        await self._save(replace(slot, state=SlotState.HELD, taken_at=time.time()))
        if self._state.record is not None:
            self._state.record = replace(
                self._state.record, fleet_slot=f"{coordinator.host_id} @ {coordinator.describe}"
            )
        log.info("fleet_slot_taken", host_id=coordinator.host_id, update_id=record.id)
        return ph.SlotTaken()

    # ----------------------------------------------------------------------- after the update

    def phase_changed(self, record: UpdateRecord | None, phase: ph.Phase) -> None:
        # Restore failed in the new boot: a failed boot, even before anyone finishes it.
        slot = self._slot
        if (
            record is not None
            and slot is not None
            and slot.update_id == record.id
            and slot.state is SlotState.HELD
            and ph.is_post_reboot(phase)
            and record.result == "failed"
        ):
            self._spawn(self._fail(slot, record.message or "the restore gate failed"))

    def update_finished(self, record: UpdateRecord) -> None:
        slot = self._slot
        if slot is None or slot.update_id != record.id or slot.state is SlotState.FAILED:
            return
        self._decide(slot, record)

    def kernel_state_changed(self, value: str) -> None:
        pass

    def resume(self) -> None:
        """At start-up, after recovery: take up a release (or a decision) an agent left."""
        slot = self._slot
        if slot is None or self.coordinator is None or self._release is not None:
            return
        if slot.state is SlotState.RELEASING:
            self._spawn(self._release_when_healthy(slot, healthy=False))
            return
        if slot.state is SlotState.FAILED:
            return
        current = self._state.record
        if current is not None and current.id == slot.update_id:
            return  # the update goes on in this boot; its end decides
        entry = next((e for e in self._history.load() if e.get("id") == slot.update_id), None)
        try:
            record = UpdateRecord.from_json(entry) if entry is not None else None
        except ValueError:
            record = None
        if record is None:
            record = UpdateRecord(slot.update_id, "", result="unknown")
        self._decide(slot, record)

    def _decide(self, slot: SlotFile, record: UpdateRecord) -> None:
        if self._same_boot(slot):
            self._spawn(self._release_when_healthy(slot, healthy=True))
        elif record.result == "success":
            self._spawn(self._release_when_healthy(slot, healthy=False))
        else:
            why = f"update {record.id} ended {record.result or 'unknown'}: {record.message}"
            self._spawn(self._fail(slot, why))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        if self._release is not None and not self._release.done():
            self._release.cancel()
        self._release = asyncio.create_task(work, name="fleet-slot")

    async def _fail(self, slot: SlotFile, why: str) -> None:
        assert self.coordinator is not None
        await self._save(replace(slot, state=SlotState.FAILED))
        log.error("fleet_slot_kept_after_failure", update_id=slot.update_id, reason=why)
        halted = await self._retry("report the failure", lambda c: c.report_failure(why))
        if halted:
            log.error("fleet_rollout_halted", update_id=slot.update_id)

    async def _release_when_healthy(self, slot: SlotFile, *, healthy: bool) -> None:
        await self._save(replace(slot, state=SlotState.RELEASING))
        if not healthy and self._config.health_target:
            await self._wait_healthy(self._config.health_target)
        await self._retry("release the slot", lambda c: c.release())
        released_at = time.time()
        self._note_released(slot.update_id, released_at)
        await self._save(None)
        log.info("fleet_slot_released", update_id=slot.update_id)

    async def _wait_healthy(self, target: str) -> None:
        delay = FIRST_RETRY_SECONDS
        while True:
            try:
                outcome = await self._gate().run_target(target)
                with contextlib.suppress(LuoError):
                    await self._gate().stop_unit(target)
                if outcome.ok:
                    return
                self.last_error = f"{target} job ended {outcome.job_result}"
            except LuoError as exc:
                self.last_error = f"{target}: {exc}"
            log.warning("fleet_health_failed", target=target, error=self.last_error)
            self._changed()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._config.release_retry_max)

    async def _retry(
        self, what: str, call: Callable[[Coordinator], Coroutine[Any, Any, object]]
    ) -> bool:
        assert self.coordinator is not None
        coordinator, delay = self.coordinator, FIRST_RETRY_SECONDS
        while True:
            try:
                async with asyncio.timeout(REQUEST_SECONDS):
                    result = await call(coordinator)
                self.last_error = ""
                return bool(result)
            except (TimeoutError, CoordinatorError) as exc:
                self.last_error = f"cannot {what}: {exc or 'no answer'}"
                log.warning("fleet_coordinator_retry", error=self.last_error, retry_in=delay)
                self._changed()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._config.release_retry_max)

    def _note_released(self, update_id: str, released_at: float) -> None:
        """The history says when the slot was given back."""
        entry = next((e for e in self._history.load() if e.get("id") == update_id), None)
        if entry is None:
            return
        try:
            record = UpdateRecord.from_json(entry)
            self._history.append(replace(record, slot_released_at=released_at))
        except (ValueError, PersistError) as exc:
            log.error("history_unwritable", error=str(exc), update_id=update_id)
        if self._state.last is not None and self._state.last.id == update_id:
            self._state.last = replace(self._state.last, slot_released_at=released_at)

    async def close(self) -> None:
        if self._release is not None:
            self._release.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._release


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
