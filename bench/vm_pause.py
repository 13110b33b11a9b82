"""7. The VM participant's guest pause across a whole live update vs its RAM size, against the
copy-RAM baseline, on the emulated kernel (``luo_agent.testbed.Testbed``, session ABI, the 7.2
profile): the project's ``luo-vm@.service`` with the tiny guest (``luo_agent/vmm/guest.py``, which
writes every page of its RAM, so none of it is a hole) under a real systemd user manager.

The pause is QMP ``stop`` (freeze hook) to ``cont`` returning (restore hook of the new boot), as
the participant records it (one host clock on this tier).  The baseline is the same update with
the same guest, migrated without ``x-ignore-shared``: its RAM goes through the device-state stream
(a state memfd as large as the RAM) instead of staying in a preserved RAM memfd.

The emulated kexec hands the preserved RAM, state and metadata memfds over in place, as a real
kernel does (``docs/emulator.md``: a keeper process holds them, no byte is copied).  What this
tier adds that a real kernel does not is its "reboot": the sandbox's systemd manager stopped and
a new one started with the agent and ``luo-vm@``.  The figure reports the VMM's own share of the
pause (save, QEMU start, load, cont), the agent's ``rebooting`` phase (its kexec call to the new
boot's agent finding the update) and the rest (the freeze and restore gates around the VMM's
work), and a trace of each pause step by step (``pause_trace``).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from luo_agent.testbed import Testbed
from luo_agent.vmm.guest import build_guest

from .stats import fmt, ratio

NAME = "bench"
SIZES_MIB = (64, 512, 2048)
QUICK_SIZES_MIB = (64, 512)
QEMU = "/usr/bin/qemu-system-x86_64"
# The copy-RAM baseline holds the RAM three times at once (the guest's, the state memfd, the new
# QEMU's): skip a point that would not fit.
MEMORY_PER_RAM = 3


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _ctl(bed: Testbed, box: Any, *args: str) -> dict[str, Any]:
    argv = [bed.python, "-m", "luo_agent.cli", "--session-bus", "--json", *args]
    out = box.run(argv, check=False, timeout=900).stdout
    lines = [line for line in out.splitlines() if line.strip()]
    return dict(json.loads(lines[-1])) if lines else {}


def _wait(what: str, probe: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while (value := probe()) in (None, False, {}):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return value


def one_update(workdir: Path, guest: Path, ram_mib: int, copy_ram: bool) -> dict[str, Any]:
    """A whole emulated update carrying one guest; the participant's restore report."""
    bed = Testbed(workdir, "session", profile="g6")
    bed.vm_config.mkdir(parents=True)
    (bed.vm_config / f"{NAME}.toml").write_text(
        f'ram = "{ram_mib}M"\nkernel = "{guest}"\nqemu = "{QEMU}"\n'
        f"copy_ram = {'true' if copy_ram else 'false'}\n"
    )
    hooks, service = bed.vm_units(NAME)
    marks: dict[str, float] = {}
    bed.machine.boot()
    try:
        with contextlib.ExitStack() as first_boot:
            box = bed.boot_sandbox(first_boot, enable=hooks, start=["luo-agent.service", service])
            status = [bed.python, "-m", "luo_agent.vmm.participant", "status", NAME]
            status += ["--config", str(bed.vm_config / f"{NAME}.toml")]
            status += ["--runtime-dir", f"/run/luo-vm/{NAME}"]

            def counting() -> bool:
                proc = box.run(status, check=False)
                return proc.returncode == 0 and json.loads(proc.stdout).get("ticks", 0) > 10

            _wait("the guest to count", counting, 120)
            result = _ctl(bed, box, "update", "--id", "bench-vm", "--kernel",
                          str(bed.kernel_image), "--wait", "--timeout", "600")  # fmt: skip
            if result.get("phase") != "rebooting":
                raise RuntimeError(f"the update did not reach the kexec: {result}")
            bed.machine.wait_down(timeout=600)
            marks["machine_down"] = time.time()
        marks["old_boot_stopped"] = time.time()
        bed.machine.boot(timeout=600)
        marks["machine_booted"] = time.time()
        with contextlib.ExitStack() as second_boot:
            box = bed.boot_sandbox(second_boot, enable=hooks, start=["luo-agent.service", service])
            marks["units_started"] = time.time()
            report_file = bed.vm_state / NAME / "last-restore.json"
            _wait("the restore", report_file.exists, 600)

            def ended() -> dict[str, Any] | None:
                props = _ctl(bed, box, "status").get("status", {})
                return props if props.get("Phase") == "idle" else None

            props = _wait("the update to end", ended, 600)
            if props["LastResult"][1] != "success":
                raise RuntimeError(f"the update did not succeed: {props['LastResult']}")
            report: dict[str, Any] = json.loads(report_file.read_text())
            (entry,) = _ctl(bed, box, "history", "--limit", "1")["history"]
            # The agent's phases of this update (wall clock: the restore side spans the reboot).
            report["phases"] = {t[0]: t[2] for t in entry["timings"]}
    finally:
        bed.machine.poweroff()
    report["trace"] = pause_trace(report, marks)
    return report


