"""What a scenario's run showed (``UpdateRun``, written to its ``summary.json``): the update's
record, the participant's verdict, the probes, the kexec call and the verified restore on the
host's clock (``lab/liveupdate.py`` explains the clocks), and the new boot's per-step timeline."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .vm import MARK, VmResult, console_lines


@dataclass
class UpdateRun:
    scenario: str
    vm: VmResult
    summary: dict[str, Any]

    @property
    def run_dir(self) -> Path:
        return self.vm.run_dir

    def json(self, name: str) -> Any:
        """A JSON document the job left in the run directory (the last line for liveupdatectl's
        line-per-document output), or None."""
        text = self.text(name).strip()
        try:
            return json.loads(text.splitlines()[-1]) if text else None
        except ValueError:  # cut short by a crash: the test reports the run instead
            return None

    def text(self, name: str) -> str:
        path = self.run_dir / name
        return path.read_text(errors="replace") if path.exists() else ""

    @property
    def history(self) -> list[dict[str, Any]]:
        document = self.json("history.json")
        return list(document["history"]) if document else []

    def describe(self) -> str:
        return f"{self.scenario}: {self.vm.describe()}\n{json.dumps(self.summary, indent=2)}"


def read_marks(run_dir: Path) -> list[tuple[float, str, float]]:
    """(host CLOCK_REALTIME, what, VM CLOCK_REALTIME) of each ``lab-mark: WHAT SECONDS`` console
    line, from the host-stamped console (``serial.timed``)."""
    marks = []
    for host, line in console_lines(run_dir, MARK):
        parts = line.split(MARK, 1)[1].split()
        if len(parts) == 2:
            try:
                marks.append((host, parts[0], float(parts[1])))
            except ValueError:
                continue
    return marks


def summarize(
    run: UpdateRun, participant_unit: str = "luo-example-restore.service"
) -> dict[str, Any]:
    """What the run showed, for people and benchmarks (written to summary.json)."""
    summary: dict[str, Any] = {
        "scenario": run.scenario,
        "vm": {
            "status": run.vm.status,
            "exit_code": run.vm.exit_code,
            "boots": run.vm.boots,
            "seconds": round(run.vm.elapsed, 1),
        },
    }
    # The agent's own history file (kept on the "disk", the run directory), with both clocks.
    records = run.json("state/luo-agent/history.json") or []
    record = records[-1] if records else None
    if record is not None:
        summary["update"] = {
            key: record.get(key)
            for key in ("id", "result", "error_name", "message", "abi", "boot_count")
        }
        summary["blackout_critical_ms"] = round(record.get("blackout_critical", -1) * 1000, 3)
        summary["phases"] = [_phase(t) for t in record.get("timings", [])]
    restore = run.json("state/luo-example/last-restore.json")
    if restore is not None:
        summary["verified"] = {
            "ok": restore["verified"],
            "bytes": restore["got"]["size"],
            "position": restore["got"]["pos"],
            "sha256": restore["got"]["sha256"],
        }
    summary["probes"] = {
        name.removeprefix("probe.").removesuffix(".json"): run.json(name)
        for name in sorted(p.name for p in run.run_dir.glob("probe.*.json"))
    }
    if record is not None:
        summary["clock"] = _kexec_clock(run.run_dir, record)
    elif any(what == "kexec-call" for _, what, _ in read_marks(run.run_dir)):
        summary["clock"] = _kexec_clock(run.run_dir, {})  # a baseline: no agent, its own mark
    if "clock" in summary and run.vm.boots >= 2:
        summary["timeline"] = timeline(
            run.run_dir, run.vm.boots, summary["clock"], participant_unit
        )
    return summary


# The steps of the new boot (``timeline``): journal entries of PID 1 (unit starting/started, by
# their catalogue ids) and of the agent (its own events).
UNIT_STARTING = "7d4958e842da4a758f6c1cdc7b36dcc5"
UNIT_STARTED = "39f53479d3a045ac8e11786248231fbf"
TIMELINE_UNITS = {
    "sysinit.target": "sysinit_target",
    "basic.target": "basic_target",
    "dbus.service": "dbus",
    "luo-agent.service": "agent",
}


def _ended(agent_message: str) -> bool:
    return "event='phase_changed'" in agent_message and "phase='idle'" in agent_message


def timeline(
    run_dir: Path, boot: int, clock: dict[str, Any], participant_unit: str
) -> dict[str, Any]:
    """The new boot's steps, in seconds since the new kernel's first log line, with the lab's
    package install (between init.sh's setup marks, just before PID 1 starts) taken out of every
    point after it; ``kexec_call`` is the kexec call on that scale (negative).

    Each boot's journal entry carries CLOCK_REALTIME and CLOCK_MONOTONIC read together (kernel
    messages their own printk time): the kernel's first line is monotonic 0, and the lab marks'
    and PID 1's times convert through that boot's realtime - monotonic difference."""
    path = run_dir / f"journal.{boot}.json"
    if not path.exists():
        return {}
    entries = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    own = [e for e in entries if "_SOURCE_MONOTONIC_TIMESTAMP" not in e]
    if not entries or not own:
        return {}
    # realtime - monotonic of this boot (µs), from an entry journald stamped itself.
    rt_minus_mono = (
        int(own[0]["__REALTIME_TIMESTAMP"]) - int(own[0]["__MONOTONIC_TIMESTAMP"])
    ) / 1e6

    def mono(entry: dict[str, Any]) -> float:
        return int(entry.get("_SOURCE_MONOTONIC_TIMESTAMP") or entry["__MONOTONIC_TIMESTAMP"]) / 1e6

    marks = {
        what: vm for host, what, vm in read_marks(run_dir) if host > clock.get("kexec_call_host", 0)
    }
    points: dict[str, float] = {"kernel_first_line": 0.0}
    if "setup-start" in marks:
        points["init"] = marks["setup-start"] - rt_minus_mono
    setup = 0.0
    if "setup-done" in marks:
        points["pid1_start"] = marks["setup-done"] - rt_minus_mono
        setup = float(clock.get("lab_package_setup_s", 0.0))
    for entry in entries:
        unit, message_id = entry.get("UNIT"), entry.get("MESSAGE_ID")
        name = TIMELINE_UNITS.get(str(unit)) or (
            "participant" if unit == participant_unit else None
        )
        if name is not None and message_id in (UNIT_STARTING, UNIT_STARTED):
            step = f"{name}_{'start' if message_id == UNIT_STARTING else 'ready'}"
            points.setdefault(step, mono(entry))
        if entry.get("_SYSTEMD_UNIT") == "luo-agent.service":
            message = str(entry.get("MESSAGE", ""))
            if "event='agent_starting'" in message:
                points.setdefault("agent_imported", mono(entry))
            elif "event='fd_retrieved'" in message:
                points.setdefault("first_retrieve_answered", mono(entry))
            elif "first_retrieve_answered" in points and _ended(message):
                points.setdefault("finish", mono(entry))
    if "restored" in marks:
        points["participant_verified"] = marks["restored"] - rt_minus_mono
    if "kexec_call_host" in clock and "vm_clock_offset_after_s" in clock:
        # The kexec call on the new boot's monotonic scale, through both boots' offsets.
        kernel_start_host = rt_minus_mono + float(clock["vm_clock_offset_after_s"])
        points["kexec_call"] = float(clock["kexec_call_host"]) - kernel_start_host
    pid1 = points.get("pid1_start", 0.0)
    return {
        "seconds_since_kernel_first_line": {
            name: round(value - (setup if "pid1_start" in points and value >= pid1 else 0.0), 3)
            for name, value in sorted(points.items(), key=lambda item: item[1])
        },
        "lab_package_setup_taken_out_s": setup,
    }


def _phase(timing: dict[str, Any]) -> dict[str, Any]:
    start, end = timing.get("monotonic_start"), timing.get("monotonic_end")
    wall_start, wall_end = timing.get("started"), timing.get("ended")
    phase: dict[str, Any] = {"phase": timing.get("phase"), "started": wall_start}
    if start is not None and end is not None:
        phase["seconds"] = round(end - start, 6)
    elif wall_start is not None and wall_end is not None:
        # It spans the kexec (the agent leaves the monotonic end out): the VM's wall clocks,
        # re-read from the RTC at boot, compare to about a second.
        phase["seconds_wall_clock"] = round(wall_end - wall_start, 3)
    return phase


def _kexec_clock(run_dir: Path, record: dict[str, Any]) -> dict[str, Any]:
    """The kexec call and the verified restore on the host's clock (see the module docstring).

    The kexec call is the start of the agent's last ``rebooting`` timing: stamped just before its
    final metadata write, ``sync()`` and ``reboot(KEXEC)`` (all inside the blackout-critical
    milliseconds).  The new boot's timeline comes from the marks: its init starting the lab's
    setup (package installation: a lab artefact, a real machine has the package on its disk),
    systemd starting, the participant's restore hook having verified its fd."""
    rebooting = [t for t in record.get("timings", []) if t.get("phase") == "rebooting"]
    marks = read_marks(run_dir)
    rebooting += [{"started": vm} for _, what, vm in marks if what == "kexec-call"]
    out: dict[str, Any] = {
        "clock": "host CLOCK_REALTIME; the VM's CLOCK_REALTIME is re-read from the emulated RTC "
        "(whole seconds) at each boot and its monotonic clocks restart, so VM times are put on "
        "the host's clock through each boot's offset",
    }
    clocks = [(host, vm) for host, what, vm in marks if what == "clock"]
    if not rebooting or not clocks:
        return out
    kexec_vm = float(rebooting[-1]["started"])
    offset_before = clocks[0][0] - clocks[0][1]
    kexec_host = kexec_vm + offset_before
    out.update(
        kexec_call_vm=kexec_vm,
        kexec_call_host=round(kexec_host, 6),
        vm_clock_offset_before_s=round(offset_before, 3),
    )
    after = {what: (host, vm) for host, what, vm in marks if host > kexec_host}
    if "restored" in after:
        host, vm = after["restored"]
        out.update(
            restored_host=host,
            restored_vm=vm,
            vm_clock_offset_after_s=round(host - vm, 3),
            kexec_to_verified_restore_s=round(host - kexec_host, 3),
        )
    if "setup-start" in after and "setup-done" in after:
        out.update(
            kexec_to_new_init_s=round(after["setup-start"][0] - kexec_host, 3),
            lab_package_setup_s=round(after["setup-done"][0] - after["setup-start"][0], 3),
        )
        if "restored" in after:
            out["systemd_start_to_verified_restore_s"] = round(
                after["restored"][0] - after["setup-done"][0], 3
            )
    return out


