"""The differential vectors (tests/kernel/vectors.py) on the emulator: two fresh g6 machines give
identical traces, every vector meets its own expectations and leaves the kernel clean, and
``compare`` really reports a changed errno, byte or size."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from luo_agent.kernel.device import Abi
from tests.kernel import vectors as vec

PROJECT = Path(__file__).resolve().parents[2]


def _wait_clean(machine: Any, name: str, incoming_too: bool = False) -> None:
    """No outgoing session, device closed (closes reach the server asynchronously)."""
    deadline = time.monotonic() + 5.0
    while True:
        snap = machine.inspect()
        dirty = snap["outgoing_sessions"] or snap["device_open"]
        if incoming_too:
            dirty = dirty or snap["incoming_sessions"]
        if not dirty:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} left the kernel dirty: {snap}")
        time.sleep(0.02)


def _run(tmp_path: Path, tag: str, profile: str = "g6") -> dict[str, Any]:
    from luo_agent.kernel.emulator import EmulatedMachine

    with EmulatedMachine(tmp_path / tag, Abi.SESSION, profile) as machine:
        machine.boot()
        traces = vec.run_emulated_all(machine, after_vector=lambda name: _wait_clean(machine, name))
        _wait_clean(machine, "the whole run", incoming_too=True)
    return traces


@pytest.fixture(scope="module")
def g6_traces(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("vectors")
    return _run(tmp, "a"), _run(tmp, "b")


def test_two_g6_machines_give_identical_traces(
    g6_traces: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    a, b = g6_traces
    assert vec.compare(a, b) == []
    names = {v.name for v in vec.all_vectors() if not v.kexec}
    names |= {f"{v.name}/{i}" for v in vec.all_vectors() if v.kexec for i in (1, 2)}
    assert set(a) == names
    json.dumps(a)  # JSON-able


def test_every_vector_meets_its_7_2_expectations_on_g6(
    g6_traces: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    a, _ = g6_traces
    unexpected = [
        f"{name} step {i} {step.get('what', step['op'])}: {step['result']} ({step['unexpected']})"
        for name, steps in a.items()
        for i, step in enumerate(steps)
        if "unexpected" in step
    ]
    assert unexpected == []


def test_fd_numbers_never_appear_in_traces(
    g6_traces: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    a, _ = g6_traces
    retrieved = [
        step["arg"]
        for steps in a.values()
        for step in steps
        if step["op"] == "ioctl" and step.get("new")
    ]
    assert retrieved and all("<" in arg for arg in retrieved)


def _first(trace: dict[str, Any], name: str, what: str) -> dict[str, Any]:
    return next(s for s in trace[name] if s.get("what") == what)


def test_compare_reports_a_changed_errno(
    g6_traces: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    a, _ = g6_traces
    b = copy.deepcopy(a)
    _first(b, "session.get-name", "size 71")["result"] = "E2BIG"
    diffs = vec.compare(a, b)
    assert len(diffs) == 1 and "session.get-name" in diffs[0] and "'EINVAL' != 'E2BIG'" in diffs[0]


def test_compare_reports_a_changed_byte(g6_traces: tuple[dict[str, Any], dict[str, Any]]) -> None:
    a, _ = g6_traces
    b = copy.deepcopy(a)
    step = _first(b, "session.get-name", "past")
    step["arg"] = step["arg"][:-2] + "de"
    diffs = vec.compare(a, b)
    assert len(diffs) == 1 and "arg" in diffs[0]


def test_compare_reports_a_changed_size_and_a_missing_vector(
    g6_traces: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    a, _ = g6_traces
    b = copy.deepcopy(a)
    inspect = next(s for s in b["kexec.contents/2"] if s["op"] == "inspect")
    inspect["fd"]["size"] += 1
    del b["device.open-close"]
    diffs = vec.compare(a, b)
    assert any("kexec.contents/2" in d and "fd.size" in d for d in diffs)
    assert "device.open-close: only in A" in diffs
    assert len(diffs) == 2


def test_the_6_19_profile_differs_where_7_2_changed_it(
    tmp_path: Path, g6_traces: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    """The vectors see real ABI differences: 6.19 has no GET_NAME and accepts empty names."""
    old = _run(tmp_path, "old", profile="6.19")
    diffs = vec.compare(g6_traces[0], old)
    assert any("GET_NAME" in d for d in diffs)
    assert any("create.names" in d for d in diffs)


def test_cli_stages_in_two_processes_match_one_run(
    tmp_path: Path, g6_traces: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    """Stage 1 kexecs and exits; stage 2 is a new process in the next (emulated) boot."""
    image = tmp_path / "bzImage"
    image.write_bytes(b"MZ not really a kernel\n" * 64)
    root = str(tmp_path / "m")
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}

    def cli(*args: str) -> None:
        proc = subprocess.run(
            [sys.executable, "-m", "tests.kernel.vectors", *args],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            cwd=PROJECT,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr

    s1, s2 = tmp_path / "s1.json", tmp_path / "s2.json"
    cli("run", "--stage", "1", "--out", str(s1), "--emulated", root, "--kexec", str(image))
    cli("run", "--stage", "2", "--out", str(s2), "--emulated", root)
    merged = json.loads(s1.read_text())["vectors"] | json.loads(s2.read_text())["vectors"]
    assert vec.compare(merged, g6_traces[0]) == []
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({"vectors": g6_traces[0]}))
    cli("compare", f"{s1},{s2}", str(ref))
