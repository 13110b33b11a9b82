"""What the agent's rooms share: the update in hand, the kernel thread and the listeners' port.
What each phase means outside the engine is its row in ``phase.SPECS``."""

from __future__ import annotations

import asyncio
import operator
import re
import secrets
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final, Generic, Protocol, Self, TypeVar, cast, overload

from .. import phase as ph
from ..kernel.backend import KernelBackend
from ..records import UpdateRecord
from ..systemd.gate import UnitStatus

T = TypeVar("T")

UPDATE_ID_RE: Final = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
CMDLINE_MARKER: Final = "luo_agent.update="

# Phases in which the agent holds a prepared kernel: a NORMAL kernel there means the update is gone.
HOLDS_PREPARED_KERNEL: Final = frozenset(
    {ph.Phase.PREPARED, ph.Phase.COORDINATING, ph.Phase.FREEZING}
)


class AgentListener(Protocol):
    """What the D-Bus layer (or a test) hears.  Called on the loop, must not block."""

    def phase_changed(self, record: UpdateRecord | None, phase: ph.Phase) -> None: ...

    def update_finished(self, record: UpdateRecord) -> None: ...

    def kernel_state_changed(self, value: str) -> None:
        """The kernel's state file (sysfs ``state``) now reads ``value``."""
        ...

    # Optional (looked up with getattr, so a listener may leave it out):
    # ``participants_changed() -> None`` — ``Agent.participants`` was read anew after a gate.


@dataclass(slots=True)
class AgentState:
    """The one copy of what every room reads: the phase (changed only by ``Agent._enter``), the
    update in hand, the last one that ended, and the kernel once it is open."""

    phase: ph.Phase = ph.Phase.IDLE
    record: UpdateRecord | None = None
    last: UpdateRecord | None = None
    kernel: KernelBackend | None = None
    # A reboot, poweroff, halt or kexec target someone else queued ("" if none): the machine is
    # going down whatever the agent does, as that job says.
    shutdown_queued: str = ""

    @property
    def progress(self) -> int:
        return ph.SPECS[self.phase].progress

    @property
    def update_id(self) -> str:
        return self.record.id if self.record is not None else ""

    def opened_kernel(self) -> KernelBackend:
        assert self.kernel is not None, "the kernel is opened at start-up"
        return self.kernel


@dataclass(frozen=True, slots=True)
class RebootStrategy:
    """The reboot strategy in effect ("auto" resolved at start) and, for an explicit "systemd"
    that cannot work here, why (a Check() blocker; Execute is refused)."""

    chosen: str = "direct"
    blocker: str = ""
    warning: str = ""


class RoomView(Generic[T]):
    """An attribute of the Agent that one of its rooms owns, under the name the API uses:
    ``phase = RoomView[ph.Phase]("state.phase")`` reads ``agent.state.phase``.  Read-only."""

    def __init__(self, path: str) -> None:
        self._get = operator.attrgetter(path)

    @overload
    def __get__(self, agent: None, owner: type) -> Self: ...

    @overload
    def __get__(self, agent: object, owner: type) -> T: ...

    def __get__(self, agent: object | None, owner: type) -> T | Self:
        if agent is None:
            return self
        return cast(T, self._get(agent))


class KernelThread:
    """Kernel calls are synchronous ioctls: they run here, one at a time, never on the loop."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kernel")

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.submit(fn, *args)

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Queue ``fn`` now (calls run in the order they were queued)."""
        return asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


def describe_units(units: Sequence[UnitStatus]) -> str:
    return ", ".join(f"{u.unit} ({u.active_state}/{u.sub_state}, result {u.result})" for u in units)


def enables_liveupdate(cmdline: str) -> bool:
    values = [w.split("=", 1)[1] for w in cmdline.split() if w.startswith("liveupdate=")]
    return bool(values) and values[-1].lower() in ("1", "y", "yes", "on", "true")


def with_marker(cmdline: str, update_id: str) -> str:
    return f"{cmdline} {CMDLINE_MARKER}{update_id}".strip()


def new_update_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
