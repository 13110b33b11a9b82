"""The VM participant through whole live updates on the emulated kernel: a real systemd user
manager running the project's ``luo-vm@.service`` and its hooks, the agent, a QEMU guest (TCG,
64 MiB) whose RAM is a memfd, and the emulated kexec (the sandbox and every process in it end; a
fresh one "boots" over the same machine state).

The guest counts timer ticks at a known place of its RAM (``luo_agent/vmm/guest.py``), so the
tests read its progress from the RAM itself."""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from luo_agent.sandbox import Sandbox
from luo_agent.testbed import Testbed
from tests.e2e.liveupdate_flow import (
    ctl_json,
    kernel_is_clean,
    participant,
    status,
    unit_property,
    wait_until,
    wait_update_ended,
)

from .conftest import needs_sandbox_and_qemu

pytestmark = needs_sandbox_and_qemu

NAME = "guest"
QEMU = "/usr/bin/qemu-system-x86_64"
SESSION = f"luo-vm-{NAME}"


@pytest.fixture
def bed(tmp_path: Path, guest_kernel: Path) -> Iterator[Testbed]:
    """An emulated session-ABI machine with the VM participant configured: a 64 MiB guest, its
    RAM hashed at the freeze and after the kexec.  Its QEMU is ``bin/qemu`` (a link to the real
    one) so that a test can put another QEMU in its place."""
    testbed = Testbed(tmp_path / "host", "session")
    qemu_link = testbed.workdir / "bin/qemu"
    qemu_link.parent.mkdir(parents=True)
    qemu_link.symlink_to(QEMU)
    testbed.vm_config.mkdir(parents=True)
    (testbed.vm_config / f"{NAME}.toml").write_text(
        f'ram = "64M"\nkernel = "{guest_kernel}"\nqemu = "{qemu_link}"\nverify_ram = true\n'
    )
    testbed.machine.boot()
    try:
        yield testbed
    finally:
        testbed.machine.poweroff()


def boot(bed: Testbed, stack: contextlib.ExitStack, extra: dict[str, str] | None = None) -> Sandbox:
    hooks, service = bed.vm_units(NAME)
    return bed.boot_sandbox(
        stack,
        extra_units=extra,
        enable=[*hooks, *(extra or {})],
        start=["luo-agent.service", service],
    )


def vm_status(bed: Testbed, box: Sandbox) -> dict[str, Any]:
    proc = box.run(
        [bed.python, "-m", "luo_agent.vmm.participant", "status", NAME, "--bus", "session",
         "--config", str(bed.vm_config / f"{NAME}.toml"), "--runtime-dir", f"/run/luo-vm/{NAME}"],
        check=False,
    )  # fmt: skip
    return dict(json.loads(proc.stdout)) if proc.returncode == 0 else {}


def ticks_past(bed: Testbed, box: Sandbox, ticks: int) -> dict[str, Any]:
    """The guest's view once it has counted past ``ticks`` (it runs)."""
    return wait_until(
        f"the guest to count past {ticks}",
        lambda: (s := vm_status(bed, box)) and s.get("ticks", -1) > ticks and s,
    )


def hook_after(phase: str, command: str, description: str) -> str:
    """A hook of ``phase`` that runs after the VM's own."""
    unit = participant(f"liveupdate-{phase}.target", command, description)
    return unit.replace("[Unit]\n", f"[Unit]\nAfter=luo-vm-{phase}@{NAME}.service\n")


def update(bed: Testbed, box: Sandbox, update_id: str) -> dict[str, Any]:
    return ctl_json(
        bed, box, "update", "--id", update_id, "--kernel", str(bed.kernel_image), "--wait",
        "--timeout", "120",
    )  # fmt: skip


def serial_ticks(bed: Testbed) -> list[int]:
    text = (bed.vm_state / NAME / "serial.log").read_text()
    return [int(t, 16) for t in re.findall(r"luo-guest: ticks 0x([0-9a-f]{8})", text)]


