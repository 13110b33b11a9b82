"""The participant kit under a real systemd user manager.

The smallest participants of docs/participants.md (luo_agent/examples/counter.py and, in shell,
counter.sh under ``liveupdatectl keep``): one Type=notify unit each, no hook units.  After the
kexec the restore gate starts them and waits for their READY=1, they count on from what they had,
and once the update is over the kit has handed their memfds in again for the next one.  And the
full hook model with one template unit whose instance names the phase."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from luo_agent.sandbox import Sandbox
from luo_agent.testbed import COUNTER_UNITS, Testbed

from .conftest import DATA_SIZE, needs_sandbox
from .liveupdate_flow import ctl_json, wait_until, wait_update_ended

pytestmark = [pytest.mark.systemd, pytest.mark.root, needs_sandbox]
SESSIONS = {"counter", "counter-sh"}


@pytest.fixture
def session_bed(tmp_path: Path) -> Iterator[Testbed]:
    bed = Testbed(tmp_path / "host", "session", size=DATA_SIZE)
    bed.machine.boot()
    try:
        yield bed
    finally:
        bed.machine.poweroff()


def handed_in(bed: Testbed, box: Sandbox) -> set[str]:
    rows = ctl_json(bed, box, "sessions")["sessions"]
    return {r["session"] for r in rows if r["state"] == "registered"}


def test_counters_survive_an_update_with_no_hook_units(session_bed: Testbed) -> None:
    bed = session_bed
    update_id = "counted"
    with contextlib.ExitStack() as first_boot:
        box = bed.boot_sandbox(
            first_boot, enable=COUNTER_UNITS, start=["luo-agent.service", *COUNTER_UNITS]
        )
        wait_until("both counters handed in", lambda: handed_in(bed, box) == SESSIONS)
        for unit in COUNTER_UNITS:
            assert "starting at 0\n" in box.journal(unit), box.journal(unit)
        result = ctl_json(
            bed, box, "update", "--id", update_id, "--kernel", str(bed.kernel_image),
            "--cmdline", "console=ttyS0", "--wait", "--timeout", "30",
        )  # fmt: skip
        assert result["phase"] == "rebooting", result
        bed.machine.wait_down(timeout=30)
    bed.machine.boot()
    with contextlib.ExitStack() as second_boot:
        # Only the agent is started: the restore gate pulls the counters in and waits for them.
        box = bed.boot_sandbox(second_boot, enable=COUNTER_UNITS, start=["luo-agent.service"])
        entry = wait_update_ended(bed, box, update_id)
        assert entry["result"] == "success", entry
        for unit in COUNTER_UNITS:
            started = re.findall(r"starting at (\d+)( after live update \S+)?", box.journal(unit))
            # The first boot's start, then this boot's: on from where it was, and it knows why.
            assert len(started) == 2, box.journal(unit)
            assert int(started[1][0]) > 0 and started[1][1] == f" after live update {update_id}"
        # Over: the kit handed both memfds in again, for the next update.
        wait_until("both counters handed in again", lambda: handed_in(bed, box) == SESSIONS)


# The full hook model with one template unit: the instance names the phase (docs/participants.md).
HOOK_TEMPLATE = """[Unit]
Description=kit test: %i hook
DefaultDependencies=no
Before=liveupdate-%i.target
PartOf=liveupdate-%i.target

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo %i >> {log}; test %i != prepare || test ! -e {fail}'

[Install]
RequiredBy=liveupdate-%i.target
"""


def test_one_template_unit_hooks_every_phase(session_bed: Testbed, tmp_path: Path) -> None:
    bed, log, fail = session_bed, tmp_path / "hooks.log", tmp_path / "fail-prepare"
    hooks = [f"kit-hook@{phase}.service" for phase in ("prepare", "cancel", "freeze")]
    with contextlib.ExitStack() as boot:
        box = bed.boot_sandbox(
            boot,
            extra_units={"kit-hook@.service": HOOK_TEMPLATE.format(log=log, fail=fail)},
            enable=hooks,
        )
        result = ctl_json(bed, box, "prepare", "--id", "one", "--wait", "--timeout", "30")
        assert result["phase"] == "prepared", result
        assert ctl_json(bed, box, "cancel")["type"] == "result"
        wait_update_ended(bed, box, "one")
        assert log.read_text().split() == ["prepare", "cancel"]
        # A failing prepare hook fails the gate, and the cancel hook runs after it.
        fail.touch()
        result = ctl_json(bed, box, "prepare", "--id", "two", "--wait", "--timeout", "30")
        entry = wait_update_ended(bed, box, "two")
        assert entry["result"] == "failed" and "kit-hook@prepare.service" in entry["message"]
        assert log.read_text().split() == ["prepare", "cancel", "prepare", "cancel"]
