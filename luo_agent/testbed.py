"""A whole emulated host for tests, the demo and the benchmarks: an emulated LUO machine plus, per
"boot", a sandbox (private mount namespace, real systemd user manager, real bus) running the
project's own units unchanged, pointed at this checkout by drop-ins.

A kexec is: the agent calls reboot(KEXEC) on the emulated kernel, the machine goes down, the caller
stops the sandbox and boots both again over the same work directory.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

from .kernel.emulator import EmulatedMachine
from .sandbox import Sandbox

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "units"
PHASE_UNITS = [
    "luo-agent.service",
    "luo-agent-stop-order.target",
    "liveupdate.service",
    "liveupdate-prepare.target",
    "liveupdate-freeze.target",
    "liveupdate-cancel.target",
    "liveupdate-restore.target",
    "liveupdate-finish.target",
]
EXAMPLE_UNITS = [
    "luo-example-workload.service",
    "luo-example-prepare.service",
    "luo-example-restore.service",
]
VM_PHASES = ("prepare", "freeze", "cancel", "restore", "finish")
# The VM participant's templates (luo_agent/vmm, docs/vm-participant.md).
VM_UNITS = ["luo-vm@.service", *(f"luo-vm-{phase}@.service" for phase in VM_PHASES)]

# The smallest participants (docs/participants.md), hooked in by their own [Install] only.
COUNTER_UNITS = ["luo-example-counter.service", "luo-example-counter-sh.service"]

_SYSTEM_RUN_NODES = (
    "mkdir -p /run/luo-agent /run/systemd/inaccessible && cd /run/systemd/inaccessible"
    " && mkdir -p -m 0 dir && install -m 0 /dev/null reg && mkfifo -m 0 fifo"
    " && mknod -m 0 chr c 0 0 && mknod -m 0 blk b 0 0"
)


class Testbed:
    __test__ = False  # not a pytest test class, although its name starts with "Test"

    def __init__(
        self,
        workdir: Path,
        abi: str,
        profile: str | None = None,
        size: int = 1 << 20,
        agent_config: str = "",
    ) -> None:
        self.workdir = workdir
        self.abi = abi
        self.machine = EmulatedMachine(workdir / "machine", abi, profile)
        self.size = size
        self.python = sys.executable
        self.agent_state = workdir / "var/lib/luo-agent"
        self.example_state = workdir / "var/lib/luo-example"
        self.vm_config = workdir / "etc/luo-vm"  # <name>.toml of each VM participant
        self.vm_state = workdir / "var/lib/luo-vm"
        self.kernel_image = workdir / "boot/vmlinuz-emulated"
        self.config_file = workdir / "etc/luo-agent/config.toml"
        self.config_file.parent.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(agent_config)
        self.kernel_image.parent.mkdir(parents=True, exist_ok=True)
        if not self.kernel_image.exists():
            self.kernel_image.write_bytes(b"emulated kernel image\n" * 64)

    # ---------------------------------------------------------------- the sandbox's units

    def dropins(self) -> dict[str, str]:
        """Point the project's units at this checkout, the emulated machine and the user manager.
        The unit files themselves are installed unchanged."""
        env = "Environment=LUO_AGENT_BUS=session PYTHONUNBUFFERED=1"
        agent = (
            f"{self.python} -m luo_agent --config {self.config_file} --session-bus --user-manager"
            f" --emulate {self.machine.root} --state-directory {self.agent_state}"
            f" --runtime-directory /run/luo-agent --log journal"
        )
        example = (
            f"{self.python} -m luo_agent.examples.participant %s --bus session"
            f" --state-dir {self.example_state} --runtime-dir /run/luo-example --size {self.size}"
        )
        ctl = f"{self.python} -m luo_agent.cli --session-bus"
        vm = (
            f"{self.python} -m luo_agent.vmm.participant {{}} %i --bus session"
            f" --config {self.vm_config}/%i.toml --state-dir {self.vm_state}/%i"
            " --runtime-dir /run/luo-vm/%i"
        )
        units = {
            "luo-agent.service": (
                # The emulated kernel's device node is not /dev/liveupdate: reset the condition.
                "[Unit]\nConditionPathExists=\n"
                f"[Service]\n{env}\nExecStart=\nExecStart={agent}\n"
                # The shipped hardening stays on; only its paths are adapted: the work directory
                # (config, emulated machine, state) lives under /tmp, hidden by PrivateTmp= and
                # read-only under ProtectSystem=strict, so it is bound in; /run/luo-agent is not
                # the user manager's RuntimeDirectory=; the interpreter may live under /root.
                f"BindPaths={self.workdir}\nReadWritePaths=/run/luo-agent\nProtectHome=read-only\n"
                # This checkout and its interpreter may live under /tmp too (a CI clone).
                f"BindReadOnlyPaths={REPO} {Path(sys.prefix).resolve()}\n"
            ),
            "luo-example-workload.service": (
                f"[Service]\n{env}\nExecStart=\nExecStart={example % 'serve'}\n"
            ),
            "luo-example-prepare.service": (
                f"[Service]\n{env}\nExecStart=\nExecStart={example % 'prepare'}\n"
            ),
            "luo-example-restore.service": (
                f"[Service]\n{env}\nExecStart=\nExecStart={example % 'restore'}\n"
            ),
            "liveupdate.service": (
                f"[Service]\n{env}\nEnvironment=LIVEUPDATE_KERNEL={self.kernel_image}"
                f' "LIVEUPDATE_CMDLINE=console=ttyS0 liveupdate=1 kho=on"\n'
                f"ExecStart=\nExecStart={ctl} update --wait --from-environment\n"
            ),
        }
        for unit, command in zip(VM_UNITS, ("serve", *VM_PHASES), strict=True):
            units[unit] = f"[Service]\n{env}\nExecStart=\nExecStart={vm.format(command)}\n"
        return {f"{unit}.d/50-sandbox.conf": text for unit, text in units.items()}

    def adapt_unit(self, text: str) -> str:
        """A participant's unit as written for a real machine, made to run in the sandbox: the
        interpreter is this checkout's, ``liveupdatectl`` is ``python -m luo_agent.cli``, the
        packaged example scripts are this checkout's, and the agent is on the session bus."""
        cli = f"{self.python} -m luo_agent.cli "
        swaps = (
            ("/usr/bin/python3 ", f"{self.python} "),
            ("/usr/bin/liveupdatectl ", cli),
            ("=liveupdatectl ", "=" + cli),
            ("/usr/share/doc/luo-agent/examples/", f"{REPO}/luo_agent/examples/"),
        )
        lines = []
        for line in text.splitlines():
            if line.startswith("Exec"):
                for old, new in swaps:
                    line = line.replace(old, new)
            lines.append(line)
        lines += ["[Service]", "Environment=LUO_AGENT_BUS=session PYTHONUNBUFFERED=1"]
        return "\n".join(lines) + "\n"

    def boot_sandbox(
        self,
        stack: contextlib.ExitStack,
        *,
        extra_units: Mapping[str, str] | None = None,
        enable: Iterable[str] = ("luo-example-prepare.service", "luo-example-restore.service"),
        start: Iterable[str] = ("luo-agent.service", "luo-example-workload.service"),
    ) -> Sandbox:
        """A fresh sandbox ("boot") with the project's units installed; ``extra_units`` are
        written as given (test participants); ``enable`` is enabled --runtime (their RequiredBy=
        hooks them into the phase targets); ``start`` is started in order.  The sandbox is stopped
        when ``stack`` closes."""
        sandbox = stack.enter_context(Sandbox(self.workdir / "sandbox"))
        # What PID 1 provides at boot and the fresh /run lacks: the inaccessible nodes that
        # ProtectHome=/ProtectKernelTunables=/ProtectKernelLogs= mount over hidden paths, and the
        # system RuntimeDirectory= of luo-agent.service.
        sandbox.run(["sh", "-c", _SYSTEM_RUN_NODES])
        units = PHASE_UNITS + EXAMPLE_UNITS + VM_UNITS
        sandbox.install_units([UNITS / u for u in units], self.dropins())
        counters = {name: self.adapt_unit((UNITS / name).read_text()) for name in COUNTER_UNITS}
        sandbox.write_units(counters | dict(extra_units or {}))
        enable = list(enable)
        if enable:
            sandbox.systemctl("enable", "--runtime", *enable)
        for unit in start:
            sandbox.systemctl("start", unit)
        return sandbox

    def vm_units(self, name: str) -> tuple[list[str], str]:
        """The hooks to enable and the service to start for the VM participant ``name``
        (configured in ``vm_config/<name>.toml``)."""
        return [f"luo-vm-{phase}@{name}.service" for phase in VM_PHASES], f"luo-vm@{name}.service"

    def ctl(self, sandbox: Sandbox, *args: str, check: bool = True) -> str:
        proc = sandbox.run(
            [self.python, "-m", "luo_agent.cli", "--session-bus", *args], check=check
        )
        return str(proc.stdout)