def qemu_processes(bed: Testbed) -> list[int]:
    """QEMU processes of this test bed's guest, wherever they run."""
    argv0 = str(bed.workdir / "bin/qemu").encode() + b"\0"
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(argv0):
                found.append(int(entry.name))
    return found


def test_the_guest_survives_the_update(bed: Testbed) -> None:
    update_id = "vm-survives"
    with contextlib.ExitStack() as first_boot:
        box = boot(bed, first_boot)
        before = ticks_past(bed, box, 30)
        result = update(bed, box, update_id)
        assert result["type"] == "result" and result["phase"] == "rebooting", result
        bed.machine.wait_down(timeout=30)
    bed.machine.boot()
    with contextlib.ExitStack() as second_boot:
        box = boot(bed, second_boot)
        entry = wait_update_ended(bed, box, update_id)
        assert entry["result"] == "success", entry
        for hook in ("restore", "finish"):
            assert unit_property(box, f"luo-vm-{hook}@{NAME}.service", "Result") == "success"
        report = json.loads((bed.vm_state / NAME / "last-restore.json").read_text())
        frozen, carried, loaded = report["frozen"], report["carried"], report["loaded"]
        # The RAM came through byte for byte, and the new QEMU loaded the state without touching it.
        assert frozen["ram_sha256"] == carried["ram_sha256"] == loaded["ram_sha256"]
        assert frozen["ticks"] == carried["ticks"] == loaded["ticks"] > before["ticks"]
        # The same guest goes on counting from there: no reboot of the guest.
        after = ticks_past(bed, box, frozen["ticks"] + 20)
        assert after["status"] == "running" and after["qemu_version"] == report["qemu_version"]
        assert report["state_bytes"] < 4 << 20 and 0 < report["pause_seconds"] < 60
        assert kernel_is_clean(bed.machine.inspect())
    ticks = serial_ticks(bed)
    assert ticks == sorted(ticks) and ticks[-1] > frozen["ticks"], ticks[-5:]
    assert (bed.vm_state / NAME / "serial.log").read_text().count("luo-guest: started") == 1


def test_a_cancelled_update_resumes_the_same_guest(bed: Testbed) -> None:
    """A freeze hook after the VM's fails: the guest was stopped and saved, the update is
    cancelled, and the cancel hook resumes the very same QEMU."""
    failing = hook_after("freeze", "/bin/sh -c 'exit 3'", "vm test: a freeze hook that fails")
    with contextlib.ExitStack() as first_boot:
        box = boot(bed, first_boot, {"vm-failing-freeze.service": failing})
        before = ticks_past(bed, box, 20)
        result = update(bed, box, "vm-cancelled")
        assert result["type"] == "result" and result["result"] == "failed", result
        assert "vm-failing-freeze.service" in result["message"]
        entry = wait_update_ended(bed, box, "vm-cancelled")
        assert [t[0] for t in entry["timings"]][:3] == ["preparing", "prepared", "freezing"]
        assert unit_property(box, f"luo-vm-freeze@{NAME}.service", "Result") == "success"
        assert unit_property(box, f"luo-vm-cancel@{NAME}.service", "Result") == "success"
        after = ticks_past(bed, box, before["ticks"] + 20)
        assert after["qemu_pid"] == before["qemu_pid"] and after["status"] == "running"
        assert kernel_is_clean(bed.machine.inspect())
        # The guest's RAM is handed in again for the next update (the kit), nothing else.
        wait_until(
            "the RAM handed in again",
            lambda: (
                [(s["session"], s["token"]) for s in ctl_json(bed, box, "sessions")["sessions"]]
                == [(SESSION, 1)]
            ),
        )