def pause_trace(report: dict[str, Any], marks: dict[str, float]) -> dict[str, float]:
    """Where the pause went, step by step on the host's one clock (seconds): from ``stop`` to
    the state saved (freeze hook), to the emulated machine down (the freeze gate's end, the
    agent's kexec call, the emulator's handover), the old boot's sandbox stopped, the machine
    booted, the new boot's units started (systemd manager, agent, ``luo-vm@``), the restore hook
    at work, QEMU started, the state loaded, ``cont`` returned."""
    loaded_at = report["running_at"] - report["resume_seconds"]
    points = [
        ("saved", report["stopped_at"] + report["save_seconds"]),
        ("machine down", marks["machine_down"]),
        ("old boot stopped", marks["old_boot_stopped"]),
        ("machine booted", marks["machine_booted"]),
        ("units started", marks["units_started"]),
        ("restore hook", report["restore_started_at"]),
        ("QEMU started", loaded_at - report["load_seconds"]),
        ("loaded", loaded_at),
        ("running", report["running_at"]),
    ]
    trace, last = {}, report["stopped_at"]
    for name, at in points:
        trace[name] = round(at - last, 6)
        last = at
    return trace


def vmm_share(report: dict[str, Any]) -> float:
    keys = ("save_seconds", "qemu_start_seconds", "load_seconds", "resume_seconds")
    return float(sum(report[k] for k in keys))


def run(quick: bool) -> dict[str, Any]:
    print("\n## 7. VM guest pause across a live update vs RAM size (emulated kernel)")
    sizes = QUICK_SIZES_MIB if quick else SIZES_MIB
    results: dict[str, Any] = {"sizes_mib": list(sizes), "points": []}
    with tempfile.TemporaryDirectory(prefix="luo-bench-vm-") as tmp:
        guest = build_guest(Path(tmp) / "guest")
        qemu_version = subprocess.run([QEMU, "--version"], capture_output=True, text=True).stdout
        print(f"# {qemu_version.splitlines()[0]}, TCG; guest writes every page of its RAM")
        print(f"# {'RAM':>6} {'mode':<12} {'pause':>9} {'VMM share':>10} {'rebooting':>10} "
              f"{'rest':>9} {'state bytes':>11}")  # fmt: skip
        for ram in sizes:
            for copy_ram in (False, True):
                mode = "copy-RAM" if copy_ram else "RAM-in-memfd"
                needed = ram * (1 << 20) * MEMORY_PER_RAM
                if needed > _mem_available():
                    print(f"  {ram:>5}M {mode:<12} skipped: needs ~{needed >> 30} GiB free")
                    continue
                workdir = Path(tmp) / f"{ram}-{mode}"
                try:
                    report = one_update(workdir, guest, ram, copy_ram)
                finally:
                    shutil.rmtree(workdir, ignore_errors=True)
                pause = report["pause_seconds"]
                share = vmm_share(report)
                point = {"ram_mib": ram, "mode": mode, "pause_s": pause, "vmm_s": share}
                point |= {k: report[k] for k in report if k.endswith("_seconds")}
                point["state_bytes"] = report["state_bytes"]
                point["phases"] = report["phases"]
                results["points"].append(point)
                reboot = report["phases"]["rebooting"]
                point["trace"] = report["trace"]
                print(f"  {ram:>5}M {mode:<12} {fmt(pause):>9} {fmt(share):>10} {fmt(reboot):>10} "
                      f"{fmt(pause - share - reboot):>9} {report['state_bytes']:>11}",
                      flush=True)  # fmt: skip
                steps = ", ".join(f"{k} +{fmt(v)}" for k, v in report["trace"].items())
                print(f"  {'':>6} {'':<12} stop → {steps}", flush=True)
    _ratios(results)
    return results


