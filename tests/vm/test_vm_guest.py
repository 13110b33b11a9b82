"""The VM participant on the real Linux 7.2 kernel: a QEMU guest inside the lab's VM (nested TCG)
survives a real kexec driven by ``systemctl start liveupdate.service``, with the project
installed from its Debian package (``lab/vm_guest.py``).  One VM run, two boots."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from lab.build import KernelBuild
from lab.vm_guest import NAME, run


def test_a_guest_survives_a_real_kexec(lab_kernel: KernelBuild) -> None:
    base = Path(os.environ.get("LUO_LAB_RUNS") or tempfile.mkdtemp(prefix="luo-lab-runs-"))
    result = run(lab_kernel.bzimage, base / "vm-guest")
    why = (
        f"{result.describe()}\n--- jobs\n"
        f"{result.vm.job_log(1)[-1500:]}{result.vm.job_log(2)[-1500:]}"
        f"\n--- vm journals\n{result.text('journal-vm.1.log')[-3000:]}"
        f"{result.text('journal-vm.2.log')[-3000:]}"
    )
    assert result.vm.ok and result.vm.boots == 2, why
    (last,) = result.history[-1:]
    assert (last["result"], last["boots"]) == ("success", 1), why
    assert f"luo_agent.update={last['id']}" in result.text("cmdline.2"), why
    guest = result.summary["guest"]
    report, before, after = guest["restore"], guest["before"], guest["after"]
    frozen, carried, loaded = report["frozen"], report["carried"], report["loaded"]
    # The RAM the real kernel carried is the RAM the guest had when it was stopped, byte for byte.
    assert frozen["ram_sha256"] == carried["ram_sha256"] == loaded["ram_sha256"], why
    # The same guest, not a new one: its counter went on from where it was stopped.
    assert before["ticks"] < frozen["ticks"] == carried["ticks"] < after["ticks"], why
    assert after["status"] == "running", why
    serial = result.text(f"state/luo-vm/{NAME}/serial.log")
    assert serial.count("luo-guest: started") == 1, why
    assert 0 < guest["pause_host_clock_s"] < 600, why
