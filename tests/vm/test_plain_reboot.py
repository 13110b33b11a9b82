"""An operator's plain ``systemctl reboot`` with the agent idle after LoadKernel, on systemd 262
(the sid root): one VM of two boots (``lab/plain_reboot.py``, ``IDLE_REBOOT``; the VM reboots
instead of ending).  The agent keeps no image in the kernel while
idle, so the reboot is an ordinary one, and the new boot's agent comes up idle with no record, no
session left and no failed unit.  The same boots show PID 1's fd store rules that
``tests/fakes/pid1.py`` models, and the shutdown's journal (forwarded to the console) shows the
agent stopped before the bus (``luo-agent-stop-order.target`` between them).

The prepared and freezing cases (``PLAIN_REBOOT``, four boots) are covered on the emulated tier
(``tests/agent/test_reboot_strategy.py``); run by hand in the lab they need an unloaded host."""

from __future__ import annotations

from typing import Any

from lab.build import KernelBuild
from lab.liveupdate import (
    SESSIONS,
    Host,
    UpdateRun,
    new_run_dir,
    run_scenario,
    sid_host,
)
from lab.plain_reboot import IDLE_REBOOT, boot_sections, stop_order

RELEASED = {"retrieve": "ENOENT", "create": "ok"}
MARKER = "luo_agent.update="


def _run(lab_kernel: KernelBuild, name: str, host: Host) -> UpdateRun:
    return run_scenario(
        lab_kernel.bzimage, IDLE_REBOOT, new_run_dir(name), host=host, strategy="auto"
    )


def _history(run: UpdateRun, boot: int) -> list[dict[str, Any]]:
    document = run.json(f"history.{boot}.json")
    return list(document["history"]) if document else []


def _check(run: UpdateRun) -> str:
    """What any systemd must show; returns the run's context for messages."""
    why = f"{run.describe()}\n" + "\n".join(
        f"--- boot {b}: job\n{run.vm.job_log(b)[-1500:]}\n--- journal\n"
        f"{run.text(f'journal.{b}.log')[-2500:]}"
        for b in (1, 2)
    )
    assert run.vm.ok and run.vm.boots == 2, why
    for boot in (1, 2):
        failed = run.text(f"failed.{boot}.txt").strip()
        assert failed == "", f"boot {boot}: failed units {failed}\n{why}"
        probe = run.json(f"probe.{boot}.json")
        assert probe == {name: RELEASED for name in SESSIONS}, f"boot {boot}: {probe}\n{why}"
        status = run.json(f"status.{boot}.json")["status"]
        assert status["Phase"] == "idle", f"boot {boot}: {status}\n{why}"
        assert _history(run, boot) == [], why

    # Idle after LoadKernel: no image in the kernel, so the reboot is an ordinary one (the
    # kernel says "Restarting system", not "Starting new kernel"; no marker in boot 2).
    assert run.text("kexec_loaded.1.idle").strip() == "0", why
    consoles = boot_sections(run.vm.serial_log.read_text(errors="replace"))
    assert "reboot: Restarting system" in consoles[1], why
    assert MARKER not in run.text("cmdline.2"), why

    # PID 1's store rules (tests/fakes/pid1.py models them): the same open file pushed twice is
    # stored once, and three fds with room for two keep two, with a warning.
    assert run.text("fdstore.1.count").strip() == "3", why
    full = "Cannot store more fds than FileDescriptorStoreMax=3, closing remaining."
    assert full in run.text("fdstore.1.log"), why

    # The shutdown stopped the agent before the bus (luo-agent-stop-order.target between them).
    assert stop_order(consoles[1]) == ["agent", "bus"], why
    return why


def test_a_plain_reboot_of_an_idle_agent_on_systemd_262(lab_kernel: KernelBuild) -> None:
    run = _run(lab_kernel, "plain-reboot-idle-262", sid_host())
    why = _check(run)
    # The manager's counter is KExecCount (the mapping's key is kexecsCount, src/core/luo.c).
    assert "KExecCount=0" in run.text("manager.2.txt").split(), why
