"""Whole live updates on the real LUO kernel: the Debian package installed with dpkg in a VM with
systemd as PID 1, the example participant, and the agent's own kexec (``lab/liveupdate.py``).

Each test is one VM run (the whole update two boots, the others one) and leaves ``summary.json``
(phases, timings, bytes verified, the session probes) in its run directory.  The probes open
``/dev/liveupdate`` with the raw ioctls of ``tests/kernel/luo_raw.py``: RETRIEVE_SESSION answers
ENOENT for a session the kernel does not carry into this boot; CREATE_SESSION answers EEXIST for
a name an outgoing session still holds.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lab.build import KernelBuild
from lab.liveupdate import SESSIONS, UpdateRun, ensure_deb, run_scenario

RELEASED = {"retrieve": "ENOENT", "create": "ok"}  # no session of that name anywhere
HELD = {"retrieve": "ENOENT", "create": "EEXIST"}  # an outgoing session holds the name

RunScenario = Callable[..., UpdateRun]


@pytest.fixture(scope="session")
def lab_deb(lab_kernel: KernelBuild) -> Path:
    """The package of this checkout, built once per session (and cached by its content)."""
    return ensure_deb()


@pytest.fixture
def scenario(lab_kernel: KernelBuild, lab_deb: Path, request: pytest.FixtureRequest) -> RunScenario:
    base = Path(os.environ.get("LUO_LAB_RUNS") or tempfile.mkdtemp(prefix="luo-lab-runs-"))

    def run(name: str, **options: Any) -> UpdateRun:
        run_dir = base / request.node.name
        n = 1
        while run_dir.exists():
            n += 1
            run_dir = base / f"{request.node.name}.{n}"
        return run_scenario(lab_kernel.bzimage, name, run_dir, **options)

    return run


def _context(run: UpdateRun) -> str:
    journals = run.text("journal.1.log")[-3000:] + run.text("journal.2.log")[-3000:]
    jobs = run.vm.job_log(1)[-1500:] + run.vm.job_log(2)[-1500:]
    return f"{run.describe()}\n--- jobs\n{jobs}\n--- journals\n{journals}"


def test_a_whole_live_update_carries_the_participant_across_a_real_kexec(
    scenario: RunScenario,
) -> None:
    run = scenario("whole-update")
    why = _context(run)
    assert run.vm.ok and run.vm.boots == 2, why
    # The operator's view: the history says success after one live-update boot.
    (last,) = run.history[-1:]
    assert (last["result"], last["error-name"], last["boots"]) == ("success", "", 1), why
    # The new kernel was booted by the agent's own kexec_file_load (its marker on the reused
    # command line) and reboot(KEXEC) right after the freeze gate: no shutdown job, no unit
    # stopped in between (direct custody).
    assert f"luo_agent.update={last['id']}" in run.text("cmdline.2"), why
    assert "liveupdate=1" in run.text("cmdline.2"), why
    journal_1 = run.text("journal.1.log").splitlines()
    agent_lines = [line for line in journal_1 if "luo-agent[" in line]
    # "rebooting" is published after reboot(), which never returns: boot 1's journal (followed
    # to a file up to the kexec, its last lines may lag behind) never shows it, nor a unit stopping.
    assert agent_lines, why
    assert not any("phase='rebooting'" in line for line in agent_lines), why
    assert not any("Stopp" in line for line in journal_1), why
    # The participant preserved several MiB at a known position and verified every byte after.
    expected = run.json("state/luo-example/expected.json")
    restore = run.json("state/luo-example/last-restore.json")
    assert restore is not None and restore["verified"] is True, why
    assert restore["got"] == restore["expected"] == expected, why
    assert expected["size"] == 4 << 20 and expected["pos"] == (4 << 20) // 3, why
    assert "luo-example: restore: ok verified 4194304 bytes" in run.text("journal.2.log"), why
    # The update used the participant's session and the agent's own; the kernel keeps neither.
    state = run.json("state/luo-agent/history.json")[-1]
    assert {p["session"] for p in state["preserved"]} == {"example"}, why
    probes = run.summary["probes"]
    for when in ("agent-running", "agent-stopped"):
        assert probes[when] == dict.fromkeys(SESSIONS, RELEASED), why
    # What a benchmark needs: the kexec call and the verified restore on one clock.
    clock = run.summary["clock"]
    assert clock["kexec_to_verified_restore_s"] > 0, why
    assert 0 <= run.summary["blackout_critical_ms"] < 5000, why
    assert (run.run_dir / "summary.json").exists()


def test_a_failing_participant_cancels_the_update_and_no_session_is_left(
    scenario: RunScenario,
) -> None:
    run = scenario("failing-participant")
    why = _context(run)
    assert run.vm.ok, why
    assert run.text("liveupdate-service.rc").strip() not in ("", "0"), why  # the job failed
    (last,) = run.history[-1:]
    assert last["result"] == "failed", why
    assert "lab-failing-freeze.service" in last["message"], why
    phases = [t[0] for t in last["timings"]]
    # It failed after the kernel preserved the participant's memfd, then the update was cancelled.
    assert phases[:3] == ["preparing", "prepared", "freezing"] and "cancelling" in phases, why
    assert "luo-example: preserve: ok preserved" in run.text("journal.1.log"), why
    assert run.json("status.after.json")["Phase"] == "idle", why
    probes = run.summary["probes"]
    for when in ("agent-running", "agent-stopped"):
        assert probes[when] == dict.fromkeys(SESSIONS, RELEASED), why


def test_sigkill_of_the_prepared_agent_releases_every_session(scenario: RunScenario) -> None:
    run = scenario("killed-agent")
    why = _context(run)
    assert run.vm.ok, why
    assert run.json("prepare.json")["phase"] == "prepared", why
    probes = run.summary["probes"]
    # While prepared the kernel holds both sessions (so the probe can see a held one) ...
    assert probes["prepared"] == dict.fromkeys(SESSIONS, HELD), why
    # ... and the agent's death releases them.
    assert probes["killed"] == dict.fromkeys(SESSIONS, RELEASED), why
    # The restarted agent records the update as aborted and is idle again.
    (last,) = run.history[-1:]
    assert last["result"] == "aborted", why
    assert run.json("status.after.json")["Phase"] == "idle", why


def test_an_update_without_a_loaded_kernel_is_refused_cleanly(scenario: RunScenario) -> None:
    run = scenario("no-kernel")
    why = _context(run)
    assert run.vm.ok, why
    assert run.text("update.rc").strip() == "4", why  # BLOCKED
    error = run.json("update.json")
    assert error["type"] == "error" and "kernel" in error["message"].lower(), why
    # Nothing was started: no update in the history, the participant was never asked.
    assert run.history == [], why
    assert run.json("status.after.json")["status"]["Phase"] == "idle", why
    assert "preserve" not in run.text("journal.1.log"), why
    assert not (run.run_dir / "state/luo-example/expected.json").exists(), why
    assert run.summary["probes"]["agent-running"] == dict.fromkeys(SESSIONS, RELEASED), why
