"""The service and target units as systemd sees them: readiness and status from the agent, phase
targets that refuse a stray manual start, the /run state file for Condition…=/Assert…=."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from luo_agent.testbed import Testbed

from .conftest import DATA_SIZE, needs_sandbox
from .liveupdate_flow import unit_property, wait_until

pytestmark = [needs_sandbox, pytest.mark.systemd]

PHASE_TARGETS = ["prepare", "freeze", "cancel", "restore", "finish"]


@pytest.fixture
def bed(tmp_path: Path) -> Iterator[Testbed]:
    bed = Testbed(tmp_path / "host", "session", size=DATA_SIZE)
    bed.machine.boot()
    yield bed
    bed.machine.poweroff()


def test_agent_is_ready_with_status_watchdog_and_state_file(bed: Testbed) -> None:
    with contextlib.ExitStack() as stack:
        box = bed.boot_sandbox(stack)
        # Type=notify: `systemctl start` returned only after READY=1, with a STATUS= line.
        assert unit_property(box, "luo-agent.service", "ActiveState") == "active"
        assert "phase: idle" in unit_property(box, "luo-agent.service", "StatusText")
        assert unit_property(box, "luo-agent.service", "WatchdogUSec") != "0"
        # The phase published for units' Condition…=/Assert…= on every kernel.
        state = box.run(["cat", "/run/luo-agent/state"]).stdout
        assert state == "idle\n"


@pytest.mark.parametrize("phase", PHASE_TARGETS)
def test_a_manual_start_of_a_phase_target_fails_loudly(bed: Testbed, phase: str) -> None:
    with contextlib.ExitStack() as stack:
        box = bed.boot_sandbox(stack, start=("luo-agent.service",))
        proc = box.systemctl("start", f"liveupdate-{phase}.target", check=False)
        assert proc.returncode != 0
        assert unit_property(box, f"liveupdate-{phase}.target", "AssertResult") == "no"
        assert unit_property(box, f"liveupdate-{phase}.target", "ActiveState") == "inactive"


def test_status_follows_the_phase(bed: Testbed) -> None:
    with contextlib.ExitStack() as stack:
        box = bed.boot_sandbox(stack)
        bed.ctl(box, "prepare", "--id", "units-1", "--wait")
        wait_until(
            "STATUS= shows prepared",
            lambda: "prepared" in unit_property(box, "luo-agent.service", "StatusText") or None,
        )
        assert box.run(["cat", "/run/luo-agent/state"]).stdout == "prepared\n"
        bed.ctl(box, "cancel")
        wait_until(
            "STATUS= back to idle",
            lambda: "idle" in unit_property(box, "luo-agent.service", "StatusText") or None,
        )
