"""Run every benchmark, print each figure with its baseline and ratio, and a summary."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from . import blackout, daemon_process, on_systemd


def machine() -> str:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = Path("/proc/meminfo").read_text().split()[1]
    return (
        f"{platform.node()}: {os.cpu_count()} CPUs ({cpu}), {int(mem) // 1024} MB RAM, "
        f"Linux {platform.release()}, Python {platform.python_version()}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    parser.add_argument(
        "--only",
        action="append",
        choices=("blackout", "phase", "dbus", "daemon", "real-kernel", "vm", "vm-real-kernel"),
        help="run only these parts (repeatable); real-kernel (minutes of VM time), vm (a QEMU "
        "guest up to 2 GiB, ~6 GiB of memory at its peak) and vm-real-kernel only on request",
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("the benchmarks need root (mount namespaces, a systemd manager)", file=sys.stderr)
        return 77
    parts = args.only or ["blackout", "phase", "dbus", "daemon"]
    started = time.monotonic()
    print(f"# luo_agent benchmarks — {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(f"# {machine()}")
    print(f"# command: {' '.join([sys.executable, '-m', 'bench', *(argv or sys.argv[1:])])}")
    print("# every figure: median (interquartile range, n) and its ratio to a baseline measured")
    print("# in the same run; see bench/README.md for what each measures")
    results: dict[str, Any] = {"machine": machine(), "date": time.time()}
    if "blackout" in parts:
        results["blackout"] = blackout.run(args.quick)
    if "phase" in parts:
        results["phase"] = on_systemd.phase_overhead(args.quick)
    if "dbus" in parts:
        results["dbus"] = on_systemd.dbus(args.quick)
    if "daemon" in parts:
        results["daemon"] = daemon_process.run(args.quick)
    if "real-kernel" in parts:
        from . import real_kernel

        results["real_kernel"] = real_kernel.run(args.quick)
    if "vm" in parts:
        from . import vm_pause

        results["vm"] = vm_pause.run(args.quick)
    if "vm-real-kernel" in parts:
        from . import vm_pause

        results["vm_real_kernel"] = vm_pause.real_kernel(args.quick)
    elapsed = time.monotonic() - started
    print(f"\n# whole harness: {elapsed:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
