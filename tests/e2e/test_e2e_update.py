"""A whole live update on each kernel backend, with a real systemd user manager running the
project's own units: prepare gate, freeze gate, emulated kexec, a fresh "boot" over the same
machine state, restore (the example participant verifies its memfd byte for byte), finish."""

from __future__ import annotations

import contextlib
import json

import pytest

from luo_agent.testbed import Testbed

from .conftest import needs_sandbox
from .liveupdate_flow import ctl_json, expected_data, restore_and_verify, status, unit_property

pytestmark = [pytest.mark.systemd, pytest.mark.root, needs_sandbox]


def test_whole_update_through_liveupdatectl(testbed: Testbed) -> None:
    update_id = f"e2e-cli-{testbed.abi}"
    with contextlib.ExitStack() as first_boot:
        box = testbed.boot_sandbox(first_boot)
        before = status(testbed, box)
        assert before["Phase"] == "idle" and before["KernelAbi"] == testbed.abi
        result = ctl_json(
            testbed,
            box,
            "update",
            "--id",
            update_id,
            "--kernel",
            str(testbed.kernel_image),
            "--cmdline",
            "console=ttyS0",
            "--wait",
            "--timeout",
            "30",
        )
        assert result["type"] == "result" and result["phase"] == "rebooting", result
        # The prepare participant handed its memfd in and wrote what it expects back.
        assert unit_property(box, "luo-example-prepare.service", "Result") == "success"
        expected = expected_data(testbed)
        testbed.machine.wait_down(timeout=30)
        image = json.loads((testbed.machine.root / ".luo-emu/machine.json").read_text())
        assert image["abi"] == testbed.abi
    # The first sandbox is gone (the ExitStack raised if anything survived): boot again.
    testbed.machine.boot()
    view = testbed.machine.inspect()
    assert view["liveupdate_count"] == 1
    assert f"luo_agent.update={update_id}" in view["cmdline"]
    restore_and_verify(testbed, update_id, expected)
