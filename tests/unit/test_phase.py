"""The pure phase machine: every (phase, event type) pair, the data branches, and invariants over
generated event sequences."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from luo_agent.errors import PhaseError
from luo_agent.phase import (
    EFFECT_TYPES,
    EVENT_TYPES,
    SPECS,
    TIMED_STEPS,
    TRANSITIONS,
    ByKernelState,
    Cancel,
    CancelDone,
    CancelFailed,
    Coordinate,
    Effect,
    Event,
    Execute,
    Finish,
    FinishDone,
    FinishFailed,
    FreezeDone,
    FreezeFailed,
    GateFailed,
    GateOk,
    KernelCancel,
    KernelFinish,
    KernelFreeze,
    KernelPrepare,
    KernelReboot,
    KernelState,
    Phase,
    PreparationDone,
    PreparationFailed,
    Prepare,
    PreserveMetadata,
    PreserveRegistered,
    RebootFailed,
    RebootFailedAfterFreeze,
    Recovered,
    ReportFailure,
    Request,
    Restore,
    SlotRefused,
    SlotTaken,
    StartTarget,
    Step,
    TakeSlot,
    Timeout,
    describe,
    is_post_reboot,
    is_pre_reboot,
    step,
)

P = Phase
PHASE_TARGETS = {phase: spec.target for phase, spec in SPECS.items() if spec.target is not None}
PREPARE_T = "liveupdate-prepare.target"
FREEZE_T = "liveupdate-freeze.target"
CANCEL_T = "liveupdate-cancel.target"
RESTORE_T = "liveupdate-restore.target"
FINISH_T = "liveupdate-finish.target"

CANCEL_EFFECTS: tuple[Effect, ...] = (KernelCancel(), StartTarget(CANCEL_T))

# The documented table, written out independently of luo_agent.phase.TRANSITIONS:
# (phase, event type) -> (next phase, effects without the ReportFailure that failures add).
# Recovered is a data branch and is checked per kernel state in its own test.
EXPECTED: dict[tuple[Phase, type[Event]], tuple[Phase, tuple[Effect, ...]]] = {
    (P.IDLE, Prepare): (P.PREPARING, (StartTarget(PREPARE_T),)),
    (P.PREPARING, GateOk): (
        P.PREPARING,
        (PreserveRegistered(), PreserveMetadata(), KernelPrepare()),
    ),
    (P.PREPARING, PreparationDone): (P.PREPARED, ()),
    (P.PREPARING, PreparationFailed): (P.CANCELLING, CANCEL_EFFECTS),
    (P.PREPARING, GateFailed): (P.CANCELLING, CANCEL_EFFECTS),
    (P.PREPARING, Timeout): (P.CANCELLING, CANCEL_EFFECTS),
    (P.PREPARING, Cancel): (P.CANCELLING, CANCEL_EFFECTS),
    (P.PREPARED, Execute): (P.FREEZING, (StartTarget(FREEZE_T),)),
    (P.PREPARED, Cancel): (P.CANCELLING, CANCEL_EFFECTS),
    (P.PREPARED, Coordinate): (P.COORDINATING, (TakeSlot(),)),
    (P.COORDINATING, SlotTaken): (P.FREEZING, (StartTarget(FREEZE_T),)),
    (P.COORDINATING, SlotRefused): (P.CANCELLING, CANCEL_EFFECTS),
    (P.COORDINATING, Timeout): (P.CANCELLING, CANCEL_EFFECTS),
    (P.COORDINATING, Cancel): (P.CANCELLING, CANCEL_EFFECTS),
    (P.FREEZING, GateOk): (P.FREEZING, (KernelFreeze(),)),
    (P.FREEZING, FreezeDone): (P.REBOOTING, (KernelReboot(),)),
    (P.FREEZING, FreezeFailed): (P.CANCELLING, CANCEL_EFFECTS),
    (P.FREEZING, GateFailed): (P.CANCELLING, CANCEL_EFFECTS),
    (P.FREEZING, Timeout): (P.CANCELLING, CANCEL_EFFECTS),
    (P.FREEZING, Cancel): (P.CANCELLING, CANCEL_EFFECTS),
    (P.REBOOTING, RebootFailed): (P.PREPARED, ()),
    (P.REBOOTING, RebootFailedAfterFreeze): (P.CANCELLING, CANCEL_EFFECTS),
    (P.CANCELLING, CancelDone): (P.IDLE, ()),
    (P.CANCELLING, CancelFailed): (P.CANCELLING, ()),
    (P.CANCELLING, Timeout): (P.CANCELLING, ()),
    (P.CANCELLING, Cancel): (P.CANCELLING, CANCEL_EFFECTS),
    (P.UPDATED, Restore): (P.RESTORING, (StartTarget(RESTORE_T),)),
    (P.UPDATED, Finish): (P.FINISHING, (StartTarget(FINISH_T),)),
    (P.RESTORING, GateOk): (P.RESTORED, ()),
    (P.RESTORING, GateFailed): (P.UPDATED, ()),
    (P.RESTORING, Timeout): (P.UPDATED, ()),
    (P.RESTORED, Finish): (P.FINISHING, (StartTarget(FINISH_T),)),
    (P.FINISHING, GateOk): (P.FINISHING, (KernelFinish(),)),
    (P.FINISHING, FinishDone): (P.IDLE, ()),
    (P.FINISHING, FinishFailed): (P.RESTORED, ()),
    (P.FINISHING, GateFailed): (P.RESTORED, ()),
    (P.FINISHING, Timeout): (P.RESTORED, ()),
}
FAILURES = (
    GateFailed,
    PreparationFailed,
    SlotRefused,
    FreezeFailed,
    RebootFailed,
    RebootFailedAfterFreeze,
    CancelFailed,
    FinishFailed,
    TakeSlot,
    Timeout,
)
FAILURE_WITH_REASON = (
    PreparationFailed,
    SlotRefused,
    FreezeFailed,
    RebootFailed,
    RebootFailedAfterFreeze,
    CancelFailed,
    FinishFailed,
)
ALL_PAIRS = list(itertools.product(Phase, EVENT_TYPES))


def sample(event_type: type[Event], phase: Phase) -> Event:
    """An event of ``event_type`` that is about ``phase`` (so only the table decides)."""
    target = PHASE_TARGETS.get(phase, PREPARE_T)
    makers: dict[type[Event], Callable[[], Event]] = {
        GateOk: lambda: GateOk(target),
        GateFailed: lambda: GateFailed(target, "unit x.service failed"),
        Timeout: lambda: Timeout(phase),
        Recovered: lambda: Recovered(KernelState.NORMAL),
        **{cls: partial(cls, "boom") for cls in FAILURE_WITH_REASON},
    }
    maker = makers.get(event_type)
    if maker is not None:
        return maker()
    return cast("Callable[[], Event]", event_type)()


def test_expected_table_has_the_same_keys_as_the_module() -> None:
    assert set(TRANSITIONS) == set(EXPECTED) | {(P.IDLE, Recovered)}


@pytest.mark.parametrize(
    ("phase", "event_type"), ALL_PAIRS, ids=lambda v: str(getattr(v, "__name__", v))
)
def test_every_phase_event_pair(phase: Phase, event_type: type[Event]) -> None:
    event = sample(event_type, phase)
    if event_type is Recovered:
        if phase is P.IDLE:
            assert step(phase, event) == Step(P.IDLE, ())
        else:
            with pytest.raises(PhaseError) as info:
                step(phase, event)
            assert (info.value.phase, info.value.event) == (phase, "Recovered")
        return
    expected = EXPECTED.get((phase, event_type))
    if expected is None:
        with pytest.raises(PhaseError) as info:
            step(phase, event)
        assert (info.value.phase, info.value.event) == (phase, event_type.__name__)
        assert str(phase) in str(info.value)
        return
    result = step(phase, event)
    next_phase, effects = expected
    if event_type in FAILURES:
        reason = event.reason  # type: ignore[union-attr]
        effects = (ReportFailure(phase, event_type.__name__, reason), *effects)
    assert result == Step(next_phase, effects)


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (KernelState.NORMAL, Step(P.IDLE)),
        (KernelState.UPDATED, Step(P.UPDATED)),
        (
            KernelState.PREPARED,
            Step(
                P.CANCELLING,
                (
                    ReportFailure(
                        P.IDLE,
                        "Recovered",
                        "agent started with the kernel prepared: no agent held the device",
                    ),
                    *CANCEL_EFFECTS,
                ),
            ),
        ),
        (
            KernelState.FROZEN,
            Step(
                P.CANCELLING,
                (
                    ReportFailure(
                        P.IDLE,
                        "Recovered",
                        "agent started with the kernel frozen: no agent held the device",
                    ),
                    *CANCEL_EFFECTS,
                ),
            ),
        ),
    ],
)
def test_recovered_picks_the_phase_from_the_kernel_state(
    state: KernelState, expected: Step
) -> None:
    assert step(P.IDLE, Recovered(state, "no agent held the device")) == expected


def test_recovery_covers_every_kernel_state() -> None:
    rule = TRANSITIONS[P.IDLE, Recovered]
    assert isinstance(rule, ByKernelState)
    assert set(rule.choices) == set(KernelState)
    assert set(rule.targets) == {P.IDLE, P.CANCELLING, P.UPDATED}


@pytest.mark.parametrize(
    ("phase", "event"),
    [
        (P.PREPARING, Timeout(P.FREEZING)),  # a timer armed for another phase fired late
        (P.CANCELLING, Timeout(P.PREPARING)),
        (P.RESTORING, Timeout(P.FINISHING)),
        (P.PREPARING, GateOk(FREEZE_T)),
        (P.FREEZING, GateOk(PREPARE_T)),  # the prepare job's result arriving after Execute
        (P.FINISHING, GateFailed(RESTORE_T, "failed")),
        (P.RESTORING, GateOk("some-other.target")),
    ],
)
def test_stale_gate_results_and_timeouts_are_rejected(phase: Phase, event: Event) -> None:
    with pytest.raises(PhaseError) as info:
        step(phase, event)
    assert info.value.phase == phase
    assert "(" in info.value.event  # names what the stale event was about


def test_failure_report_names_phase_event_and_reason() -> None:
    result = step(P.FREEZING, GateFailed(FREEZE_T, "qemu-freeze@vm1.service: exit-code"))
    assert result.effects[0] == ReportFailure(
        P.FREEZING, "GateFailed", "qemu-freeze@vm1.service: exit-code"
    )
    timeout = step(P.RESTORING, Timeout(P.RESTORING))
    assert timeout.effects == (
        ReportFailure(P.RESTORING, "Timeout", "restoring did not complete in time"),
    )


@pytest.mark.parametrize(
    ("result", "arms"),
    [
        (Step(P.PREPARING, (StartTarget(PREPARE_T),)), True),
        (Step(P.CANCELLING, (ReportFailure(P.CANCELLING, "CancelFailed", "x"),)), False),
        (Step(P.PREPARED), False),
        (Step(P.CANCELLING, (ReportFailure(P.PREPARING, "Timeout", "x"), *CANCEL_EFFECTS)), True),
    ],
)
def test_arms_timer_only_when_work_was_started(result: Step, arms: bool) -> None:
    assert result.arms_timer is arms


def test_every_phase_has_a_complete_row() -> None:
    assert set(SPECS) == set(Phase)
    for phase, spec in SPECS.items():
        assert 0 <= spec.progress < 100, phase
        assert spec.own_kernel_states, phase
        assert spec.allows <= set(Request), phase
    assert {p: SPECS[p].step for p in Phase if SPECS[p].step} == {
        P.PREPARING: "prepare",
        P.COORDINATING: "coordinate",
        P.FREEZING: "freeze",
        P.CANCELLING: "cancel",
        P.RESTORING: "restore",
        P.FINISHING: "finish",
    }
    assert TIMED_STEPS == ("prepare", "coordinate", "freeze", "cancel", "restore", "finish")
    # Every step has a target, but the coordinator's: its work is the agent's own.
    assert [p for p in Phase if SPECS[p].step and SPECS[p].target is None] == [P.COORDINATING]


def test_every_phase_with_a_timeout_can_time_out() -> None:
    for phase in Phase:
        has_timeout = bool(SPECS[phase].step)
        assert ((phase, Timeout) in TRANSITIONS) is has_timeout, phase


def test_phase_groups() -> None:
    assert [p for p in Phase if is_pre_reboot(p)] == [
        P.PREPARING,
        P.PREPARED,
        P.COORDINATING,
        P.FREEZING,
        P.REBOOTING,
        P.CANCELLING,
    ]
    assert [p for p in Phase if is_post_reboot(p)] == [
        P.UPDATED,
        P.RESTORING,
        P.RESTORED,
        P.FINISHING,
    ]
    assert all(p.value == p.value.lower() for p in Phase)


def test_every_target_is_started_by_its_own_phase_only() -> None:
    for (phase, event_type), rule in TRANSITIONS.items():
        choices = rule.choices.values() if isinstance(rule, ByKernelState) else [rule]
        for transition in choices:
            for effect in transition.effects:
                if isinstance(effect, StartTarget):
                    assert effect.target_name == PHASE_TARGETS[transition.next], (
                        phase,
                        event_type,
                    )
    assert sorted(PHASE_TARGETS.values()) == sorted(
        [PREPARE_T, FREEZE_T, CANCEL_T, RESTORE_T, FINISH_T]
    )


def _graph() -> dict[Phase, set[Phase]]:
    edges: dict[Phase, set[Phase]] = {p: set() for p in Phase}
    for (phase, _), rule in TRANSITIONS.items():
        if isinstance(rule, ByKernelState):
            edges[phase].update(rule.targets)
        else:
            edges[phase].add(rule.next)
    return edges


def _reachable(start: Phase, edges: dict[Phase, set[Phase]]) -> set[Phase]:
    seen, todo = {start}, deque([start])
    while todo:
        for nxt in edges[todo.popleft()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_every_phase_is_reachable_and_can_get_back_to_idle() -> None:
    edges = _graph()
    assert _reachable(P.IDLE, edges) == set(Phase)
    for phase in Phase:
        assert P.IDLE in _reachable(phase, edges), phase


def run(phase: Phase, *events: Event) -> tuple[Phase, list[Effect]]:
    effects: list[Effect] = []
    for event in events:
        result = step(phase, event)
        phase = result.next
        effects.extend(result.effects)
    return phase, effects


def test_whole_update_across_the_kexec() -> None:
    before, effects = run(
        P.IDLE,
        Prepare(),
        GateOk(PREPARE_T),
        PreparationDone(),
        Execute(),
        GateOk(FREEZE_T),
        FreezeDone(),
    )
    assert before is P.REBOOTING
    assert effects == [
        StartTarget(PREPARE_T),
        PreserveRegistered(),
        PreserveMetadata(),
        KernelPrepare(),
        StartTarget(FREEZE_T),
        KernelFreeze(),
        KernelReboot(),
    ]
    # The new boot's agent starts from idle and learns the rest from the kernel.
    after, effects = run(
        P.IDLE,
        Recovered(KernelState.UPDATED),
        Restore(),
        GateOk(RESTORE_T),
        Finish(),
        GateOk(FINISH_T),
        FinishDone(),
    )
    assert after is P.IDLE
    assert effects == [StartTarget(RESTORE_T), StartTarget(FINISH_T), KernelFinish()]


def test_failures_after_the_reboot_are_retryable() -> None:
    phase, effects = run(P.UPDATED, Restore(), GateFailed(RESTORE_T, "db-restore.service failed"))
    assert phase is P.UPDATED
    assert effects[-1] == ReportFailure(P.RESTORING, "GateFailed", "db-restore.service failed")
    phase, _ = run(phase, Restore(), GateOk(RESTORE_T), Finish(), GateOk(FINISH_T))
    phase, effects = run(phase, FinishFailed("EBUSY"))
    assert (phase, effects) == (P.RESTORED, [ReportFailure(P.FINISHING, "FinishFailed", "EBUSY")])
    assert run(phase, Finish(), GateOk(FINISH_T), FinishDone())[0] is P.IDLE


def test_reboot_failure_keeps_the_update_or_cancels_it() -> None:
    frozen = run(P.PREPARED, Execute(), GateOk(FREEZE_T), FreezeDone())[0]
    assert run(frozen, RebootFailed("EAGAIN"), Execute())[0] is P.FREEZING
    phase, effects = run(frozen, RebootFailedAfterFreeze("EAGAIN"), CancelFailed("EINTR"))
    assert phase is P.CANCELLING
    assert [e for e in effects if isinstance(e, ReportFailure)] == [
        ReportFailure(P.REBOOTING, "RebootFailedAfterFreeze", "EAGAIN"),
        ReportFailure(P.CANCELLING, "CancelFailed", "EINTR"),
    ]
    assert run(phase, Cancel(), CancelDone())[0] is P.IDLE


def test_describe_renders_every_rule() -> None:
    text = describe()
    lines = text.splitlines()
    assert lines[0] == "| phase | event | next | effects |"
    for (phase, event_type), (next_phase, _) in EXPECTED.items():
        assert any(
            line.startswith(f"| {phase} | {event_type.__name__} | {next_phase} |") for line in lines
        ), (phase, event_type)
    for state in KernelState:
        assert f"| idle | Recovered({state}) |" in text
    assert (
        "| preparing | GateFailed | cancelling | ReportFailure, KernelCancel, StartTarget(" in text
    )


def test_effect_and_event_types_are_frozen_values() -> None:
    assert len(set(EVENT_TYPES)) == len(EVENT_TYPES) == 22
    assert len(set(EFFECT_TYPES)) == len(EFFECT_TYPES) == 10
    assert KernelPrepare() == KernelPrepare()
    assert hash(StartTarget(FREEZE_T)) == hash(StartTarget(FREEZE_T))
    with pytest.raises(AttributeError):
        GateOk(PREPARE_T).target = FREEZE_T  # type: ignore[misc]


# ---------------------------------------------------------------------- generated sequences

ANY_EVENT: st.SearchStrategy[Event] = st.one_of(
    st.sampled_from([Prepare(), Execute(), Cancel(), Restore(), Finish()]),
    st.sampled_from([PreparationDone(), FreezeDone(), CancelDone(), FinishDone()]),
    st.builds(GateOk, st.sampled_from([*PHASE_TARGETS.values(), "x.target"])),
    st.builds(GateFailed, st.sampled_from(list(PHASE_TARGETS.values())), st.just("failed")),
    st.sampled_from(FAILURE_WITH_REASON).map(lambda cls: cls("boom")),
    st.builds(Timeout, st.sampled_from(list(Phase))),
    st.builds(Recovered, st.sampled_from(list(KernelState))),
)


def accepted_events(phase: Phase) -> list[Event]:
    """Events of every type the table accepts in ``phase``, made to be about ``phase``."""
    events: list[Event] = []
    for (rule_phase, event_type), _ in TRANSITIONS.items():
        if rule_phase is not phase:
            continue
        if event_type is Recovered:
            events.extend(Recovered(state) for state in KernelState)
        else:
            events.append(sample(event_type, phase))
    return events


# The happy path, phase by phase (sequences take these often, so they reach rebooting and idle).
FORWARD: dict[Phase, list[Event]] = {
    P.IDLE: [Prepare(), Recovered(KernelState.UPDATED)],
    P.PREPARING: [GateOk(PREPARE_T), PreparationDone()],
    P.PREPARED: [Execute(), Coordinate()],
    P.COORDINATING: [SlotTaken()],
    P.FREEZING: [GateOk(FREEZE_T), FreezeDone()],
    P.REBOOTING: [RebootFailed("EAGAIN"), RebootFailedAfterFreeze("EAGAIN")],
    P.CANCELLING: [CancelDone()],
    P.UPDATED: [Restore()],
    P.RESTORING: [GateOk(RESTORE_T)],
    P.RESTORED: [Finish()],
    P.FINISHING: [GateOk(FINISH_T), FinishDone()],
}


def is_accepted(phase: Phase, event: Event) -> bool:
    if (phase, type(event)) not in TRANSITIONS:
        return False
    if isinstance(event, Timeout):
        return event.phase is phase
    if isinstance(event, GateOk | GateFailed):
        return event.target == PHASE_TARGETS.get(phase)
    return True


KERNEL_WORK = {
    KernelPrepare: P.PREPARING,
    PreserveRegistered: P.PREPARING,
    PreserveMetadata: P.PREPARING,
    TakeSlot: P.COORDINATING,
    KernelFreeze: P.FREEZING,
    KernelReboot: P.REBOOTING,
    KernelCancel: P.CANCELLING,
    KernelFinish: P.FINISHING,
}


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_generated_sequences_keep_the_invariants(data: st.DataObject) -> None:
    phase = P.IDLE
    visited_since_idle: list[Phase] = [phase]
    for _ in range(data.draw(st.integers(min_value=1, max_value=60), label="length")):
        # Forward events half the time (to get deep), other accepted events (failures, cancels)
        # and sometimes anything at all (to exercise rejections).
        kind = data.draw(st.sampled_from(["forward"] * 5 + ["accepted"] * 3 + ["any"] * 2))
        choices = {
            "forward": st.sampled_from(FORWARD[phase]),
            "accepted": st.sampled_from(accepted_events(phase)),
            "any": ANY_EVENT,
        }
        event = data.draw(choices[kind], label=f"event in {phase}")
        if not is_accepted(phase, event):
            with pytest.raises(PhaseError):  # rejected: no Step, so nothing to run
                step(phase, event)
            continue
        result = step(phase, event)
        # The same input always gives the same output (pure).
        assert step(phase, event) == result
        # Never reach rebooting without prepared then freezing (directly before).
        if result.next is P.REBOOTING:
            assert phase is P.FREEZING
            assert P.PREPARED in visited_since_idle
        # Cancelling always leads to idle on CancelDone.
        if phase is P.CANCELLING and isinstance(event, CancelDone):
            assert result == Step(P.IDLE)
        # No jump between the two kernels except Recovered at start-up.
        if is_pre_reboot(phase):
            assert not is_post_reboot(result.next)
        if is_post_reboot(phase):
            assert not is_pre_reboot(result.next)
        # Failures are reported first, exactly once; nothing else reports.
        reports = [e for e in result.effects if isinstance(e, ReportFailure)]
        if isinstance(event, FAILURES):
            assert result.effects[0] == ReportFailure(phase, type(event).__name__, event.reason)
            assert len(reports) == 1
        elif not isinstance(event, Recovered):
            assert reports == []
        # Kernel work only happens in the phase it belongs to; targets match the entered phase.
        for effect in result.effects:
            if type(effect) in KERNEL_WORK:
                assert KERNEL_WORK[type(effect)] is result.next, (phase, event, effect)
            if isinstance(effect, StartTarget):
                assert effect.target_name == PHASE_TARGETS[result.next]
        phase = result.next
        visited_since_idle = [phase] if phase is P.IDLE else [*visited_since_idle, phase]