def _ratios(results: dict[str, Any]) -> None:
    by = {(p["ram_mib"], p["mode"]): p for p in results["points"]}
    sizes = results["sizes_mib"]
    small, large = sizes[0], sizes[-1]
    ours = [by.get((s, "RAM-in-memfd")) for s in (small, large)]
    base = by.get((large, "copy-RAM"))
    if ours[0] and ours[1]:
        flat = ratio(ours[1]["pause_s"], ours[0]["pause_s"])
        flat_vmm = ratio(ours[1]["vmm_s"], ours[0]["vmm_s"])
        results["flatness"] = {"pause": flat, "vmm": flat_vmm}
        print(f"# pause {large}M / {small}M (target <= 1.2): {flat:.2f}x; "
              f"the VMM's share alone: {flat_vmm:.2f}x")  # fmt: skip
    if ours[1] and base:
        speedup = ratio(base["pause_s"], ours[1]["pause_s"])
        speedup_vmm = ratio(base["vmm_s"], ours[1]["vmm_s"])
        results["vs_copy"] = {"pause": speedup, "vmm": speedup_vmm}
        print(f"# copy-RAM / RAM-in-memfd at {large}M (target >= 20): {speedup:.1f}x; "
              f"the VMM's share alone: {speedup_vmm:.1f}x")  # fmt: skip


REAL_KERNEL_SIZES = ("64M", "512M")  # the lab VM has 2 GiB


def real_kernel(quick: bool) -> dict[str, Any]:
    """The guest's pause across a real kexec of the lab's Linux 7.2 (``lab/vm_guest.py``: nested
    TCG), on the host's clock, at 64 MiB (``--quick``) and 512 MiB: one lab VM each."""
    from lab.build import ensure_kernel
    from lab.vm_guest import run as run_lab

    print("\n## 7b. VM guest pause across a real kexec (lab VM, Linux 7.2, nested TCG)")
    points: list[dict[str, Any]] = []
    for ram in REAL_KERNEL_SIZES[:1] if quick else REAL_KERNEL_SIZES:
        # Kept, as bench/real_kernel.py keeps its runs: the journals break a pause down.
        run_dir = Path(tempfile.mkdtemp(prefix=f"luo-bench-vm-lab-{ram}-")) / "vm-guest"
        lab = run_lab(ensure_kernel().bzimage, run_dir, ram=ram)
        guest = lab.summary.get("guest", {})
        report = guest.get("restore") or {}
        point = {
            "ram": ram,
            "run_dir": str(run_dir),
            "ok": lab.vm.ok,
            "pause_host_clock_s": guest.get("pause_host_clock_s"),
            "save_seconds": report.get("save_seconds"),
            "qemu_start_seconds": report.get("qemu_start_seconds"),
            "load_seconds": report.get("load_seconds"),
            "state_bytes": report.get("state_bytes"),
            "vmm_s": vmm_share(report) if report.get("resume_seconds") is not None else None,
            "ram_hash_equal": bool(report.get("frozen", {}).get("ram_sha256"))
            and report.get("frozen", {}).get("ram_sha256")
            == report.get("carried", {}).get("ram_sha256"),
            "kexec_to_verified_restore_s": lab.summary.get("clock", {}).get(
                "kexec_to_verified_restore_s"
            ),
        }
        points.append(point)
        print(f"# {json.dumps(point)}")
    result: dict[str, Any] = {"points": points}
    small, large = points[0], points[-1]
    measured = all(p["ok"] and p["pause_host_clock_s"] and p["vmm_s"] for p in (small, large))
    if large is not small and measured:
        result["pause_ratio"] = ratio(large["pause_host_clock_s"], small["pause_host_clock_s"])
        result["vmm_ratio"] = ratio(large["vmm_s"], small["vmm_s"])
        print(f"# pause {large['ram']} / {small['ram']}: {result['pause_ratio']:.2f}x; the VMM's "
              f"share alone: {result['vmm_ratio']:.2f}x")  # fmt: skip
    return result
