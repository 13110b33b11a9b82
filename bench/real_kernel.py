"""Figures on the real LUO kernel (the lab's VM): the reboot(KEXEC) call to the participant holding
its verified fd in the new kernel, for the agent's path and for the kernel selftest's bare path.

Both runs boot the same kernel in the same VM (systemd 252 as PID 1, the project's package
installed and running) and put their two instants on the host's clock (``lab/liveupdate.py``
explains how the VM's clocks are mapped through each boot's offset):

* agent: ``systemctl start liveupdate.service`` — the agent's own ``reboot(KEXEC)`` (the start of
  its ``rebooting`` timing) → the example participant's restore hook has verified its bytes;
* baseline: ``luo_kexec_simple`` stage 1, ``kexec -e`` → its stage 2, a plain service, has
  verified its bytes.

The difference is what the agent adds in the new boot: its start, the live-update detection, the
restore gate and the participant's own start.  Absolute times are TCG emulation on a shared
2-core host, not hardware: compare the ratio, measured in one run.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

from lab.build import ensure_kernel
from lab.liveupdate import run_scenario
from lab.vm import qemu_missing_reason

TARGET = 1.10


def _interval(kernel: Path, scenario: str) -> tuple[float | None, dict[str, Any]]:
    run_dir = Path(tempfile.mkdtemp(prefix=f"luo-bench-{scenario}-"))
    run = run_scenario(kernel, scenario, run_dir)
    clock = run.summary.get("clock", {})
    value = clock.get("kexec_to_verified_restore_s")
    # The lab installs the package in every boot before systemd starts (a real machine has it on
    # its disk): taken out, so the figure is the kernel's and the boot's, not dpkg's under TCG.
    setup = clock.get("lab_package_setup_s", 0.0)
    return (float(value) - float(setup) if value is not None else None), {
        "run_dir": str(run_dir),
        "vm": run.vm.describe(),
        "clock": clock,
    }


def run(quick: bool) -> dict[str, Any]:
    reason = qemu_missing_reason()
    if reason is not None:
        print(f"real kernel: skipped ({reason})")
        return {"skipped": reason}
    kernel = ensure_kernel().bzimage
    rounds = 1 if quick else 2
    agent: list[float] = []
    bare: list[float] = []
    runs: list[dict[str, Any]] = []
    for _ in range(rounds):  # interleaved, so drift in the host's load hits both alike
        for scenario, into in (("selftest-baseline", bare), ("whole-update", agent)):
            value, detail = _interval(kernel, scenario)
            runs.append({"scenario": scenario, "seconds": value, **detail})
            if value is None:
                print(f"real kernel: {scenario} gave no interval ({detail['vm']})")
            else:
                into.append(value)
    result: dict[str, Any] = {"runs": runs}
    print("\n## real kernel: reboot(KEXEC) call -> participant holds its verified fd (TCG)")
    print("   (the lab's per-boot package install, before systemd starts, is taken out)")
    if not agent or not bare:
        print("   not measured (see the runs above)")
        return result
    a, b = statistics.median(agent), statistics.median(bare)
    ratio = a / b
    result.update(agent_s=a, baseline_s=b, ratio=ratio, target=TARGET, met=ratio < TARGET)
    print(f"   agent path      median {a:7.2f} s  (n={len(agent)}: {agent})")
    print(f"   selftest path   median {b:7.2f} s  (n={len(bare)}: {bare})")
    print(f"   ratio {ratio:.3f}  (target < {TARGET}: {'met' if ratio < TARGET else 'NOT met'})")
    print("   absolute times are TCG emulation on a shared host: not comparable to hardware")
    return result
