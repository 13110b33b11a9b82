"""The main job on embedded defaults: a whole live update, end to end, that a newcomer can watch.

Everything is real except the kernel: a private mount namespace with a real systemd manager and a
real bus running the project's own units; the agent on the emulated kernel; the example participant
keeping random data in a memfd.  The update is driven through the public interfaces only
(``systemctl start liveupdate.service`` → ``liveupdatectl`` → D-Bus).  The emulated kexec tears the
first sandbox down; a fresh one "boots" over the same emulated-kernel state, the agent notices the
live-update boot, the participant retrieves and verifies its bytes, and the update finishes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .kernel.device import Abi
from .sandbox import Sandbox, missing_requirements
from .sandbox_cgroups import own_cgroup_dirs as cgroup_dirs_of_self
from .testbed import Testbed
from .vmm.guest import build_guest

VM_NAME = "demo"


class Demo(Testbed):
    _shown: dict[str, int]
    vm = False  # --vm: a QEMU guest (the VM participant, luo-vm@demo.service) rides along

    def __init__(self, *args: Any, participant: Path | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.participant = participant
        self.user_units: dict[str, str] = {}  # name -> the unit made to run in the sandbox
        self.user_enable: list[str] = []
        self.user_start: list[str] = []
        if participant is not None:
            self._read_participant(participant)

    def _read_participant(self, directory: Path) -> None:
        """The user's units: every ``*.service`` in ``directory``.  Those with an [Install]
        section are enabled (templates: the instances listed in ``directory/enable``), those
        with ``WantedBy=`` are started after the agent, as at boot."""
        listed = directory / "enable"
        instances = listed.read_text().split() if listed.exists() else []
        for path in sorted(directory.glob("*.service")):
            text = path.read_text()
            self.user_units[path.name] = self.adapt_unit(text)
            if "@." in path.name:
                continue
            if "\n[Install]" in "\n" + text:
                self.user_enable.append(path.name)
            if "\nWantedBy=" in "\n" + text:
                self.user_start.append(path.name)
        self.user_enable += instances
        if not self.user_units:
            raise SystemExit(f"luo-demo: no *.service in {directory}")

    def boot(self, stack: contextlib.ExitStack) -> Sandbox:
        """One boot's sandbox: the example participant, or the user's units instead."""
        if self.participant is None and self.vm:
            hooks, service = self.vm_units(VM_NAME)
            return self.boot_sandbox(
                stack,
                enable=["luo-example-prepare.service", "luo-example-restore.service", *hooks],
                start=["luo-agent.service", "luo-example-workload.service", service],
            )
        if self.participant is None:
            return self.boot_sandbox(stack)
        return self.boot_sandbox(
            stack,
            extra_units=self.user_units,
            enable=self.user_enable,
            start=["luo-agent.service", *self.user_start],
        )

    def watched_units(self) -> list[str]:
        if self.participant is None:
            vm = [f"luo-vm@{VM_NAME}.service"] if self.vm else []
            return ["luo-example-workload.service", *vm]
        # Template files run as their enabled instances.
        return [u for u in self.user_units if "@." not in u] + [
            u for u in self.user_enable if u not in self.user_units
        ]

    # ---------------------------------------------------------------- the story

    def run(self, keep: bool) -> int:
        self._shown = {}
        say(f"luo_agent demo: a live update on the emulated '{self.abi}' kernel ABI")
        say(f"work directory: {self.workdir}")
        if self.participant is not None:
            say(f"your participant: {self.participant} ({', '.join(self.user_units)})")
        with contextlib.ExitStack() as stack:
            stack.callback(self.machine.poweroff)
            step("1/6 cold boot: emulated kernel, systemd manager, bus, agent, participant")
            if self.vm:
                self.configure_vm()
            self.machine.boot()
            with contextlib.ExitStack() as first_boot:
                sandbox = self.boot(first_boot)
                print(indent(self.ctl(sandbox, "status")))
                step("2/6 preflight (liveupdatectl check) and kernel load")
                self.ctl(
                    sandbox,
                    "load-kernel",
                    str(self.kernel_image),
                    "--cmdline",
                    "console=ttyS0 liveupdate=1 kho=on",
                )
                print(indent(self.ctl(sandbox, "check", check=False)))

                step("3/6 systemctl start liveupdate.service: prepare → freeze → kexec")
                started = time.monotonic()
                proc = sandbox.systemctl("start", "liveupdate.service", check=False)
                print(indent(sandbox.journal("liveupdate.service")))
                self.show_participant(sandbox, "before the kexec")
                if proc.returncode != 0:
                    say("the update failed before the kexec; the agent's log:")
                    print(indent(sandbox.journal("luo-agent.service")))
                    return 1
                self.machine.wait_down(timeout=30)
                say(f"emulated kexec issued {time.monotonic() - started:.2f} s after the start")

            step("4/6 the new boot: fresh sandbox over the same emulated-kernel state")
            ok, boot, sandbox = self.boot_again(restore_step="5/6 ")
            with boot:
                if keep:
                    self.keep_running(boot, sandbox)
            return 0 if ok else 1

    def boot_again(self, restore_step: str = "") -> tuple[bool, contextlib.ExitStack, Sandbox]:
        """Boot the machine and a sandbox after a kexec, wait for the update to end, show it.
        The caller closes the returned stack (the sandbox)."""
        self.machine.boot()
        boot = contextlib.ExitStack()
        try:
            sandbox = self.boot(boot)
            step(f"{restore_step}restore (the participant retrieves) and finish")
            record = self.wait_result(sandbox, timeout=60)
            self.show_participant(sandbox, "after the live-update boot")
            print(indent(self.ctl(sandbox, "history", "--limit", "3")))
            step(f"{'6/6 ' if restore_step else ''}summary")
            ok = self.summary(sandbox, record)
        except BaseException:
            boot.close()
            raise
        return ok, boot, sandbox

    def show_participant(self, sandbox: Sandbox, when: str) -> None:
        for unit in self.watched_units():
            say(f"{unit} {when} (its log, {sandbox.log_dir}/{unit}.log):")
            print(indent(self.new_log_lines(sandbox, unit) or "(nothing new)"))

    def new_log_lines(self, sandbox: Sandbox, unit: str) -> str:
        """The unit's log lines not shown yet (its log file outlives the emulated reboot)."""
        lines = sandbox.journal(unit).splitlines()
        seen = self._shown.get(unit, 0)
        self._shown[unit] = len(lines)
        return "\n".join(lines[seen:])

    def wait_result(self, sandbox: Sandbox, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last_phase = ""
        while time.monotonic() < deadline:
            status = json.loads(self.ctl(sandbox, "--json", "status", check=False) or "{}")
            props = status.get("status", {})
            phase = props.get("Phase", "")
            if phase != last_phase:
                units = ", ".join(
                    f"{u} {a}/{r or '-'}" for u, a, _s, r in props.get("Participants", [])
                )
                say(f"agent phase: {phase}" + (f" (participants: {units})" if units else ""))
                last_phase = phase
            last = props.get("LastResult", ["", "", "", ""])
            if phase == "idle" and last[0]:
                history = json.loads(self.ctl(sandbox, "--json", "history", "--limit", "1"))
                return dict(history["history"][-1])
            time.sleep(0.2)  # a demo poll of the public status; tests wait on signals
        raise TimeoutError("the update did not finish in time")

    def summary(self, sandbox: Sandbox, record: dict[str, Any]) -> bool:
        timings = {t[0]: t[2] for t in record.get("timings", [])}
        blackout = record.get("blackout-critical", -1.0)
        lines = [
            f"update id:        {record['id']}",
            f"result:           {record['result']} {record.get('message', '')}".rstrip(),
            f"kernel ABI:       {record['abi']}",
        ]
        ok = bool(record["result"] == "success")
        if self.participant is None:
            verify = json.loads((self.example_state / "last-restore.json").read_text())
            lines += [
                f"survived:         {verify['got']['size']} bytes, sha256 "
                f"{verify['got']['sha256']}",
                f"                  file position {verify['got']['pos']}; verified byte for "
                f"byte: {'yes' if verify['verified'] else 'NO'}",
            ]
            ok = ok and bool(verify["verified"])
        else:
            for unit in self.watched_units():
                shown = sandbox.systemctl(
                    "show", "--property=ActiveState", "--property=Result", unit, check=False
                ).stdout.split()
                props = dict(line.split("=", 1) for line in shown if "=" in line)
                active, result = props.get("ActiveState", "?"), props.get("Result", "?")
                lines.append(f"your unit:        {unit} {active} (result {result})")
                ok = ok and active != "failed" and result in ("success", "")
        if blackout >= 0:
            lines.append(
                f"blackout-critical (freeze gate done → kexec call): {blackout * 1000:.3f} ms"
            )
        lines.append(
            "phase timings:    "
            + ", ".join(f"{p} {d:.3f}s" for p, d in timings.items() if d is not None and d >= 0)
        )
        print(indent("\n".join(lines)))
        if self.vm:
            time.sleep(1)  # the guest runs on: a few more ticks on its console
            ok = self.vm_summary() and ok
        return ok

    def configure_vm(self) -> None:
        guest = build_guest(self.workdir / "guest")
        self.vm_config.mkdir(parents=True, exist_ok=True)
        (self.vm_config / f"{VM_NAME}.toml").write_text(
            f'ram = "64M"\nkernel = "{guest}"\nverify_ram = true\n'
        )
        say(f"a 64 MiB guest built from source ({guest.name}) runs in luo-vm@{VM_NAME}.service")

    def vm_summary(self) -> bool:
        report = json.loads((self.vm_state / VM_NAME / "last-restore.json").read_text())
        frozen, carried = report["frozen"], report["carried"]
        serial = (self.vm_state / VM_NAME / "serial.log").read_text().splitlines()
        same = frozen["ram_sha256"] == carried["ram_sha256"]
        lines = [
            f"guest:            {report['ram_bytes'] >> 20} MiB of RAM in a memfd, QEMU "
            f"{report['qemu_version']} ({report['machine']})",
            f"guest RAM sha256: {frozen['ram_sha256']} at the freeze",
            f"                  {carried['ram_sha256']} after the kexec "
            f"({'equal' if same else 'DIFFERENT'})",
            f"guest ticks:      {frozen['ticks']} at the freeze, {carried['ticks']} after the kexec"
            f"; booted {sum('luo-guest: started' in line for line in serial)} time(s)",
            f"device state:     {report['state_bytes']} bytes (RAM not copied)",
            f"guest pause:      {report['pause_seconds']:.3f} s from QMP stop to cont "
            "(the emulated reboot included)",
            "its serial console, last lines:",
            *(f"  {line}" for line in serial[-3:]),
        ]
        print(indent("\n".join(lines)))
        return bool(same and carried["ticks"] == frozen["ticks"])

    def keep_running(self, boot: contextlib.ExitStack, sandbox: Sandbox) -> None:
        """Keep the sandbox; a kexec started from outside (another update) boots it again."""
        self.print_hints(sandbox)
        try:
            while True:
                time.sleep(0.5)
                if self.machine.running:
                    continue
                step("the emulated machine went down (a kexec): booting it again")
                self.machine.wait_down(timeout=30)
                boot.close()
                ok, new_boot, sandbox = self.boot_again()
                boot.enter_context(new_boot)
                say("that update " + ("succeeded" if ok else "FAILED"))
                self.print_hints(sandbox)
        except KeyboardInterrupt:
            pass

    def print_hints(self, sandbox: Sandbox) -> None:
        bindir = Path(self.python).parent
        installed = (bindir / "liveupdatectl").exists()  # the console script of .venv/bin
        ctl = "liveupdatectl" if installed else f"{self.python} -m luo_agent.cli"
        hints = [
            f"export DBUS_SESSION_BUS_ADDRESS={sandbox.bus_address}",
            f"export LUO_AGENT_UNIT_LOGS={sandbox.log_dir}",  # failed units' logs, for status
        ]
        if installed:
            hints.append(f"export PATH={bindir}:$PATH")
        hints += [
            f"{ctl} --session-bus status",
            f"{ctl} --session-bus history",
            "busctl --user introspect org.luoagent.LiveUpdate1 /org/luoagent/LiveUpdate1",
            # The sandbox's manager is reached through its own /run (XDG_RUNTIME_DIR=/run/user/0
            # there); its units are luo-agent, luo-example-* and liveupdate*.
            f"nsenter -t {sandbox.manager_pid} -m systemctl --user list-units 'luo*' 'liveupdate*'",
        ]
        say("the sandbox keeps running; from another root shell try:")
        print(indent("\n".join(hints)), flush=True)
        say("press Ctrl-C to stop and clean up")
        say(
            "another update (the demo boots the machine again): "
            f"{ctl} --session-bus update --kernel {self.kernel_image} --wait"
        )
        say(f"logs: {sandbox.log_dir}/<unit>.log (no journald in the sandbox)")


class OwnCgroup:
    """A fresh cgroup the demo moves itself into before it starts anything: whatever it starts
    lands inside however it detaches (the emulated kernel's new session, the sandboxes' managers
    and their units, double forks), and nothing else does.  So a process in it at the end was
    left behind by the demo, however busy the machine is."""

    def __init__(self) -> None:
        dirs = cgroup_dirs_of_self()
        if not dirs:
            raise RuntimeError("no writable cgroup hierarchy")
        self.parent = dirs[0]  # one hierarchy is enough: every process is in each of them
        self.path = self.parent / f"luo-demo-{os.getpid()}"
        self.path.mkdir()
        (self.path / "cgroup.procs").write_text(f"{os.getpid()}\n")

    def processes(self) -> set[int]:
        """Every process in it or below it (the sandboxes' cgroups), but the demo itself."""
        pids: set[int] = set()
        for procs in self.path.rglob("cgroup.procs"):
            with contextlib.suppress(OSError):  # a sandbox's cgroup removed meanwhile
                pids.update(int(p) for p in procs.read_text().split())
        pids.discard(os.getpid())
        return pids

    def leave(self) -> None:
        """Move back; the cgroup is removed unless something was left in it."""
        (self.parent / "cgroup.procs").write_text(f"{os.getpid()}\n")
        with contextlib.suppress(OSError):
            self.path.rmdir()


def say(text: str) -> None:
    print(f"==> {text}", flush=True)


def step(text: str) -> None:
    print(f"\n━━ {text}", flush=True)


def indent(text: str) -> str:
    return "\n".join("    " + line for line in text.rstrip().splitlines())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="luo-demo", description=__doc__)
    parser.add_argument("--abi", choices=tuple(Abi), default=Abi.SESSION)
    parser.add_argument("--profile", choices=("6.19", "g6"), default=None)
    parser.add_argument("--size", type=int, default=8 << 20, help="bytes of workload data")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the sandbox running at the end; another update from outside boots it again",
    )
    parser.add_argument(
        "--participant",
        type=Path,
        metavar="DIR",
        help="run your own participant instead of the example: the *.service units in DIR "
        "(docs/participants.md, 'Try it in the sandbox')",
    )
    parser.add_argument(
        "--vm", action="store_true", help="a QEMU guest survives the update too (needs QEMU)"
    )
    args = parser.parse_args(argv)
    reason = missing_requirements()
    if reason is not None:
        print(f"the demo cannot run here: {reason}", file=sys.stderr)
        return 77
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="luo-demo-"))
    # SIGTERM (timeout, systemd) cleans up like Ctrl-C does; so does SIGINT when the shell that
    # started the demo in the background had set it to be ignored.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    cgroup = OwnCgroup()
    try:
        demo = Demo(workdir, args.abi, args.profile, args.size, participant=args.participant)
        demo.vm = args.vm
        return demo.run(args.keep)
    finally:
        left = cgroup.processes()
        deadline = time.monotonic() + 5
        while left and time.monotonic() < deadline:  # let exiting processes be reaped
            time.sleep(0.1)
            left = cgroup.processes()
        cgroup.leave()
        if left:
            say(f"warning: processes left behind (in {cgroup.path}):")
            print(indent("\n".join(f"{pid} {_command_line(pid)}" for pid in sorted(left))))
        else:
            say("cleaned up: no process left behind")
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return "(gone)"


if __name__ == "__main__":
    sys.exit(main())
