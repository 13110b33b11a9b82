"""``./scripts/vm``: the real-kernel lab from the command line.

./scripts/vm kernel                 fetch the source and build the kernel (cached), print it
./scripts/vm selftests              the kernel's liveupdate selftests, across a real kexec
./scripts/vm run [--systemd] CMD    run a shell command in the VM, print its output
./scripts/vm demo [--console] [--vm] a whole live update of the installed package, across a real
                                    kexec, and its summary (lab/liveupdate.py)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from .build import ensure_kernel
from .vm import Vm, qemu_missing_reason


def _run_dir(kind: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"luo-lab-{kind}-"))


def cmd_kernel(args: argparse.Namespace) -> int:
    started = time.monotonic()
    kernel = ensure_kernel()
    manifest = kernel.manifest
    print(f"kernel: {kernel.bzimage}")
    print(f"source: {manifest['source_package']} {manifest['source_version']}")
    print(
        f"built in {manifest['build_seconds']} s on {manifest['cpus']} CPUs at "
        f"{manifest['built_at']}; this call took {time.monotonic() - started:.1f} s"
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    kernel = ensure_kernel()
    vm = Vm(kernel.bzimage, mode="systemd" if args.systemd else "job", echo=sys.stdout)
    result = vm.run(" ".join(args.command) + "\n", _run_dir("run"), args.timeout)
    print(f"lab: {result.describe()}", file=sys.stderr)
    return result.exit_code if result.status == "exited" and result.exit_code is not None else 124


def cmd_selftests(args: argparse.Namespace) -> int:
    from .selftests import run_selftests

    results = run_selftests(ensure_kernel(), _run_dir("selftests"), echo=sys.stdout)
    for line in results.summary():
        print(line)
    return 0 if results.ok else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from .liveupdate import ensure_deb, run_scenario, summary_lines, update_ok
    from .vm_guest import guest_ok
    from .vm_guest import run as run_vm_guest
    from .vm_guest import summary_lines as guest_lines

    kernel = ensure_kernel()
    print(f"==> kernel: {kernel.bzimage} ({kernel.version})", flush=True)
    deb = ensure_deb()
    print(f"==> package: {deb}", flush=True)
    run_dir = _run_dir("demo")
    print(
        f"==> booting the VM (systemd as PID 1, the package installed with dpkg -i); run "
        f"directory {run_dir}; a TCG-emulated live update takes a few minutes",
        flush=True,
    )
    echo = sys.stdout if args.console else None
    if args.vm:
        print("==> with a QEMU guest (nested TCG) whose RAM is a memfd: luo-vm@lab.service")
        run = run_vm_guest(kernel.bzimage, run_dir, echo=echo, timeout=args.timeout)
        print("==> the VM participant (journal of both boots):")
        for line in (run.text("journal-vm.1.log") + run.text("journal-vm.2.log")).splitlines():
            if "luo-vm: " in line:
                print(f"    {line}")
        print("==> summary (also in summary.json):")
        for line in summary_lines(run) + guest_lines(run):
            print(f"    {line}")
        return 0 if guest_ok(run) else 1
    run = run_scenario(kernel.bzimage, args.scenario, run_dir, echo=echo, timeout=args.timeout)
    if args.scenario == "whole-update":
        journal = run.text("journal.1.log") + run.text("journal.2.log")
        print("==> the agent and the participant (journal of both boots):")
        for line in journal.splitlines():
            if ("luo-agent[" in line and "phase_changed" in line) or "luo-example:" in line:
                print(f"    {line}")
    print("==> summary (also in summary.json):")
    for line in summary_lines(run):
        print(f"    {line}")
    return 0 if update_ok(run) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/vm",
        description="Build a Linux kernel with the Live Update Orchestrator from Debian's source "
        "and run jobs on it in a QEMU VM that shares this machine's root file system.",
    )
    sub = parser.add_subparsers(dest="command_name", required=True)
    sub.add_parser("kernel", help="fetch and build the kernel and selftests (cached)")
    sub.add_parser("selftests", help="run the kernel's liveupdate selftests, across a real kexec")
    run = sub.add_parser("run", help="run a shell command in the VM")
    run.add_argument("--systemd", action="store_true", help="boot systemd as PID 1 first")
    run.add_argument("--timeout", type=float, default=600.0, help="seconds (default 600)")
    run.add_argument("command", nargs=argparse.REMAINDER, help="the shell command")
    demo = sub.add_parser("demo", help="a whole live update of the installed package in the VM")
    demo.add_argument("--console", action="store_true", help="show the VM's serial console")
    demo.add_argument("--timeout", type=float, help="seconds for the VM (default 600)")
    demo.add_argument(
        "--vm", action="store_true", help="a QEMU guest inside the VM survives the kexec too"
    )
    demo.add_argument(
        "--scenario",
        default="whole-update",
        choices=("whole-update", "failing-participant", "killed-agent", "no-kernel", "fleet-slot"),
        help=argparse.SUPPRESS,
    )
    args = parser.parse_args(argv)
    if (reason := qemu_missing_reason()) is not None:
        print(f"lab: cannot run a VM here: {reason}", file=sys.stderr)
        return 2
    handlers = {
        "kernel": cmd_kernel,
        "run": cmd_run,
        "selftests": cmd_selftests,
        "demo": cmd_demo,
    }
    return handlers[args.command_name](args)


if __name__ == "__main__":
    sys.exit(main())
