"""SIGKILL of the agent while an update is prepared: the update is aborted in the kernel (each ABI
in its own way, checked through the emulated kernel's state) and the agent that systemd restarts
(Restart=on-failure) reports it."""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any

import pytest

from luo_agent.kernel.device import Abi
from luo_agent.testbed import Testbed

from .conftest import needs_sandbox
from .liveupdate_flow import (
    ctl_json,
    kernel_is_clean,
    main_pid,
    status,
    unit_property,
    wait_until,
    wait_update_ended,
)

pytestmark = [pytest.mark.systemd, pytest.mark.root, needs_sandbox]

AGENT = "luo-agent.service"


def test_sigkill_while_prepared_aborts_and_is_reported(testbed: Testbed) -> None:
    machine = testbed.machine
    update_id = f"e2e-kill-{testbed.abi}"
    with contextlib.ExitStack() as boot:
        box = testbed.boot_sandbox(boot)
        testbed.ctl(box, "load-kernel", str(testbed.kernel_image))
        prepared = ctl_json(testbed, box, "prepare", "--id", update_id, "--wait")
        assert prepared["phase"] == "prepared", prepared
        view = machine.inspect()
        if testbed.abi == Abi.SESSION:
            assert len(view["outgoing_sessions"]) >= 2  # the example's and the agent's metadata
        else:
            assert view["state"] == "prepared" and len(view["files"]) >= 2

        victim = main_pid(box, AGENT)
        assert victim > 0
        os.kill(victim, signal.SIGKILL)

        # The kernel's own reaction to the handle closing, before any agent runs again.
        def released() -> dict[str, Any] | None:
            snapshot = machine.inspect()
            return None if snapshot["device_open"] else snapshot

        match testbed.abi:
            case Abi.SESSION:
                # The outgoing sessions died with the process that held them.
                gone = wait_until(
                    "the outgoing sessions to close",
                    lambda: not machine.inspect()["outgoing_sessions"],
                )
                assert gone
            case Abi.V3:
                # Closing the device dropped every outgoing file; the state is still PREPARED
                # until an agent cancels it.
                wait_until(
                    "the preserved files to be dropped", lambda: not machine.inspect()["files"]
                )
            case Abi.RFC_V2:
                # rfc-v2 keeps everything on close: the stale PREPARED waits for the next agent.
                dead = wait_until("the device to be released", released)
                assert dead["state"] == "prepared" and len(dead["files"]) >= 2, dead

        # systemd restarts the agent; it finds the dead update and reports it.
        wait_until(
            "the agent to be restarted",
            lambda: main_pid(box, AGENT) not in (0, victim) and status(testbed, box),
        )
        assert int(unit_property(box, AGENT, "NRestarts")) == 1
        entry = wait_update_ended(testbed, box, update_id)
        assert entry["result"] == "aborted", entry
        assert entry["error-name"] == "org.luoagent.LiveUpdate1.Error.Aborted", entry
        assert entry["message"], entry
        props = status(testbed, box)
        assert props["CurrentUpdate"] == ""
        # Whatever the ABI, the kernel is back to normal with nothing preserved.
        view = machine.inspect()
        assert kernel_is_clean(view), view
        assert view["device_open"] == (testbed.abi != Abi.SESSION)
        assert view["liveupdate_count"] == 0
        # And a new update may start (the id of the aborted one stays used).
        again = ctl_json(testbed, box, "prepare", "--id", f"{update_id}-again", "--wait")
        assert again["phase"] == "prepared", again
        testbed.ctl(box, "cancel")
        wait_update_ended(testbed, box, f"{update_id}-again")