def test_qemu_killed_during_prepare_cancels_and_leaves_nothing(bed: Testbed) -> None:
    slow = hook_after("prepare", "/bin/sleep 3", "vm test: a slow prepare hook")
    with contextlib.ExitStack() as first_boot:
        box = boot(bed, first_boot, {"vm-slow-prepare.service": slow})
        before = ticks_past(bed, box, 10)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            running = pool.submit(update, bed, box, "vm-qemu-killed")
            # The VM's prepare hook has handed RAM, state and metadata in; then its QEMU dies.
            wait_until(
                "the VM's prepare hook",
                lambda: (
                    unit_property(box, f"luo-vm-prepare@{NAME}.service", "Result") == "success"
                    and unit_property(box, "vm-slow-prepare.service", "ActiveState") == "activating"
                ),
            )
            os.kill(before["qemu_pid"], signal.SIGKILL)
            result = running.result(timeout=120)
        assert result["type"] == "result" and result["result"] == "failed", result
        entry = wait_update_ended(bed, box, "vm-qemu-killed")
        assert entry["result"] == "failed", entry
        assert f"luo-vm-freeze@{NAME}.service" in entry["message"], entry
        # Nothing is left: no session in the kernel or the agent, no QEMU, no VM service holding
        # the guest's memfds.
        assert kernel_is_clean(bed.machine.inspect())
        assert ctl_json(bed, box, "sessions")["sessions"] == []
        assert unit_property(box, f"luo-vm@{NAME}.service", "ActiveState") == "failed"
        assert qemu_processes(bed) == []


def test_a_qemu_that_could_not_load_the_state_is_refused(bed: Testbed) -> None:
    """Before the kexec: the QEMU installed for the next start is another version (an upgrade
    behind the running guest's back): prepare refuses, the guest runs on.  After the kexec: the
    QEMU changed in between: the RAM and the state are kept for the operator."""
    other = bed.workdir / "bin/other-qemu"
    other.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = --version ]; then echo "QEMU emulator version 99.0.0"; exit 0; fi\n'
        f'exec {QEMU} "$@"\n'
    )
    other.chmod(0o755)
    link = bed.workdir / "bin/qemu"
    with contextlib.ExitStack() as first_boot:
        box = boot(bed, first_boot)
        before = ticks_past(bed, box, 10)
        link.unlink()
        link.symlink_to(other)
        result = update(bed, box, "vm-refused")
        assert result["type"] == "result" and result["result"] == "failed", result
        assert f"luo-vm-prepare@{NAME}.service" in result["message"]
        log = box.journal(f"luo-vm@{NAME}.service")
        assert "refused before the kexec" in log and "99.0.0" in log, log[-2000:]
        after = ticks_past(bed, box, before["ticks"] + 10)
        assert after["qemu_pid"] == before["qemu_pid"]
        assert kernel_is_clean(bed.machine.inspect())
        # The same QEMU again: this update goes through prepare and freeze ...
        link.unlink()
        link.symlink_to(QEMU)
        result = update(bed, box, "vm-held")
        assert result["phase"] == "rebooting", result
        bed.machine.wait_down(timeout=30)
    # ... but another QEMU is there after the kexec.
    link.unlink()
    link.symlink_to(other)
    bed.machine.boot()
    with contextlib.ExitStack() as second_boot:
        box = boot(bed, second_boot)
        # The restore gate fails, naming the hook; the agent waits in "updated" for the operator.
        held_dir = bed.vm_state / NAME / "held"
        wait_until("the RAM and state held", lambda: held_dir.exists() and any(held_dir.iterdir()))
        wait_until("the agent back in updated", lambda: status(bed, box).get("Phase") == "updated")
        assert unit_property(box, f"luo-vm-restore@{NAME}.service", "Result") == "exit-code"
        (held,) = (bed.vm_state / NAME / "held").iterdir()
        report = json.loads((held / "held.json").read_text())
        assert "99.0.0" in report["reason"]
        ram = (held / "ram").read_bytes()
        assert hashlib.sha256(ram).hexdigest() == report["record"]["ram_sha256"]
        assert len(ram) == 64 << 20 and (held / "state").stat().st_size > 0
        assert vm_status(bed, box)["held"] == str(held)
        # The operator gives up on the guest: the update ends, with losses, naming the hook.
        ctl_json(bed, box, "finish")
        entry = wait_update_ended(bed, box, "vm-held")
        assert entry["result"] == "finished-with-losses", entry
        assert f"luo-vm-restore@{NAME}.service" in entry["message"], entry
