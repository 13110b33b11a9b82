"""Figures on the real LUO kernel (the lab's VM): the reboot(KEXEC) call to the participant holding
its verified fd in the new kernel, with the agent and without it, and where the new boot's time
goes (``lab.liveupdate.timeline``).

All three paths boot the same kernel in the same VM (systemd 252 as PID 1, the project's package
installed and its agent running in both boots) and put their instants on the host's clock
(``lab/liveupdate.py`` explains how the VM's clocks are mapped through each boot's offset):

* ``bare-c``: the baseline a user compares with — ``bench/participant.c`` (compiled here with
  the host's gcc) creates a session on ``/dev/liveupdate`` itself, preserves a 4 MiB memfd and
  holds the session to the kexec (``kexec -e``); in the new boot the same program, a plain
  service, retrieves the session and the memfd, verifies every byte and the position, finishes;
* ``agent-c``: the same program as the agent's participant — its prepare hook hands the memfd to
  the agent (``Preserve`` over sd-bus), ``systemctl start liveupdate.service`` runs the update
  (the agent's own ``reboot(KEXEC)``), its restore hook ``Retrieve``s it and verifies;
* ``agent-python``: the example participant (Python, ``luo_agent/examples/participant.py``) on
  the agent's path (the lab's ``whole-update``): the interpreter's share beside the C one.

The ratio that says what the agent adds is agent-c / bare-c, measured in one run.  Absolute times
are TCG emulation on a shared 2-core host, not hardware.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from lab.build import ensure_kernel
from lab.liveupdate import SCENARIOS, Scenario, run_scenario
from lab.source import cache_root
from lab.vm import qemu_missing_reason

TARGET = 1.10  # agent-c / bare-c, kexec call -> verified fd
SHARE_TARGET = 0.25  # agent start -> first Retrieve answered, of the whole restore path
SOURCE = Path(__file__).with_name("participant.c")
UNIT = Path(__file__).resolve().parents[1] / "units" / "luo-agent.service"
STEPS = (
    ("kexec_call", "kexec call"),
    ("kernel_first_line", "new kernel's first log line"),
    ("init", "init (lab setup taken out after it)"),
    ("pid1_start", "PID 1 starts"),
    ("sysinit_target_ready", "sysinit.target reached"),
    ("basic_target_ready", "basic.target reached"),
    ("agent_start", "agent starts"),
    ("agent_imported", "agent's interpreter and imports done"),
    ("dbus_ready", "dbus-daemon ready"),
    ("agent_ready", "agent READY=1"),
    ("participant_start", "participant (restore hook) starts"),
    ("first_retrieve_answered", "first Retrieve answered"),
    ("participant_verified", "participant verified"),
    ("finish", "update finished"),
)

PARTICIPANT_UNITS = {
    "lab-cpart-prepare.service": """\
[Unit]
Description=bench: the compiled participant's prepare hook (Preserve through the agent)
Before=liveupdate-prepare.target
PartOf=liveupdate-prepare.target
DefaultDependencies=no
[Service]
Type=oneshot
EnvironmentFile=/etc/lab.env
ExecStart=/bin/sh -c 'mkdir -p "$LAB_RUN/cpart" && exec {program} agent-preserve "$LAB_RUN/cpart"'
[Install]
RequiredBy=liveupdate-prepare.target
""",
    "lab-cpart-restore.service": """\
[Unit]
Description=bench: the compiled participant's restore hook (Retrieve through the agent)
Before=liveupdate-restore.target
PartOf=liveupdate-restore.target
DefaultDependencies=no
[Service]
Type=oneshot
EnvironmentFile=/etc/lab.env
ExecStart=/bin/sh -c 'exec {program} agent-restore "$LAB_RUN/cpart"'
ExecStartPost=/bin/sh -c 'echo "lab-mark: restored $(date +%%s.%%N)" > /dev/console'
[Install]
RequiredBy=liveupdate-restore.target
""",
}

# Ordered like an ordinary workload service (default dependencies: after basic.target).
BARE_UNIT = """\
[Unit]
Description=bench: the compiled participant retrieving its own session (no agent)
[Service]
Type=oneshot
EnvironmentFile=/etc/lab.env
ExecCondition=/bin/sh -c 'test -e "$LAB_RUN/cpart/expected"'
ExecStart=/bin/sh -c 'exec {program} bare-restore "$LAB_RUN/cpart"'
ExecStartPost=/bin/sh -c 'echo "lab-mark: restored $(date +%%s.%%N)" > /dev/console'
[Install]
WantedBy=multi-user.target
"""


def _bare_job(program: Path) -> Any:
    def job(kernel: Path) -> str:
        return f"""\
