"""A participant that fails (or hangs past the phase timeout) cancels the update: the cancel target
runs, the emulated kernel is back to normal with nothing preserved, and every public report (the
command's result, LastResult, the history) names the participant."""

from __future__ import annotations

import concurrent.futures
import contextlib
from pathlib import Path
from typing import Any

import pytest

from luo_agent.sandbox import Sandbox
from luo_agent.testbed import Testbed

from .conftest import needs_sandbox
from .liveupdate_flow import (
    ctl_json,
    kernel_is_clean,
    participant,
    status,
    unit_property,
    wait_until,
    wait_update_ended,
)

pytestmark = [pytest.mark.systemd, pytest.mark.root, needs_sandbox]

CANCEL_TARGET = "liveupdate-cancel.target"
CANCEL_WITNESS = "e2e-cancel-witness.service"


def cancel_witness(marker: Path) -> dict[str, str]:
    """A cancel participant that leaves a line in ``marker`` each time the cancel target runs."""
    return {
        CANCEL_WITNESS: participant(
            CANCEL_TARGET, f"/bin/sh -c 'echo cancelled >> {marker}'", "e2e: cancel witness"
        )
    }


def run_update(bed: Testbed, box: Sandbox, update_id: str) -> dict[str, Any]:
    return ctl_json(
        bed,
        box,
        "update",
        "--id",
        update_id,
        "--kernel",
        str(bed.kernel_image),
        "--wait",
        "--timeout",
        "60",
    )


def kernel_holds_update(view: dict[str, Any]) -> bool:
    if view["generation"] == "session":
        return bool(view["outgoing_sessions"])
    return view["state"] == "prepared" and bool(view["files"])


def assert_cancelled_naming(
    bed: Testbed, box: Sandbox, update_id: str, unit: str, result: dict[str, Any]
) -> None:
    # The command's own result: the update failed, and says which participant.
    assert result["type"] == "result" and result["result"] == "failed", result
    assert unit in str(result["message"]), result
    entry = wait_update_ended(bed, box, update_id)
    assert entry["result"] == "failed", entry
    assert unit in entry["message"], entry
    phases = [t[0] for t in entry["timings"]]
    assert "cancelling" in phases and "rebooting" not in phases, phases
    props = status(bed, box)
    assert props["CurrentUpdate"] == ""
    assert ctl_json(bed, box, "sessions")["sessions"] == []
    # The kernel was never left holding anything, and nothing rebooted.
    view = bed.machine.inspect()
    assert kernel_is_clean(view), view
    assert view["liveupdate_count"] == 0
    assert bed.machine.running


@pytest.mark.parametrize("phase", ["prepare", "freeze"])
def test_failing_participant_cancels_the_update(testbed: Testbed, phase: str) -> None:
    target = f"liveupdate-{phase}.target"
    failing = f"e2e-failing-{phase}.service"
    marker = testbed.workdir / "cancel-ran"
    says = "/bin/sh -c 'echo no space left for the snapshot >&2; exit 1'"
    units = {failing: participant(target, says, f"e2e: fails in {phase}")}
    units |= cancel_witness(marker)
    update_id = f"e2e-fail-{phase}-{testbed.abi}"
    with contextlib.ExitStack() as boot:
        box = testbed.boot_sandbox(
            boot,
            extra_units=units,
            enable=("luo-example-prepare.service", failing, CANCEL_WITNESS),
        )
        if phase == "prepare":
            result = run_update(testbed, box, update_id)
        else:
            testbed.ctl(box, "load-kernel", str(testbed.kernel_image))
            prepared = ctl_json(testbed, box, "prepare", "--id", update_id, "--wait")
            assert prepared["phase"] == "prepared", prepared
            # The kernel holds the update (the example's memfd and the agent's metadata) ...
            assert kernel_holds_update(testbed.machine.inspect())
            result = ctl_json(testbed, box, "execute", "--wait", "--timeout", "60")
        # ... and after the cancel it holds nothing (checked in assert_cancelled_naming).
        assert_cancelled_naming(testbed, box, update_id, failing, result)
        assert "exit-code" in result["message"], result
        assert marker.read_text() == "cancelled\n"
        assert unit_property(box, failing, "Result") == "exit-code"
        # status names it first, with its own last words.
        text = testbed.ctl(box, "status")
        lines = text.splitlines()
        heading = next(i for i, line in enumerate(lines) if line.startswith("Participants:"))
        first = lines[heading + 1]
        assert first.split() == [failing, "failed/failed", "result=exit-code", "<-", "failed"]
        assert f"last log lines of {failing}:\n    no space left for the snapshot" in text, text
        # The gates were reset: the cancel target is no longer active, so the next cancel runs
        # its participants again.
        assert unit_property(box, CANCEL_TARGET, "ActiveState") == "inactive"


def test_participant_hanging_past_the_timeout_cancels_the_update(testbed: Testbed) -> None:
    hanging = "e2e-hanging-prepare.service"
    marker = testbed.workdir / "cancel-ran"
    testbed.config_file.write_text("[timeouts]\nprepare = 6\n")
    units = {
        hanging: participant(
            "liveupdate-prepare.target", "/bin/sleep infinity", "e2e: hangs in prepare"
        )
    }
    units |= cancel_witness(marker)
    update_id = f"e2e-hang-{testbed.abi}"
    with contextlib.ExitStack() as boot:
        box = testbed.boot_sandbox(
            boot,
            extra_units=units,
            enable=("luo-example-prepare.service", hanging, CANCEL_WITNESS),
        )
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            running = pool.submit(run_update, testbed, box, update_id)

            # While the gate hangs, status names the unit holding it, first, still running (the
            # example's hook finishes meanwhile and goes after it).
            def holder() -> list[Any] | None:
                props = status(testbed, box)
                shown = props.get("Participants") or [[""]]
                if props.get("Phase") == "preparing" and shown[0][0] == hanging:
                    return list(props["Participants"])
                return None

            shown = wait_until("status to name the holder first", holder, timeout=5)
            assert shown[0][1] == "activating", shown
            assert [u[0] for u in shown] == [hanging, "luo-example-prepare.service"], shown
            text = testbed.ctl(box, "status")
            assert f"{hanging}" in text and "<- still running" in text, text
            result = running.result(timeout=60)
        assert_cancelled_naming(testbed, box, update_id, hanging, result)
        assert "TimedOut" in str(result["error"]), result
        # After the cancel gate, the unit that failed the update is still shown first.
        assert status(testbed, box)["Participants"][0][0] == hanging
        assert marker.read_text() == "cancelled\n"
        # The hung participant does not keep running after the update was cancelled.
        assert unit_property(box, hanging, "ActiveState") in ("inactive", "failed")