def summary_lines(run: UpdateRun) -> list[str]:
    """A summary like ./scripts/demo's."""
    s = run.summary
    update = s.get("update", {})
    verified = s.get("verified", {})
    clock = s.get("clock", {})
    phases = ", ".join(
        f"{p['phase']} {p['seconds']:.3f}s" for p in s.get("phases", []) if "seconds" in p
    )
    lines = [
        f"VM:               {run.vm.describe()}",
        f"update id:        {update.get('id', '-')}",
        f"result:           {update.get('result', '-')} {update.get('message', '')}".rstrip(),
        f"kernel ABI:       {update.get('abi', '-')}",
        f"live-update boots: {update.get('boot_count', '-')}",
    ]
    if verified:
        lines += [
            f"survived:         {verified['bytes']} bytes, sha256 {verified['sha256']}",
            f"                  file position {verified['position']}; verified byte for byte: "
            f"{'yes' if verified['ok'] else 'NO'}",
        ]
    if s.get("blackout_critical_ms", -1) >= 0:
        lines.append(
            f"blackout-critical (freeze gate done → kexec call): {s['blackout_critical_ms']} ms"
        )
    lines.append(f"phase timings:    {phases}")
    if "kexec_to_verified_restore_s" in clock:
        lines.append(
            "kexec call → participant holds its verified fd (host clock, TCG emulation): "
            f"{clock['kexec_to_verified_restore_s']:.1f} s"
        )
    if "systemd_start_to_verified_restore_s" in clock:
        lines.append(
            "                  of which: new kernel to its init "
            f"{clock['kexec_to_new_init_s']:.1f} s, lab package install "
            f"{clock['lab_package_setup_s']:.1f} s, systemd start to "
            f"verified restore {clock['systemd_start_to_verified_restore_s']:.1f} s"
        )
    probes = s.get("probes", {})
    if "agent-stopped" in probes:
        left = [
            name
            for name, result in (probes["agent-stopped"] or {}).items()
            if result.get("retrieve") != "ENOENT"
        ]
        lines.append(f"sessions left in the kernel: {', '.join(left) if left else 'none'}")
    return lines


def update_ok(run: UpdateRun) -> bool:
    s = run.summary
    return bool(
        run.vm.ok
        and run.vm.boots == 2
        and s.get("update", {}).get("result") == "success"
        and s.get("verified", {}).get("ok")
    )
