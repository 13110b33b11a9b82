"""``systemctl start liveupdate.service`` (the project's oneshot unit) runs a whole update, and
fails with the real reason (the participant's name) when a phase gate fails."""

from __future__ import annotations

import contextlib
import re

import pytest

from luo_agent.testbed import Testbed

from .conftest import needs_sandbox
from .liveupdate_flow import (
    expected_data,
    kernel_is_clean,
    participant,
    restore_and_verify,
    status,
    unit_property,
    wait_update_ended,
)

pytestmark = [pytest.mark.systemd, pytest.mark.root, needs_sandbox]

ONESHOT = "liveupdate.service"


def test_oneshot_unit_runs_the_update_end_to_end(testbed: Testbed) -> None:
    with contextlib.ExitStack() as first_boot:
        box = testbed.boot_sandbox(first_boot)
        started = box.systemctl("start", ONESHOT, check=False)
        assert started.returncode == 0, (started.stderr, box.journal(ONESHOT))
        assert unit_property(box, ONESHOT, "Result") == "success"
        testbed.machine.wait_down(timeout=30)
        expected = expected_data(testbed)
    testbed.machine.boot()
    # The update id the oneshot generated reached the new kernel's command line.
    marker = re.search(r"luo_agent\.update=(\S+)", testbed.machine.inspect()["cmdline"])
    assert marker is not None
    assert f"update {marker[1]}: rebooting" in box.journal(ONESHOT)
    restore_and_verify(testbed, marker[1], expected)


def test_oneshot_unit_fails_with_the_participant_named(testbed: Testbed) -> None:
    failing = "e2e-failing-prepare.service"
    units = {failing: participant("liveupdate-prepare.target", "/bin/false", "e2e: fails")}
    with contextlib.ExitStack() as boot:
        box = testbed.boot_sandbox(
            boot, extra_units=units, enable=("luo-example-prepare.service", failing)
        )
        started = box.systemctl("start", ONESHOT, check=False)
        assert started.returncode != 0
        assert unit_property(box, ONESHOT, "Result") == "exit-code"
        assert unit_property(box, ONESHOT, "ExecMainStatus") == "1"
        shown = box.systemctl("status", ONESHOT, check=False)
        assert "status=1/FAILURE" in shown.stdout, shown.stdout
        # The unit's log says why: the update failed in the prepare gate because of this unit.
        log = box.journal(ONESHOT)
        failed = re.search(r"update (\S+): failed: .*" + re.escape(failing), log)
        assert failed is not None, log
        entry = wait_update_ended(testbed, box, failed[1])
        assert entry["result"] == "failed" and failing in entry["message"], entry
        assert status(testbed, box)["Phase"] == "idle"
        assert kernel_is_clean(testbed.machine.inspect())
        assert testbed.machine.running
