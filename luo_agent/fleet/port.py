"""The fleet coordinator's port: what the agent needs from whoever counts the hosts in blackout.

A slot is taken after the prepare gate and before anything irreversible, kept across the kexec and
released in the new boot once the update finished and the participants are healthy.  Slots have
no lease or TTL (kured's TTL let failed nodes cascade through fleets): a slot is held until its
host releases it or an operator does.  Adapters: ``etcd.EtcdCoordinator`` (airlock's key and
layout, so hosts managed by airlock/Zincati share the same slots) and
``fleetlock.FleetLockCoordinator`` (a FleetLock server).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, Protocol

from ..errors import CoordinatorInvalid

# Zincati's ids are 32 hex digits; airlock takes any non-empty string: allow what an id could be,
# and nothing that could hide in a log line or a path.
HOLDER_ID_RE: Final = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")


class Acquired(StrEnum):
    """One attempt at a slot: held (now or already), or every slot taken (ask again later)."""

    HELD = "held"
    FULL = "full"


@dataclass(frozen=True, slots=True)
class Semaphore:
    """One counted semaphore as airlock stores it: ``{"total_slots":N,"holders":[sorted ids]}``."""

    group: str
    total_slots: int
    holders: tuple[str, ...]

    def to_json(self) -> str:
        return json.dumps(
            {"total_slots": self.total_slots, "holders": sorted(self.holders)},
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, group: str, raw: bytes) -> Semaphore:
        """Parse the stored value; a coordinator that lies is ``CoordinatorInvalid``, not a slot."""
        try:
            value = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise CoordinatorInvalid(f"semaphore of group {group!r} is not JSON: {exc}") from None
        if not isinstance(value, dict):
            raise CoordinatorInvalid(f"semaphore of group {group!r} is not a JSON object")
        total = value.get("total_slots")
        holders = value.get("holders", [])
        if isinstance(total, bool) or not isinstance(total, int) or total < 1:
            raise CoordinatorInvalid(
                f"semaphore of group {group!r} has total_slots {total!r} (must be >= 1)"
            )
        if holders is None:  # airlock's Go marshals an empty slice as null
            holders = []
        if not isinstance(holders, list) or not all(
            isinstance(h, str) and HOLDER_ID_RE.match(h) for h in holders
        ):
            raise CoordinatorInvalid(
                f"semaphore of group {group!r} has holders that do not parse: {holders!r}"
            )
        if len(set(holders)) != len(holders):
            raise CoordinatorInvalid(f"semaphore of group {group!r} lists a holder twice")
        return cls(group, total, tuple(sorted(holders)))

    def with_holder(self, host_id: str) -> Semaphore:
        return Semaphore(self.group, self.total_slots, tuple(sorted({*self.holders, host_id})))

    def without_holder(self, host_id: str) -> Semaphore:
        return Semaphore(
            self.group, self.total_slots, tuple(h for h in self.holders if h != host_id)
        )

    @property
    def full(self) -> bool:
        # More holders than slots is possible after an operator lowered the count (airlock#81).
        return len(self.holders) >= self.total_slots


@dataclass(frozen=True, slots=True)
class FleetStatus:
    """What the coordinator says now: each semaphore this host counts against, and the halt."""

    host_id: str
    semaphores: tuple[Semaphore, ...]
    halted: str  # why the rollout is halted; empty while it runs
    failed: tuple[str, ...]  # hosts whose update failed while holding a slot

    @property
    def holding(self) -> bool:
        return bool(self.semaphores) and all(self.host_id in s.holders for s in self.semaphores)


class Coordinator(Protocol):
    """One host's view of the fleet's coordinator.  Every call is one bounded exchange (callers own
    timeouts and retries); each may be repeated: acquiring a held slot or releasing a free one
    changes nothing.

    Raises ``CoordinatorUnavailable`` (no answer), ``CoordinatorInvalid`` (an answer that cannot be
    true) and, from ``acquire``, ``RolloutHalted``."""

    @property
    def host_id(self) -> str: ...

    @property
    def describe(self) -> str:
        """Where the coordinator is and which groups, for logs and the status."""
        ...

    async def acquire(self) -> Acquired: ...

    async def release(self) -> None: ...

    async def report_failure(self, reason: str) -> bool:
        """This host's update failed while it holds its slot (the slot stays held).  Returns
        whether the rollout is now halted (the failure budget ran out)."""
        ...

    async def status(self) -> FleetStatus: ...

    # Operator requests (liveupdatectl fleet ...); a coordinator that cannot do one raises
    # ``CoordinatorError`` saying so.
    async def force_release(self, host_id: str) -> None: ...

    async def halt(self, reason: str) -> None: ...

    async def resume(self) -> None: ...

    async def set_max(self, total_slots: int, *, zone: bool = False) -> None: ...
