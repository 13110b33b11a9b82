"""The agent's phase machine: pure data in, pure data out.

``step(phase, event)`` returns the next phase and the effects the agent must run, in order.  Nothing
here performs I/O, sleeps, logs or knows which kernel ABI is underneath: the Agent runs the effects
through its ports and feeds their outcomes back as events (``PreparationDone``, ``FreezeFailed``,
...).  Every (phase, event type) pair absent from ``TRANSITIONS`` raises ``PhaseError``.

Phases (``design.md`` §3, refined)::

    idle -Prepare-> preparing -GateOk-> (preserve + kernel prepare) -PreparationDone-> prepared
    prepared -Execute-> freezing -GateOk-> (kernel freeze) -FreezeDone-> rebooting -> kexec
    prepared -Coordinate-> coordinating (take a fleet slot) -SlotTaken-> freezing -> ...
    preparing | prepared | coordinating | freezing
        -Cancel | GateFailed | Timeout | *Failed->  cancelling
    cancelling -CancelDone-> idle
    rebooting -RebootFailed-> prepared       (kernel still prepared: retry Execute, or Cancel)
    rebooting -RebootFailedAfterFreeze-> cancelling   (rfc-v2 FROZEN: only cancel is left)
    (new kernel) updated -Restore-> restoring -GateOk-> restored -Finish-> finishing
    finishing -GateOk-> (kernel finish) -FinishDone-> idle
    restoring -GateFailed | Timeout-> updated   (failure recorded; retry Restore, or Finish)
    finishing -GateFailed | FinishFailed | Timeout-> restored   (failure recorded; retry Finish)
    updated -Finish-> finishing                 (give up on restore; unretrieved fds are discarded)
    idle -Recovered(kernel_state)-> idle | cancelling | updated   (agent (re)start)

Decisions worth knowing:

* There is **no ``failed`` phase**.  Every failure lands in a phase from which a defined action
  exists: before the reboot that is ``cancelling`` (the kernel is put back to normal), after it the
  failure is reported and the phase stays where the operator can retry (``updated`` for restore,
  ``restored`` for finish).  A terminal "failed" phase would need a reset event and would hide which
  kernel state is left behind.
* Kernel work after a gate is a separate step with its own outcome event.  ``preparing`` covers
  both the prepare target and the kernel preservation that follows it (``GateOk`` keeps the phase
  and returns the kernel effects); so a Cancel or Timeout during kernel preservation is well
  defined, and the agent may run kernel work off its event task.
* Every failure event adds a leading ``ReportFailure`` effect: failures are never silently dropped.
* Gate results and timeouts name what they are about (``GateOk(target)``, ``Timeout(phase)``); a
  stale one (for another target or phase) is rejected with ``PhaseError`` like any illegal event.
* A failed cancel stays in ``cancelling`` (the kernel may still be prepared, so ``idle`` would lie);
  ``Cancel`` there retries the cancel effects, which are therefore required to be idempotent.

What each phase means outside the table (its target, step, progress, the kernel states its own
work leads to, the requests it allows) is its row in ``SPECS``.

Timers: after every accepted step the agent stops the phase timer; if the step started work
(``Step.arms_timer``) and the next phase has a step (``SPECS[next].step``), it arms a timer of that
step's configured timeout (``config.Timeouts``) that feeds ``Timeout(step.next)``.  So each wait
(gate, kernel work, cancel retry) is bounded, and a phase that only waits for the operator has no
timer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Final, TypeAlias, assert_never, get_args

from .errors import PhaseError


class Phase(StrEnum):
    IDLE = "idle"
    PREPARING = "preparing"  # prepare target running, then preservation + kernel prepare
    PREPARED = "prepared"  # everything preserved; waiting for Execute (or Cancel)
    COORDINATING = "coordinating"  # taking a slot from the fleet's coordinator (docs/fleet.md)
    FREEZING = "freezing"  # freeze target running, then kernel freeze
    REBOOTING = "rebooting"  # kexec reboot issued; only a failure brings the agent back
    CANCELLING = "cancelling"  # kernel cancel + cancel target; stays here if they fail
    UPDATED = "updated"  # new kernel, live-update boot detected; waiting for Restore (or Finish)
    RESTORING = "restoring"  # restore target running; participants retrieve their fds
    RESTORED = "restored"  # restore gate passed; waiting for Finish (or auto-finish)
    FINISHING = "finishing"  # finish target running, then kernel finish


class KernelState(StrEnum):
    """What the kernel reports when the agent starts, in the agent's own terms.

    The Agent maps each backend onto these: rfc-v2/v3 read GET_STATE (or sysfs); on the session ABI
    an incoming ``luo-agent`` metadata session means ``UPDATED``, anything else ``NORMAL`` (outgoing
    sessions do not outlive the process that created them).
    """

    NORMAL = "normal"
    PREPARED = "prepared"
    FROZEN = "frozen"
    UPDATED = "updated"


PRE_REBOOT_PHASES: Final = frozenset(
    {
        Phase.PREPARING,
        Phase.PREPARED,
        Phase.COORDINATING,
        Phase.FREEZING,
        Phase.REBOOTING,
        Phase.CANCELLING,
    }
)
POST_REBOOT_PHASES: Final = frozenset(
    {Phase.UPDATED, Phase.RESTORING, Phase.RESTORED, Phase.FINISHING}
)


def is_pre_reboot(phase: Phase) -> bool:
    """True while an update is under way in the kernel it started in (idle is neither)."""
    return phase in PRE_REBOOT_PHASES


def is_post_reboot(phase: Phase) -> bool:
    """True while an update that crossed a kexec is being restored or finished."""
    return phase in POST_REBOOT_PHASES


# ------------------------------------------------------------------------------- what phases mean


class Request(StrEnum):
    """Requests the phase decides outside the engine (the engine's own are its events)."""

    PRESERVE = "Preserve"  # and Unpreserve: fds are handed in (or taken back) before the kernel
    RETRIEVE = "Retrieve"  # fds handed back after the live-update boot
    LOAD_KERNEL = "LoadKernel"  # (re)load the kexec image; not once the blackout is under way


@dataclass(frozen=True, slots=True)
class PhaseSpec:
    """Everything a phase means outside the transition table, in one row (``SPECS``)."""

    progress: int  # rough percent of the update, for the Progress property
    # The kernel states (sysfs ``state`` values) the agent's own work leads to in this phase,
    # allowing for a watcher that reports a step late; anything else was done by someone else
    # (on rfc-v2 any process may open the device and send events).
    own_kernel_states: frozenset[KernelState]
    allows: frozenset[Request] = frozenset({Request.LOAD_KERNEL})
    # A gated phase's step: the ``active/<step>`` marker the targets assert, the key of its
    # timeout in the configuration (``[timeouts]``) and its target ``liveupdate-<step>.target``.
    # Only these phases wait for work (a gate job, then the kernel) and so time out.
    step: str = ""
    # False: the step waits for work of the agent's own (the fleet's coordinator), not for a
    # target; it still has its marker and its timeout.
    gated: bool = True

    @property
    def target(self) -> str | None:
        """The systemd target this phase starts; participants hook in with RequiredBy= + Before=."""
        return f"liveupdate-{self.step}.target" if self.step and self.gated else None


_K = KernelState
_BEFORE_REBOOT: Final = frozenset({Request.PRESERVE, Request.LOAD_KERNEL})
_AFTER_REBOOT: Final = frozenset({Request.RETRIEVE, Request.LOAD_KERNEL})

SPECS: Final[Mapping[Phase, PhaseSpec]] = MappingProxyType(
    {
        Phase.IDLE: PhaseSpec(0, frozenset({_K.NORMAL}), _BEFORE_REBOOT),
        Phase.PREPARING: PhaseSpec(10, frozenset({_K.PREPARED}), _BEFORE_REBOOT, "prepare"),
        Phase.PREPARED: PhaseSpec(40, frozenset({_K.PREPARED})),
        Phase.COORDINATING: PhaseSpec(
            50, frozenset({_K.PREPARED}), frozenset(), "coordinate", gated=False
        ),
        Phase.FREEZING: PhaseSpec(60, frozenset({_K.PREPARED, _K.FROZEN}), frozenset(), "freeze"),
        Phase.REBOOTING: PhaseSpec(80, frozenset({_K.PREPARED, _K.FROZEN}), frozenset()),
        Phase.CANCELLING: PhaseSpec(
            50, frozenset({_K.NORMAL, _K.PREPARED, _K.FROZEN}), step="cancel"
        ),
        Phase.UPDATED: PhaseSpec(85, frozenset({_K.UPDATED}), _AFTER_REBOOT),
        Phase.RESTORING: PhaseSpec(90, frozenset({_K.UPDATED}), _AFTER_REBOOT, "restore"),
        Phase.RESTORED: PhaseSpec(95, frozenset({_K.UPDATED}), _AFTER_REBOOT),
        Phase.FINISHING: PhaseSpec(98, frozenset({_K.NORMAL}), step="finish"),
    }
)
TIMED_STEPS: Final = tuple(spec.step for spec in SPECS.values() if spec.step)


# ----------------------------------------------------------------------------------------- events
# Requests (from D-Bus, the CLI or the agent's own auto-finish policy).


@dataclass(frozen=True, slots=True)
class Prepare:
    """Start an update: run the prepare gate, then preserve every registered fd."""


@dataclass(frozen=True, slots=True)
class Execute:
    """Freeze and kexec into the loaded kernel."""


@dataclass(frozen=True, slots=True)
class Coordinate:
    """Execute in a fleet: take a slot from the coordinator first, then freeze and kexec."""


@dataclass(frozen=True, slots=True)
class Cancel:
    """Abandon the update before the reboot (or retry a cancel that failed)."""


@dataclass(frozen=True, slots=True)
class Restore:
    """After the live-update boot: run the restore gate (participants retrieve their fds)."""


@dataclass(frozen=True, slots=True)
class Finish:
    """After the live-update boot: run the finish gate, then finish in the kernel."""


# Outcomes of effects, fed back by the Agent.


@dataclass(frozen=True, slots=True)
class GateOk:
    """The job that started ``target`` ended ``done``."""

    target: str


@dataclass(frozen=True, slots=True)
class GateFailed:
    """The job that started ``target`` ended failed/dependency/timeout/canceled."""

    target: str
    reason: str


@dataclass(frozen=True, slots=True)
class PreparationDone:
    """PreserveRegistered, PreserveMetadata and KernelPrepare all succeeded."""


@dataclass(frozen=True, slots=True)
class PreparationFailed:
    reason: str


@dataclass(frozen=True, slots=True)
class SlotTaken:
    """The fleet's coordinator gave this host a slot (held until the new boot releases it)."""


@dataclass(frozen=True, slots=True)
class SlotRefused:
    """No slot: the coordinator is unreachable, halted, or answered something that cannot be."""

    reason: str


@dataclass(frozen=True, slots=True)
class FreezeDone:
    """KernelFreeze succeeded (a barrier on ABIs without a freeze step)."""


@dataclass(frozen=True, slots=True)
class FreezeFailed:
    reason: str


@dataclass(frozen=True, slots=True)
class RebootFailed:
    """The kexec reboot returned; the kernel is still prepared and every outgoing handle open."""

    reason: str


@dataclass(frozen=True, slots=True)
class RebootFailedAfterFreeze:
    """The kexec reboot returned after the kernel froze (rfc-v2 FROZEN): only cancel remains."""

    reason: str


@dataclass(frozen=True, slots=True)
class CancelDone:
    """KernelCancel and the cancel target both succeeded."""


@dataclass(frozen=True, slots=True)
class CancelFailed:
    reason: str


@dataclass(frozen=True, slots=True)
class FinishDone:
    """KernelFinish succeeded on every incoming session (or the global state)."""


@dataclass(frozen=True, slots=True)
class FinishFailed:
    reason: str


@dataclass(frozen=True, slots=True)
class Timeout:
    """The timer armed for ``phase`` expired."""

    phase: Phase

    @property
    def reason(self) -> str:
        return f"{self.phase} did not complete in time"


@dataclass(frozen=True, slots=True)
class Recovered:
    """The agent (re)started and read the kernel's state; only accepted in idle."""

    kernel_state: KernelState
    detail: str = ""  # what the agent found (e.g. which sessions), for the failure report

    @property
    def reason(self) -> str:
        why = f"agent started with the kernel {self.kernel_state}"
        return f"{why}: {self.detail}" if self.detail else why


Event: TypeAlias = (
    Prepare
    | Execute
    | Coordinate
    | Cancel
    | Restore
    | Finish
    | GateOk
    | GateFailed
    | PreparationDone
    | PreparationFailed
    | SlotTaken
    | SlotRefused
    | FreezeDone
    | FreezeFailed
    | RebootFailed
    | RebootFailedAfterFreeze
    | CancelDone
    | CancelFailed
    | FinishDone
    | FinishFailed
    | Timeout
    | Recovered
)
EVENT_TYPES: Final[tuple[type[Event], ...]] = get_args(Event)
FailureEvent: TypeAlias = (
    GateFailed
    | PreparationFailed
    | SlotRefused
    | FreezeFailed
    | RebootFailed
    | RebootFailedAfterFreeze
    | CancelFailed
    | FinishFailed
    | Timeout
)
_FAILURE_TYPES: Final[tuple[type[FailureEvent], ...]] = get_args(FailureEvent)


# ---------------------------------------------------------------------------------------- effects


@dataclass(frozen=True, slots=True)
class StartTarget:
    """Start ``target_name`` (job mode fail) and feed GateOk/GateFailed with the job's result.

    In cancelling, the result is folded into CancelDone/CancelFailed together with KernelCancel.
    """

    target_name: str


@dataclass(frozen=True, slots=True)
class PreserveRegistered:
    """Preserve every registered fd in the kernel, dependencies first, with the agent's
    metadata memfd (all or nothing)."""


@dataclass(frozen=True, slots=True)
class PreserveMetadata:
    """Write every kernel token into the agent's metadata memfd (update id, mapping, timings),
    preserved with the registered fds: rfc-v2's tokens are made by the kernel."""


@dataclass(frozen=True, slots=True)
class KernelPrepare:
    """rfc-v2 EVENT_PREPARE, v3 SET_EVENT(PREPARE); nothing on the session ABI."""


@dataclass(frozen=True, slots=True)
class TakeSlot:
    """Take a slot from the fleet's coordinator, waiting while every slot is taken."""


@dataclass(frozen=True, slots=True)
class KernelFreeze:
    """rfc-v2 EVENT_FREEZE; a barrier elsewhere (v3 freezes inside the reboot)."""


@dataclass(frozen=True, slots=True)
class KernelReboot:
    """kexec with every outgoing handle open (direct reboot or kexec.target per configuration)."""


@dataclass(frozen=True, slots=True)
class KernelCancel:
    """Idempotent: rfc-v2 EVENT_CANCEL / v3 SET_EVENT(CANCEL) unless already normal; close the
    outgoing session fds on the session ABI.  Registry entries return to ``registered``."""


@dataclass(frozen=True, slots=True)
class KernelFinish:
    """rfc-v2 EVENT_FINISH, v3 SET_EVENT(FINISH), FINISH on every incoming session."""


@dataclass(frozen=True, slots=True)
class ReportFailure:
    """Record ``reason`` as the update's last error and publish it (signal, log, history)."""

    phase: Phase
    event: str
    reason: str


Effect: TypeAlias = (
    StartTarget
    | PreserveRegistered
    | PreserveMetadata
    | KernelPrepare
    | TakeSlot
    | KernelFreeze
    | KernelReboot
    | KernelCancel
    | KernelFinish
    | ReportFailure
)
EFFECT_TYPES: Final[tuple[type[Effect], ...]] = get_args(Effect)


# ------------------------------------------------------------------------------------ transitions


@dataclass(frozen=True, slots=True)
class Step:
    next: Phase
    effects: tuple[Effect, ...] = ()

    @property
    def arms_timer(self) -> bool:
        """Whether this step started work that the next phase's timeout must bound."""
        return any(not isinstance(effect, ReportFailure) for effect in self.effects)


@dataclass(frozen=True, slots=True)
class Transition:
    """A table entry: the next phase and the effects (ReportFailure is added by ``step``)."""

    next: Phase
    effects: tuple[Effect, ...] = ()


@dataclass(frozen=True, slots=True, eq=False)
class ByKernelState:
    """A table entry whose outcome depends on ``Recovered.kernel_state`` (the only data branch)."""

    choices: Mapping[KernelState, Transition]

    @property
    def targets(self) -> tuple[Phase, ...]:
        return tuple(dict.fromkeys(t.next for t in self.choices.values()))


Rule: TypeAlias = Transition | ByKernelState


def _start(phase: Phase) -> StartTarget:
    target = SPECS[phase].target
    assert target is not None, f"{phase} has no target"
    return StartTarget(target)


def _gated(phase: Phase) -> Transition:
    return Transition(phase, (_start(phase),))


_CANCEL: Final = Transition(Phase.CANCELLING, (KernelCancel(), _start(Phase.CANCELLING)))
_BACK_TO_UPDATED: Final = Transition(Phase.UPDATED)
_BACK_TO_RESTORED: Final = Transition(Phase.RESTORED)

RECOVERY: Final[Mapping[KernelState, Transition]] = MappingProxyType(
    {
        KernelState.NORMAL: Transition(Phase.IDLE),
        # Nobody owns a half-prepared update any more: undo it (and report why).
        KernelState.PREPARED: _CANCEL,
        KernelState.FROZEN: _CANCEL,
        KernelState.UPDATED: Transition(Phase.UPDATED),
    }
)

TRANSITIONS: Final[Mapping[tuple[Phase, type[Event]], Rule]] = MappingProxyType(
    {
        (Phase.IDLE, Prepare): _gated(Phase.PREPARING),
        (Phase.IDLE, Recovered): ByKernelState(RECOVERY),
        (Phase.PREPARING, GateOk): Transition(
            Phase.PREPARING, (PreserveRegistered(), PreserveMetadata(), KernelPrepare())
        ),
        (Phase.PREPARING, PreparationDone): Transition(Phase.PREPARED),
        (Phase.PREPARING, PreparationFailed): _CANCEL,
        (Phase.PREPARING, GateFailed): _CANCEL,
        (Phase.PREPARING, Timeout): _CANCEL,
        (Phase.PREPARING, Cancel): _CANCEL,
        (Phase.PREPARED, Execute): _gated(Phase.FREEZING),
        (Phase.PREPARED, Cancel): _CANCEL,
        # The slot is taken while the kernel is only prepared: nothing irreversible yet.
        (Phase.PREPARED, Coordinate): Transition(Phase.COORDINATING, (TakeSlot(),)),
        (Phase.COORDINATING, SlotTaken): _gated(Phase.FREEZING),
        (Phase.COORDINATING, SlotRefused): _CANCEL,
        (Phase.COORDINATING, Timeout): _CANCEL,
        (Phase.COORDINATING, Cancel): _CANCEL,
        (Phase.FREEZING, GateOk): Transition(Phase.FREEZING, (KernelFreeze(),)),
        (Phase.FREEZING, FreezeDone): Transition(Phase.REBOOTING, (KernelReboot(),)),
        (Phase.FREEZING, FreezeFailed): _CANCEL,
        (Phase.FREEZING, GateFailed): _CANCEL,
        (Phase.FREEZING, Timeout): _CANCEL,
        (Phase.FREEZING, Cancel): _CANCEL,
        # The freeze target stays active; a retried Execute re-enters freezing, Cancel thaws.
        (Phase.REBOOTING, RebootFailed): Transition(Phase.PREPARED),
        (Phase.REBOOTING, RebootFailedAfterFreeze): _CANCEL,
        (Phase.CANCELLING, CancelDone): Transition(Phase.IDLE),
        (Phase.CANCELLING, CancelFailed): Transition(Phase.CANCELLING),
        (Phase.CANCELLING, Timeout): Transition(Phase.CANCELLING),
        (Phase.CANCELLING, Cancel): _CANCEL,
        (Phase.UPDATED, Restore): _gated(Phase.RESTORING),
        (Phase.UPDATED, Finish): _gated(Phase.FINISHING),
        (Phase.RESTORING, GateOk): Transition(Phase.RESTORED),
        (Phase.RESTORING, GateFailed): _BACK_TO_UPDATED,
        (Phase.RESTORING, Timeout): _BACK_TO_UPDATED,
        (Phase.RESTORED, Finish): _gated(Phase.FINISHING),
        (Phase.FINISHING, GateOk): Transition(Phase.FINISHING, (KernelFinish(),)),
        (Phase.FINISHING, FinishDone): Transition(Phase.IDLE),
        (Phase.FINISHING, FinishFailed): _BACK_TO_RESTORED,
        (Phase.FINISHING, GateFailed): _BACK_TO_RESTORED,
        (Phase.FINISHING, Timeout): _BACK_TO_RESTORED,
    }
)


def _event_name(event: Event) -> str:
    return type(event).__name__


def _mismatch(phase: Phase, event: Event) -> str | None:
    """Why an event of an accepted type is still not about this phase (stale), else None."""
    match event:
        case Timeout(phase=about) if about != phase:
            return f"Timeout({about})"
        case GateOk(target=target) | GateFailed(target=target) if target != SPECS[phase].target:
            return f"{_event_name(event)}({target})"
        case _:
            return None


def step(phase: Phase, event: Event) -> Step:
    """The next phase and the effects to run, in order; PhaseError if ``event`` is not accepted."""
    rule = TRANSITIONS.get((phase, type(event)))
    if rule is None:
        raise PhaseError(phase, _event_name(event))
    if (stale := _mismatch(phase, event)) is not None:
        raise PhaseError(phase, stale)
    match rule:
        case Transition():
            transition = rule
        case ByKernelState():
            assert isinstance(event, Recovered)  # the only event type with a data branch
            transition = rule.choices[event.kernel_state]
        case _:
            assert_never(rule)
    reason = _failure_reason(event, transition)
    if reason is None:
        return Step(transition.next, transition.effects)
    return Step(
        transition.next, (ReportFailure(phase, _event_name(event), reason), *transition.effects)
    )


def _failure_reason(event: Event, transition: Transition) -> str | None:
    if isinstance(event, _FAILURE_TYPES):
        return event.reason
    # A prepared kernel found at start-up is the failure of the update that owned it.
    if isinstance(event, Recovered) and transition.next is Phase.CANCELLING:
        return event.reason
    return None


# ------------------------------------------------------------------------------------------- docs


def _render_effects(effects: tuple[Effect, ...]) -> str:
    parts = []
    for effect in effects:
        if isinstance(effect, StartTarget):
            parts.append(f"StartTarget({effect.target_name})")
        else:
            parts.append(type(effect).__name__)
    return ", ".join(parts)


def describe() -> str:
    """The transition table as a Markdown table (generated, so the docs cannot drift)."""
    rows = ["| phase | event | next | effects |", "|---|---|---|---|"]
    for (phase, event_type), rule in TRANSITIONS.items():
        name = event_type.__name__
        failure = "ReportFailure" if issubclass(event_type, _FAILURE_TYPES) else ""
        if isinstance(rule, ByKernelState):
            for state, transition in rule.choices.items():
                report = "ReportFailure" if transition.next is Phase.CANCELLING else ""
                effects = ", ".join(p for p in (report, _render_effects(transition.effects)) if p)
                rows.append(f"| {phase} | {name}({state}) | {transition.next} | {effects} |")
            continue
        effects = ", ".join(p for p in (failure, _render_effects(rule.effects)) if p)
        rows.append(f"| {phase} | {name} | {rule.next} | {effects} |")
    return "\n".join(rows) + "\n"
