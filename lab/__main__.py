"""``./scripts/vm``: the real-kernel lab from the command line.

./scripts/vm kernel                 fetch the source and build the kernel (cached), print it
./scripts/vm selftests              the kernel's liveupdate selftests, across a real kexec
./scripts/vm run [--systemd] CMD    run a shell command in the VM, print its output
./scripts/vm demo [--console] [--vm] a whole live update of the installed package, across a real
                                    kexec, and its summary (lab/liveupdate.py)
./scripts/vm powercut               power cuts while prepared, frozen and restoring, each with a
                                    cold boot after it, then an update (lab/powercut.py)
./scripts/vm bigmem carry|limit     a memfd of hundreds of MiB across the kexec; or memfds preserved
                                    until the kernel refuses (lab/bigmem.py)
./scripts/vm sigkill                the agent SIGKILLed while preparing, freezing, restoring and
                                    finishing (lab/sigkill.py)
./scripts/vm soak [N]               N live updates in a row on one VM (default 10), each verified,
                                    with what must not grow measured after each (lab/soak.py)
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
    from .deb import ensure_deb
    from .liveupdate import run_scenario
    from .results import summary_lines, update_ok
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
    if args.scenario == "fleet-slot":
        from . import fleet_slot

        run = fleet_slot.run(kernel.bzimage, run_dir, echo=echo, timeout=args.timeout)
        print("==> summary (also in summary.json):")
        for line in summary_lines(run) + fleet_slot.summary_lines(run):
            print(f"    {line}")
        return _verdict(True, fleet_slot.checks(run))
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


def _verdict(vm_ok: bool, found: list[tuple[str, bool, str]]) -> int:
    """Print each check of a fault run and its verdict; the exit status."""
    for what, held, seen in found:
        print(f"    {'ok  ' if held else 'FAIL'} {what}" + ("" if held else f": saw {seen}"))
    ok = vm_ok and all(held for _, held, _ in found)
    print(f"==> {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def cmd_powercut(args: argparse.Namespace) -> int:
    from .powercut import checks, run_power_cuts

    run_dir = _run_dir("powercut")
    print(f"==> three power cuts and four cold boots; run directory {run_dir}", flush=True)
    run = run_power_cuts(
        ensure_kernel().bzimage, run_dir, echo=sys.stdout if args.console else None
    )
    print(f"==> {run.describe()}")
    return _verdict(run.ok, checks(run_dir))


def cmd_bigmem(args: argparse.Namespace) -> int:
    from .bigmem import run_carry, run_limit
    from .results import summary_lines, update_ok

    kernel = ensure_kernel().bzimage
    run_dir = _run_dir(f"bigmem-{args.what}")
    echo = sys.stdout if args.console else None
    print(f"==> {args.what}, {args.mib} MiB, VM of {args.memory}; run directory {run_dir}")
    if args.what == "carry":
        run = run_carry(kernel, args.mib, args.memory, run_dir, echo=echo)
        for line in summary_lines(run):
            print(f"    {line}")
        return 0 if update_ok(run) else 1
    result = run_limit(kernel, args.mib, args.memory, run_dir, echo=echo)
    print(f"==> VM: {result.describe()}")
    for name in ("limit-steps.jsonl", "limit.json"):
        if (run_dir / name).exists():
            print(f"--- {name}\n{(run_dir / name).read_text()}")
    return 0 if result.ok else 1


def cmd_sigkill(args: argparse.Namespace) -> int:
    from .sigkill import checks, run_sigkills

    run_dir = _run_dir("sigkill")
    print(f"==> the agent SIGKILLed in four phases, two boots; run directory {run_dir}", flush=True)
    result = run_sigkills(
        ensure_kernel().bzimage, run_dir, echo=sys.stdout if args.console else None
    )
    print(f"==> VM: {result.describe()}")
    return _verdict(result.ok, checks(run_dir))


def cmd_soak(args: argparse.Namespace) -> int:
    from .soak import run_soak, table

    kernel = ensure_kernel()
    run_dir = _run_dir("soak")
    print(f"==> {args.rounds} live updates in a row on one VM; run directory {run_dir}", flush=True)
    result = run_soak(
        kernel.bzimage, args.rounds, run_dir, echo=sys.stdout if args.console else None
    )
    print(f"==> VM: {result.describe()}")
    rows, ok = table(run_dir, args.rounds)
    for row in rows:
        print(row)
    ok = ok and result.ok and result.boots == args.rounds + 1
    print(f"==> {'PASS' if ok else 'FAIL'}: {args.rounds} updates, {result.boots} boots")
    return 0 if ok else 1


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
    cut = sub.add_parser("powercut", help="power cuts at three points of an update")
    cut.add_argument("--console", action="store_true", help="show the VM's serial console")
    big = sub.add_parser("bigmem", help="big memfds across the kexec, or up to the kernel's limit")
    big.add_argument("what", choices=("carry", "limit"))
    big.add_argument("--mib", type=int, default=512, help="carry: memfd size; limit: step")
    big.add_argument("--memory", default="2G", help="the VM's memory (default 2G)")
    big.add_argument("--console", action="store_true", help="show the VM's serial console")
    kill = sub.add_parser("sigkill", help="the agent SIGKILLed in four phases, across a kexec")
    kill.add_argument("--console", action="store_true", help="show the VM's serial console")
    soak = sub.add_parser("soak", help="N live updates in a row on one VM (not in CI)")
    soak.add_argument("rounds", nargs="?", type=int, default=10, help="kexecs (default 10)")
    soak.add_argument("--console", action="store_true", help="show the VM's serial console")
    args = parser.parse_args(argv)
    if (reason := qemu_missing_reason()) is not None:
        print(f"lab: cannot run a VM here: {reason}", file=sys.stderr)
        return 2
    handlers = {
        "kernel": cmd_kernel,
        "run": cmd_run,
        "selftests": cmd_selftests,
        "demo": cmd_demo,
        "soak": cmd_soak,
        "powercut": cmd_powercut,
        "bigmem": cmd_bigmem,
        "sigkill": cmd_sigkill,
    }
    return handlers[args.command_name](args)


if __name__ == "__main__":
    sys.exit(main())
