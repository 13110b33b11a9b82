"""The shipped unit's hardening is really applied by a real systemd (the test bed's user manager)
and the agent still serves under it: two capabilities, no new privileges, a seccomp filter, its own
network namespace and /tmp."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from luo_agent.sandbox import missing_requirements
from luo_agent.testbed import Testbed

SANDBOX_UNAVAILABLE = missing_requirements()
CAP_SYS_ADMIN = 21
CAP_SYS_BOOT = 22


def status_fields(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


@pytest.mark.skipif(
    SANDBOX_UNAVAILABLE is not None,
    reason=f"real systemd user manager unavailable: {SANDBOX_UNAVAILABLE}",
)
def test_the_agent_runs_confined(tmp_path: Path) -> None:
    bed = Testbed(tmp_path / "host", "session")
    bed.machine.boot()
    try:
        with contextlib.ExitStack() as stack:
            sandbox = bed.boot_sandbox(stack, enable=[], start=["luo-agent.service"])
            pid = int(
                sandbox.systemctl(
                    "show", "-p", "MainPID", "--value", "luo-agent.service"
                ).stdout.strip()
            )
            status = status_fields(pid)
            assert int(status["CapBnd"], 16) == (1 << CAP_SYS_ADMIN) | (1 << CAP_SYS_BOOT)
            assert status["NoNewPrivs"] == "1"
            assert status["Seccomp"] == "2"  # filter mode: syscall filter, MDWE, personality
            assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
            assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink(
                f"/proc/{sandbox.manager_pid}/ns/mnt"
            )
            # And it still does its job: the API answers through the CLI.
            assert "idle" in bed.ctl(sandbox, "status")
    finally:
        bed.machine.poweroff()
