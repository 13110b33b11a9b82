"""Disk full and read-only file systems under the agent's state (history) and runtime
(current.json, published phase) directories (issue 6 item 6), on every kernel backend.

The agent runs in a child process inside a private mount namespace, so that the tiny tmpfs
mounts it fills or remounts read-only are nobody else's business (persist_scenario.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from luo_agent.kernel.device import Abi
from luo_agent.kernel.emulator import EmulatedMachine
from luo_agent.testbed import REPO

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare(1) for a private mount namespace",
)


@pytest.fixture(params=[Abi.SESSION, Abi.V3, Abi.RFC_V2])
def machine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EmulatedMachine]:
    m = EmulatedMachine(tmp_path / "machine", str(request.param))
    m.boot()
    try:
        yield m
    finally:
        m.poweroff()


@pytest.mark.parametrize("fault", ["full", "readonly"])
def test_unwritable_state_never_corrupts_and_recovers(
    machine: EmulatedMachine, tmp_path: Path, fault: str
) -> None:
    proc = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            sys.executable,
            "-m",
            "tests.faults.persist_scenario",
            "--abi",
            machine.abi,
            "--machine",
            str(machine.root),
            "--work",
            str(tmp_path / "agent"),
            "--fault",
            fault,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    during, after = out["during"], out["after"]
    if machine.abi == Abi.RFC_V2:
        # The kernel-made metadata token must reach the state directory before the kexec:
        # without it the next boot could not find the update, so prepare refuses.
        assert during["result"] == "failed", during
        assert "cannot write" in during["message"], during
        assert "prepared" not in during["phases"], during
    else:
        # The update itself does not need the disk: it runs, only the records are lost.
        assert during["result"] == "cancelled", during
        assert "prepared" in during["phases"], during
    assert during["kernel"] == "normal"
    # What was on disk before the fault is intact; the lost entry is not half-written.
    assert out["history_during"] == ["before-fault"], out
    # Once the disk is writable again everything is recorded again.
    assert after["result"] == "cancelled" and after["kernel"] == "normal", after
    assert out["history_after"] == ["before-fault", "after-fault"], out
    assert out["state_file"] == "idle\n"
