"""A live update in two separate processes on every emulated generation: process 1 preserves a
1 MiB memfd (and one that is never retrieved) and kexecs; the machine boots again; process 2
retrieves the memfd and finishes.  Bytes, size and file position must survive; the unretrieved
memfd must be gone after finish."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from luo_agent.kernel.device import Abi
from tests.kernel.luo_raw import Target

PROJECT = Path(__file__).resolve().parents[2]
STAGE = Path(__file__).with_name("roundtrip_stage.py")


def run_stage(*args: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    proc = subprocess.run(
        [sys.executable, str(STAGE), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=PROJECT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


@pytest.fixture(params=[Abi.RFC_V2, Abi.V3, "session:6.19", "session:g6"])
def machine_target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    from luo_agent.kernel.emulator import EmulatedMachine

    abi, _, profile = request.param.partition(":")
    with EmulatedMachine(tmp_path / "m", abi, profile or None) as machine:
        machine.boot()
        yield Target(
            id=request.param, abi=abi, profile=profile or None, sc=machine.syscalls, machine=machine
        )


def test_roundtrip_in_two_processes(machine_target: Target, kexec_image: Path) -> None:
    t = machine_target
    root = t.sc.path("/").rstrip("/")
    before = run_stage("stage1", root, t.abi, str(kexec_image))
    assert before["size"] == 1 << 20 and before["pos"] == 12345
    t.machine.wait_down(10.0)
    assert not t.machine.running
    t.machine.boot()
    assert Path(t.sc.path("/proc/cmdline")).read_text() == "luo_emu liveupdate=1 roundtrip\n"

    carried = t.machine.inspect()
    if t.abi == Abi.SESSION:
        [incoming] = carried["incoming_sessions"]
        carried_tokens = [f["token"] for f in incoming["files"]]
    else:
        carried_tokens = [f["token"] for f in carried["incoming_files"]]
    assert sorted(carried_tokens) == sorted([before["token"], before["other_token"]])

    after = run_stage("stage2", root, t.abi, str(before["token"]), str(before["other_token"]))
    assert after["pid"] != before["pid"]
    assert (after["sha256"], after["size"], after["pos"]) == (
        before["sha256"],
        before["size"],
        before["pos"],
    )
    assert after["cloexec"] is True
    if t.abi == Abi.SESSION:
        assert after["other_errno"] == "ENOENT"
    else:
        # After FINISH the state is NORMAL; the emulator checks the state before the token and
        # documents EBUSY for FD_RESTORE outside UPDATED (kernel-abi.md is silent).
        assert after["other_errno"] == "EBUSY"
    snapshot = t.machine.inspect()
    assert snapshot["liveupdate_count"] == 1
    if t.abi == Abi.SESSION:
        # finished and closed: the incoming session and its unretrieved file are gone
        assert snapshot["incoming_sessions"] == [], snapshot
    else:
        assert snapshot["incoming_files"] == [], snapshot
        assert snapshot["state"] == "normal"
