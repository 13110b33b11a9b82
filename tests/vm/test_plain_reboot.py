"""An operator's plain ``systemctl reboot`` at each phase of an update on systemd 262 (the sid
root): one VM of four boots (``lab/plain_reboot.py``, ``PLAIN_REBOOT``; the VM reboots instead
of ending).  Boot 1 reboots with the agent idle after ``load-kernel``, boot 2 with an update
prepared (after a logind block inhibitor made ``check`` and ``execute`` refuse), boot 3 with one
freezing; boot 4 records what is left.  Each following boot must show what
``docs/operator-guide.md`` says: the history true, no session left, no failed unit.  The same
boots show PID 1's fd store rules that ``tests/fakes/pid1.py`` models, and the shutdowns'
journal (forwarded to the console) shows the agent stopped before the bus
(``luo-agent-stop-order.target`` between them).

systemd 252 (this machine's root) takes the same job by hand: ``LUO_LAB_SYSTEMD=252`` runs this
test on it instead (there ``systemctl reboot`` never kexecs)."""

from __future__ import annotations

import os
import re
from typing import Any

from lab.build import KernelBuild
from lab.liveupdate import BOOKWORM, SESSIONS, UpdateRun, new_run_dir, run_scenario, sid_host
from lab.plain_reboot import PLAIN_REBOOT, boot_sections, stop_order

RELEASED = {"retrieve": "ENOENT", "create": "ok"}
MARKER = "luo_agent.update="
RESTARTING = "reboot: Restarting system"


def _history(run: UpdateRun, boot: int) -> list[dict[str, Any]]:
    document = run.json(f"history.{boot}.json")
    return list(document["history"]) if document else []


def test_a_plain_reboot_idle_prepared_and_freezing(lab_kernel: KernelBuild) -> None:
    on_252 = os.environ.get("LUO_LAB_SYSTEMD") == "252"
    host = BOOKWORM if on_252 else sid_host()
    run = run_scenario(
        lab_kernel.bzimage,
        PLAIN_REBOOT,
        new_run_dir(f"plain-reboot-{host.name}"),
        host=host,
        strategy="auto",
    )
    why = f"{run.describe()}\n" + "\n".join(
        f"--- boot {b}: job\n{run.vm.job_log(b)[-1500:]}\n--- journal\n"
        f"{run.text(f'journal.{b}.log')[-2500:]}"
        for b in (1, 2, 3, 4)
    )
    assert run.vm.ok and run.vm.boots == 4, why
    consoles = boot_sections(run.vm.serial_log.read_text(errors="replace"))
    for boot in (1, 2, 3, 4):
        failed = run.text(f"failed.{boot}.txt").strip()
        assert failed == "", f"boot {boot}: failed units {failed}\n{why}"
        probe = run.json(f"probe.{boot}.json")
        assert probe == {name: RELEASED for name in SESSIONS}, f"boot {boot}: {probe}\n{why}"
        status = run.json(f"status.{boot}.json")["status"]
        assert status["Phase"] == "idle", f"boot {boot}: {status}\n{why}"
    for boot in (1, 2, 3):
        # Every shutdown stopped the agent before the bus.
        assert stop_order(consoles[boot]) == ["agent", "bus"], f"boot {boot}\n{why}"

    # Boot 1, idle after load-kernel: no image in the kernel, so an ordinary reboot (the kernel
    # says "Restarting system", no marker in boot 2) and nothing recorded.
    assert run.text("kexec_loaded.1.idle").strip() == "0", why
    assert RESTARTING in consoles[1], why
    assert MARKER not in run.text("cmdline.2"), why
    assert _history(run, 2) == [], why

    # Boot 2, prepared: the image is loaded under the update's marker; a block inhibitor of
    # shutdown is named by check and refuses execute; then the reboot cancels the update.
    assert run.text("kexec_loaded.2.prepared").strip() == "1", why
    assert "lab-firmware" in run.text("check.inhibited.txt"), why
    assert run.text("execute.inhibited.rc").strip() not in ("", "0"), why
    assert run.json("probe.prepared.json") != {n: RELEASED for n in SESSIONS}, why
    prepared = _history(run, 3)
    assert [u["result"] for u in prepared] == ["cancelled"], why
    assert "was queued by someone else" in prepared[-1]["message"], why
    if on_252:
        assert RESTARTING in consoles[2] and MARKER not in run.text("cmdline.3"), why
    else:
        # 262's logind turns the reboot into a kexec into the loaded image (its marker).
        assert RESTARTING not in consoles[2] and MARKER in run.text("cmdline.3"), why

    # Boot 3, freezing (a freeze hook waits): PID 1 stops the agent on the way down, in freezing,
    # or in cancelling when the shutdown cancelled the freeze gate's job first (262); the kernel
    # drops the update with its handles.  The shutdown's target is named when the agent saw its
    # job before its own stop (262 did; 252's stop came first).
    assert run.text("kexec_loaded.3.freezing").strip() == "1", why
    frozen = _history(run, 4)
    assert [u["result"] for u in frozen] == ["cancelled", "aborted"], why
    target = "reboot.target" if on_252 else "kexec.target"
    stopped = re.fullmatch(
        rf"the agent was stopped in phase (freezing|cancelling)"
        rf"( \({target} was queued by someone else\))?",
        frozen[-1]["message"],
    )
    assert stopped is not None, why

    # PID 1's store rules (tests/fakes/pid1.py models them): the same open file pushed twice is
    # stored once, and three fds with room for two keep two, with a warning.
    assert run.text("fdstore.1.count").strip() == "3", why
    full = "Cannot store more fds than FileDescriptorStoreMax=3, closing remaining."
    assert full in run.text("fdstore.1.log"), why
    if not on_252:
        # The manager's counter is KExecCount (the mapping's key is kexecsCount, src/core/luo.c):
        # boot 2 came by an ordinary reboot, boots 3 and 4 by logind's kexec of the loaded image.
        counts = [run.text(f"manager.{b}.txt").split() for b in (2, 3, 4)]
        assert ["KExecCount=0" in counts[0], "KExecCount=1" in counts[1]] == [True, True], why
        assert "KExecCount=2" in counts[2], why
        # Boot 3 came by that kexec with the unit's store (3 memfds) carried by PID 1's own LUO
        # session, and a drop-in giving it room for 1: PID 1 put back 1 and closed the others
        # without a warning (the hand-back's drop is at debug level, src/core/service.c), unlike
        # a full store's push in boot 1.
        assert run.text("fdstore.3.count").strip() == "1", why
        assert "Cannot store more" not in run.text("fdstore.3.log"), why
