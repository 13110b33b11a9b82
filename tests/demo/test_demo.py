"""The demo as a newcomer runs it (``python -m luo_agent.demo``, a subprocess): it passes on a busy
machine without reporting other people's processes as its leaks, its leak check does see what the
demo itself left behind, and the hints that ``--keep`` prints work exactly as printed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from luo_agent.sandbox import missing_requirements

REPO = Path(__file__).resolve().parents[2]
SANDBOX_UNAVAILABLE = missing_requirements()

pytestmark = [
    pytest.mark.systemd,
    pytest.mark.root,
    pytest.mark.skipif(
        SANDBOX_UNAVAILABLE is not None,
        reason=f"real systemd user manager unavailable: {SANDBOX_UNAVAILABLE}",
    ),
]

CLEAN = "==> cleaned up: no process left behind"
LEAK = "==> warning: processes left behind"


@pytest.fixture
def unrelated() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes of someone else on the machine, started while the demo runs."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        proc.kill()
        proc.wait()


def demo(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "luo_agent.demo", "--size", str(256 << 10), *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def read_until(proc: subprocess.Popen[str], marker: str, seen: list[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append(line.rstrip("\n"))
        if marker in line:
            return
    raise AssertionError(f"the demo ended before {marker!r}:\n" + "\n".join(seen))


def test_demo_passes_and_reports_no_leak_on_a_busy_machine(
    unrelated: list[subprocess.Popen[bytes]],
) -> None:
    proc = demo()
    seen: list[str] = []
    # Someone else starts processes during the demo and they outlive it: the old check (every
    # process on the machine, before and after) reported exactly these as the demo's leaks.
    read_until(proc, "1/6 cold boot", seen)
    unrelated.append(subprocess.Popen(["sleep", "300"]))
    read_until(proc, "4/6 the new boot", seen)
    unrelated.append(subprocess.Popen(["setsid", "sleep", "300"]))
    out, _ = proc.communicate(timeout=180)
    lines = seen + out.splitlines()
    assert proc.returncode == 0, "\n".join(lines)
    assert CLEAN in lines and not any(LEAK in line for line in lines), "\n".join(lines)
    assert all(p.poll() is None for p in unrelated)


# Enters the demo's own cgroup, leaves a process behind the way a leak would (detached: a new
# session, its parent gone), and prints what the check sees.
LEAKING_DEMO = """
import json, subprocess, sys
from luo_agent.demo import OwnCgroup
cgroup = OwnCgroup()
leak = subprocess.run(["setsid", "-f", "sh", "-c", "echo $$; exec sleep 300 >/dev/null 2>&1"],
                      capture_output=True, text=True, check=True)
print(json.dumps({"leak": int(leak.stdout), "seen": sorted(cgroup.processes()),
                  "path": str(cgroup.path)}), flush=True)
sys.stdin.readline()
cgroup.leave()
"""


def test_the_leak_check_sees_a_detached_process_of_the_demo_and_nothing_else(
    unrelated: list[subprocess.Popen[bytes]],
) -> None:
    unrelated.append(subprocess.Popen(["sleep", "300"]))
    proc = subprocess.Popen(
        [sys.executable, "-c", LEAKING_DEMO],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    try:
        report = json.loads(proc.stdout.readline())
        leak = report["leak"]
        try:
            assert report["seen"] == [leak]
            assert unrelated[0].pid not in report["seen"]
        finally:
            os.kill(leak, signal.SIGKILL)
    finally:
        proc.communicate("\n", timeout=30)
    cgroup = Path(report["path"])
    deadline = time.monotonic() + 10
    while cgroup.exists() and time.monotonic() < deadline:  # the killed leak may linger briefly
        time.sleep(0.05)
        try:
            cgroup.rmdir()
        except OSError:
            pass
    assert proc.returncode == 0 and not cgroup.exists()


def test_keep_prints_hints_that_work_as_printed(tmp_path: Path) -> None:
    proc = demo("--keep")
    seen: list[str] = []
    try:
        read_until(proc, "press Ctrl-C", seen)
        start = next(i for i, line in enumerate(seen) if "from another root shell" in line)
        hints = [line.removeprefix("    ") for line in seen[start + 1 : -1]]
        assert all(line.startswith("    ") for line in seen[start + 1 : -1]), hints
        # A root login shell elsewhere: no venv on PATH, the host's XDG_RUNTIME_DIR.
        shell = subprocess.run(
            ["bash", "-euc", "\n".join(hints)],
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
                 "XDG_RUNTIME_DIR": "/run/user/0"},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )  # fmt: skip
        assert shell.returncode == 0, shell.stdout + shell.stderr
        assert any(h.startswith("liveupdatectl ") for h in hints), hints
        assert "Phase:          idle" in shell.stdout  # liveupdatectl status
        assert "success" in shell.stdout  # liveupdatectl history
        assert "org.luoagent.LiveUpdate1.Manager" in shell.stdout  # busctl introspect
        assert "luo-agent.service" in shell.stdout  # systemctl list-units
        assert "luo-example-workload.service" in shell.stdout
    finally:
        proc.send_signal(signal.SIGTERM)  # the demo treats it as Ctrl-C
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert CLEAN in out.splitlines(), out


def test_your_participant_through_update_after_update(tmp_path: Path) -> None:
    """A newcomer's participant, written as docs/participants.md shows it (the counter and its
    unit, for a real machine), run by ``--participant DIR --keep``; a second update started from
    another shell with the printed command boots the emulated machine again."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "counter.py").write_text((REPO / "luo_agent/examples/counter.py").read_text())
    unit = (REPO / "units/luo-example-counter.service").read_text()
    unit = unit.replace("-m luo_agent.examples.counter", str(mine / "counter.py"))
    (mine / "counter.service").write_text(unit)
    proc = demo("--participant", str(mine), "--keep")
    seen: list[str] = []
    try:
        read_until(proc, "press Ctrl-C", seen)
        text = "\n".join(seen)
        assert "counter.service before the kexec" in text, text
        assert re.search(r"starting at [1-9]\d* after live update \S+", text), text
        assert "your unit:        counter.service active (result success)" in text, text
        read_until(proc, "another update", seen)
        address = next(
            line.split("=", 1)[1] for line in seen if "DBUS_SESSION_BUS_ADDRESS=" in line
        )
        command = seen[-1].split(": ", 1)[1]
        update = subprocess.run(
            ["bash", "-c", command],
            env={
                **os.environ,
                "DBUS_SESSION_BUS_ADDRESS": address,
                "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",  # as the hints
            },
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert update.returncode == 0, update.stdout + update.stderr
        read_until(proc, "that update", seen)
        assert seen[-1].endswith("that update succeeded"), "\n".join(seen)
        later = "\n".join(seen[len(text.splitlines()) :])
        assert len(re.findall(r"starting at [1-9]\d* after live update", later)) == 1, later
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert CLEAN in out.splitlines(), out
