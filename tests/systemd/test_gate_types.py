"""The gate port's value types (pure)."""

from __future__ import annotations

import pytest

from luo_agent.systemd.gate import GateOutcome, JobResult, UnitStatus, select_culprits

OK_ONESHOT = UnitStatus("ran.service", "inactive", "dead", "success")
FAILED = UnitStatus("bad.service", "failed", "failed", "exit-code")
HANGING = UnitStatus("hang.service", "activating", "start", "success")
ACTIVE = UnitStatus("up.service", "active", "running", "success")
NEVER_STARTED = UnitStatus("req.target", "inactive", "dead", "")


def test_job_result_keeps_unknown_values_from_systemd() -> None:
    assert JobResult("dependency") is JobResult.DEPENDENCY
    unknown = JobResult("collected")
    assert unknown == "collected"
    assert isinstance(unknown, JobResult)
    assert unknown != JobResult.DONE


def test_outcome_ok_only_when_done() -> None:
    assert GateOutcome("t.target", JobResult.DONE, ()).ok
    for result in ("canceled", "timeout", "failed", "dependency", "skipped", "assert"):
        assert not GateOutcome("t.target", JobResult(result), ()).ok


@pytest.mark.parametrize(
    ("result", "statuses", "culprits"),
    [
        (JobResult.DONE, (FAILED,), ()),
        (JobResult.DEPENDENCY, (OK_ONESHOT, FAILED, ACTIVE), (FAILED,)),
        # the failed unit first, then the one still running (failures_first)
        (JobResult.DEPENDENCY, (HANGING, FAILED), (FAILED, HANGING)),
        # nothing failed or hangs (e.g. a Requisite= never started): name the inactive ones
        (JobResult.DEPENDENCY, (ACTIVE, NEVER_STARTED), (NEVER_STARTED,)),
        (JobResult.ASSERT, (), ()),
    ],
)
def test_select_culprits(
    result: JobResult,
    statuses: tuple[UnitStatus, ...],
    culprits: tuple[UnitStatus, ...],
) -> None:
    assert select_culprits(result, statuses) == culprits