if [ "$LAB_BOOT" = 1 ]; then
    ready
    mkdir -p "$out/cpart"
    {program} bare-preserve "$out/cpart" || exit 12
    kexec -l -s --reuse-cmdline {kernel} || exit 13
    mark clock "$(date +%s.%N)"
    mark kexec-call "$(date +%s.%N)"
    kexec -e
    exit 14
fi
n=0
until test -s "$out/cpart/verified"; do
    n=$((n + 1)); [ $n -gt 240 ] && exit 20
    sleep 0.5
done
grep -q '^ok ' "$out/cpart/verified" || exit 21
save_journal
"""

    return job


# After the update (off its path): the agent's imports under the new kernel's clock, per module.
IMPORTTIME = (
    "/usr/lib/luo-agent/bin/python3 -X importtime -c "
    "'import luo_agent.daemon, luo_agent.dbus.server, luo_agent.dbus.bus' "
    '2> "$out/importtime.$LAB_BOOT.txt"\n'
)


def _agent_c_job(kernel: Path) -> str:
    check = 'grep -q "^ok " "$out/cpart/verified" || { save_journal; exit 21; }\n'
    return SCENARIOS["whole-update"].job(kernel) + check + IMPORTTIME


def build_participant(into: Path) -> Path:
    """bench/participant.c with the host's gcc, against the lab kernel's own uapi header (the VM
    runs the host's root, so a dynamically linked libsystemd is there too)."""
    headers = sorted(cache_root().glob("src/*/linux-source-*/include/uapi/linux/liveupdate.h"))
    if not headers:
        raise RuntimeError("no lab kernel source with include/uapi/linux/liveupdate.h")
    include = into / "include" / "linux"
    include.mkdir(parents=True, exist_ok=True)
    shutil.copy(headers[-1], include / "liveupdate.h")
    program = into / "participant"
    libsystemd = subprocess.run(
        ["pkg-config", "--cflags", "--libs", "libsystemd"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    compiler = ["gcc", "-O2", "-Wall", "-Werror", f"-I{into / 'include'}"]
    subprocess.run(
        [*compiler, "-o", str(program), str(SOURCE), *libsystemd],
        check=True,
    )
    return program


def _agent_unit_after_the_bus() -> str | None:
    """The shipped luo-agent.service with its start ordered after dbus.service as well (what the
    early start gains on the restore path), or None when the shipped unit already has it."""
    lines = UNIT.read_text().splitlines(keepends=True)
    after = [i for i, line in enumerate(lines) if line.startswith("After=")]
    if not after or any("dbus.service" in lines[i] for i in after):
        return None
    lines[after[0]] = lines[after[0]].rstrip("\n") + " dbus.service\n"
    return "".join(lines)


def scenarios(program: Path) -> list[Scenario]:
    units = {name: text.format(program=program) for name, text in PARTICIPANT_UNITS.items()}
    bare = {"lab-cpart-bare.service": BARE_UNIT.format(program=program)}
    chosen = [
        Scenario(
            "bare-c",
            _bare_job(program),
            600.0,
            bare,
            example=False,
            participant_unit="lab-cpart-bare.service",
        ),
        Scenario(
            "agent-c",
            _agent_c_job,
            600.0,
            units,
            example=False,
            participant_unit="lab-cpart-restore.service",
        ),
    ]
    after_bus = _agent_unit_after_the_bus()
    if after_bus is not None:
        overridden = {**units, "luo-agent.service": after_bus}
        chosen.append(
            Scenario(
                "agent-c-after-bus",
                _agent_c_job,
                600.0,
                overridden,
                example=False,
                participant_unit="lab-cpart-restore.service",
            )
        )
    return [*chosen, SCENARIOS["whole-update"]]


NAMES = {
    "bare-c": "bare-c",
    "agent-c": "agent-c",
    "agent-c-after-bus": "agent-c-after-bus",
    "whole-update": "agent-python",
}
PATHS = tuple(NAMES.values())


def _measure(kernel: Path, scenario: Scenario) -> dict[str, Any]:
    run_dir = Path(tempfile.mkdtemp(prefix=f"luo-bench-{scenario.name}-"))
    run = run_scenario(kernel, scenario, run_dir)
    clock = run.summary.get("clock", {})
    value = clock.get("kexec_to_verified_restore_s")
    # The lab installs the package in every boot before systemd starts (a real machine has it on
    # its disk): taken out, so the figure is the kernel's and the boot's, not dpkg's under TCG.
    setup = clock.get("lab_package_setup_s", 0.0)
    steps = run.summary.get("timeline", {}).get("seconds_since_kernel_first_line", {})
    update = run.summary.get("update", {})
    ok = run.vm.ok and (update.get("result", "success") == "success")
    return {
        "path": NAMES[scenario.name],
        "seconds": float(value) - float(setup) if value is not None and ok else None,
        "steps": steps,
        "run_dir": str(run_dir),
        "vm": run.vm.describe(),
        "update": update,
        "clock": clock,
    }


def _print_timeline(measured: list[dict[str, Any]]) -> None:
    paths = [
        p for p in ("bare-c", "agent-c", "agent-python") if any(m["path"] == p for m in measured)
    ]
    print("   median seconds since the new kernel's first log line (lab package install taken out)")
    print("   " + f"{'step':38}" + "".join(f"{p:>14}" for p in paths))
    for key, label in STEPS:
        cells = []
        for path in paths:
            values = [m["steps"][key] for m in measured if m["path"] == path and key in m["steps"]]
            cells.append(f"{statistics.median(values):14.2f}" if values else f"{'-':>14}")
        if any(c.strip() != "-" for c in cells):
            print("   " + f"{label:38}" + "".join(cells))


def run(quick: bool) -> dict[str, Any]:
    reason = qemu_missing_reason()
    if reason is not None:
        print(f"real kernel: skipped ({reason})")
        return {"skipped": reason}
    kernel = ensure_kernel().bzimage
    program = build_participant(Path(tempfile.mkdtemp(prefix="luo-bench-participant-")))
    os.chmod(program.parent, 0o755)
    rounds = 1 if quick else 2
    measured: list[dict[str, Any]] = []
    for _ in range(rounds):  # interleaved, so drift in the host's load hits every path alike
        for scenario in scenarios(program):
            m = _measure(kernel, scenario)
            measured.append(m)
            if m["seconds"] is None:
                print(f"real kernel: {m['path']} gave no interval ({m['vm']}; {m['update']})")
    result: dict[str, Any] = {"runs": measured}
    print("\n## real kernel: reboot(KEXEC) call -> participant holds its verified fd (TCG)")
    print("   (the lab's per-boot package install, before systemd starts, is taken out)")
    by_path = {
        p: [m["seconds"] for m in measured if m["path"] == p and m["seconds"] is not None]
        for p in PATHS
    }
    for path, values in by_path.items():
        if values:
            print(
                f"   {path:14} median {statistics.median(values):7.2f} s  (n={len(values)}: "
                f"{[round(v, 2) for v in values]})"
            )
    _print_timeline(measured)
    if not by_path["bare-c"] or not by_path["agent-c"]:
        print("   ratio not measured (see the runs above)")
        return result
    bare, agent = statistics.median(by_path["bare-c"]), statistics.median(by_path["agent-c"])
    ratio = agent / bare
    result.update(bare_s=bare, agent_c_s=agent, ratio=ratio, target=TARGET, met=ratio <= TARGET)
    print(
        f"   agent-c / bare-c {ratio:.3f}  (target <= {TARGET}: "
        f"{'met' if ratio <= TARGET else 'NOT met'})"
    )
    if by_path["agent-c-after-bus"]:
        late = statistics.median(by_path["agent-c-after-bus"])
        result["agent_c_after_bus_ratio"] = late / bare
        print(
            f"   agent-c-after-bus / bare-c {late / bare:.3f}  (luo-agent.service After="
            "dbus.service as well: what the early start gains)"
        )
    if by_path["agent-python"]:
        python = statistics.median(by_path["agent-python"])
        result["agent_python_ratio"] = python / bare
        print(f"   agent-python / bare-c {python / bare:.3f}  (the interpreter's share besides)")
    shares = [
        (m["steps"]["first_retrieve_answered"] - m["steps"]["agent_start"])
        / (m["steps"]["participant_verified"] - m["steps"]["kexec_call"])
        for m in measured
        if m["path"] == "agent-c"
        and {"first_retrieve_answered", "agent_start", "participant_verified", "kexec_call"}
        <= m["steps"].keys()
    ]
    if shares:
        share = statistics.median(shares)
        result.update(agent_share=share, share_target=SHARE_TARGET)
        print(
            f"   agent start -> first Retrieve answered: {share:.1%} of kexec call -> verified "
            f"(agent-c; target < {SHARE_TARGET:.0%}: "
            f"{'met' if share < SHARE_TARGET else 'NOT met'})"
        )
    print("   absolute times are TCG emulation on a shared host: not comparable to hardware")
    return result
