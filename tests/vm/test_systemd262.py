"""systemd 262 as PID 1 on the real LUO kernel (the sid root of ``lab/rootfs.py``): the agent's
``systemd`` custody strategy proven on the real thing.

The agent pushes its outgoing session fds into its fd store and asks PID 1 to kexec; systemd 262's
``systemd-shutdown`` keeps them open through the real kexec, PID 1 hands them back to the agent in
the new boot under the same names, and the agent restores from them.
"""

from __future__ import annotations

import json

import pytest

from lab.build import KernelBuild
from lab.liveupdate import SESSIONS, UpdateRun, new_run_dir, run_scenario, sid_host, update_ok
from lab.rootfs import SidRoot, ensure_sid_root

RELEASED = {"retrieve": "ENOENT", "create": "ok"}


@pytest.fixture(scope="session")
def sid_root(lab_kernel: KernelBuild) -> SidRoot:
    return ensure_sid_root()


def _run(lab_kernel: KernelBuild, name: str, scenario: str, strategy: str) -> UpdateRun:
    return run_scenario(
        lab_kernel.bzimage,
        scenario,
        new_run_dir(name),
        host=sid_host(),
        strategy=strategy,
        timeout=900,
    )


def _chosen_strategy(journal: str) -> str:
    for line in journal.splitlines():
        if "reboot_strategy" in line and "chosen=" in line:
            return line.split("chosen=", 1)[1].split()[0].strip("'\"")
    return ""


def test_whole_update_with_auto_custody_goes_through_systemd_262(
    lab_kernel: KernelBuild, sid_root: SidRoot
) -> None:
    assert sid_root.package_version("systemd").startswith("262")
    run = _run(lab_kernel, "systemd262-whole-update", "whole-update", strategy="auto")
    journal_1, journal_2 = run.text("journal.1.log"), run.text("journal.2.log")
    why = f"{run.describe()}\n{run.vm.job_log(1)[-2000:]}\n{journal_1[-3000:]}\n{journal_2[-3000:]}"
    # auto takes the systemd strategy on a system manager >= 261 with the session ABI.
    assert _chosen_strategy(journal_1) == "systemd", why
    assert update_ok(run), why
    summary = run.summary
    assert summary["verified"]["ok"] is True and summary["verified"]["bytes"] > 0, why
    # The new boot's agent got its sessions back from PID 1's fd store, not by name from the
    # kernel: they arrive as luo-out-<hex> entries of its own store (fdstore.py logs them).
    assert "fd_store_adopted" in journal_2, why
    # After finish and with the agent stopped, the kernel carries no session of the update.
    stopped = summary["probes"]["agent-stopped"]
    assert stopped == {name: RELEASED for name in SESSIONS}, json.dumps(stopped)


def test_a_luosession_unit_and_the_agent_both_carry_their_state(
    lab_kernel: KernelBuild, sid_root: SidRoot
) -> None:
    """systemd 262's LUOSession= next to the agent: PID 1 carries the unit's own session, the
    agent carries its participants'; both come back verified after one real kexec."""
    run = _run(lab_kernel, "systemd262-luosession", "luosession-alongside", strategy="systemd")
    why = f"{run.describe()}\n{run.vm.job_log(1)[-2000:]}\n{run.vm.job_log(2)[-2000:]}"
    assert update_ok(run), why
    assert run.text("luosession.verified").strip() == "ok", why
    stopped = run.summary["probes"]["agent-stopped"]
    assert stopped == {name: RELEASED for name in SESSIONS}, json.dumps(stopped)


def test_systemctl_kexec_while_prepared_cancels_the_update_and_leaves_no_session(
    lab_kernel: KernelBuild, sid_root: SidRoot
) -> None:
    """An operator's ``systemctl kexec`` while an update is prepared: the agent sees kexec.target
    queued by someone else and cancels (docs/reliability.md); the kexec goes on without the
    update, and the new boot carries none of its sessions."""
    run = _run(lab_kernel, "systemd262-manual-kexec", "manual-kexec-while-prepared", "systemd")
    why = f"{run.describe()}\n{run.vm.job_log(1)[-2000:]}\n{run.text('journal.1.log')[-3000:]}"
    assert run.vm.ok and run.vm.boots == 2, why
    prepared = run.json("probe.prepared.json")
    assert prepared["example"]["create"] == "EEXIST", why  # it was prepared before the kexec
    history = run.history
    assert history and history[0]["result"] == "cancelled", why
    assert "kexec.target" in history[0]["message"], why
    assert run.json("probe.after-kexec.json") == {name: RELEASED for name in SESSIONS}, why
    assert run.json("status.after.json")["status"]["Phase"] == "idle", why
