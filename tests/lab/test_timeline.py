"""The new boot's per-step timeline (``lab.results.timeline``): every point on the new kernel's
monotonic scale, the lab's package install taken out after init, the kexec call through both
boots' clock offsets."""

from __future__ import annotations

import json
from pathlib import Path

from lab.results import UNIT_STARTED, UNIT_STARTING, _kexec_clock, timeline

# The new boot's CLOCK_REALTIME at its kernel's monotonic 0 (the VM's RTC, whole seconds), and
# how far the host's clock is ahead of it.
BOOT2_REALTIME_AT_ZERO = 1_000_000.0
HOST_AHEAD = 7.25


def _entry(mono: float, **fields: str) -> dict[str, str]:
    return {
        "__MONOTONIC_TIMESTAMP": str(int(mono * 1e6)),
        "__REALTIME_TIMESTAMP": str(int((BOOT2_REALTIME_AT_ZERO + mono) * 1e6)),
        **fields,
    }


def _run_dir(tmp_path: Path) -> Path:
    # Boot 1's clock mark and the kexec call (VM realtime 500, host 510); boot 2's marks.
    def mark(vm_time: float, what: str, host: float) -> str:
        return f"{host:.6f} lab-mark: {what} {vm_time:.6f}\n"

    def boot2(mono: float, what: str) -> str:
        vm = BOOT2_REALTIME_AT_ZERO + mono
        return mark(vm, what, vm + HOST_AHEAD)

    (tmp_path / "serial.timed").write_text(
        mark(400.0, "clock", 410.0)
        + mark(500.0, "kexec-call", 510.0)
        + boot2(1.0, "setup-start")
        + boot2(51.0, "setup-done")  # 50 s of package install
        + boot2(60.0, "restored")
    )
    kernel = {"_TRANSPORT": "kernel", "_SOURCE_MONOTONIC_TIMESTAMP": "0", "MESSAGE": "Linux"}
    entries = [
        _entry(0.0, **kernel),
        _entry(52.0, MESSAGE="journald", _TRANSPORT="driver"),
        _entry(53.0, UNIT="basic.target", MESSAGE_ID=UNIT_STARTED),
        _entry(54.0, UNIT="luo-agent.service", MESSAGE_ID=UNIT_STARTING),
        _entry(56.0, UNIT="luo-agent.service", MESSAGE_ID=UNIT_STARTED),
        _entry(57.0, UNIT="lab-part.service", MESSAGE_ID=UNIT_STARTING),
        _entry(
            58.0,
            _SYSTEMD_UNIT="luo-agent.service",
            MESSAGE="level='info' event='phase_changed' phase='idle'",  # before: not the finish
        ),
        _entry(
            59.0, _SYSTEMD_UNIT="luo-agent.service", MESSAGE="level='info' event='fd_retrieved'"
        ),
        _entry(
            61.0,
            _SYSTEMD_UNIT="luo-agent.service",
            MESSAGE="level='info' event='phase_changed' phase='idle' previous='finishing'",
        ),
    ]
    (tmp_path / "journal.2.json").write_text("".join(json.dumps(e) + "\n" for e in entries))
    return tmp_path


def test_each_step_since_the_new_kernels_first_line(tmp_path: Path) -> None:
    run_dir = _run_dir(tmp_path)
    clock = _kexec_clock(run_dir, {})
    assert clock["lab_package_setup_s"] == 50.0
    steps = timeline(run_dir, 2, clock, "lab-part.service")
    assert steps["lab_package_setup_taken_out_s"] == 50.0
    points = steps["seconds_since_kernel_first_line"]
    # Host: the kexec call at 510, the new kernel's monotonic 0 at 1_000_000 + 7.25.
    assert points["kexec_call"] == round(510.0 - (BOOT2_REALTIME_AT_ZERO + HOST_AHEAD), 3)
    assert points["kernel_first_line"] == 0.0
    assert points["init"] == 1.0
    assert points["pid1_start"] == 1.0  # the install between init and PID 1 is taken out
    assert points["basic_target_ready"] == 3.0
    assert points["agent_start"] == 4.0
    assert points["agent_ready"] == 6.0
    assert points["participant_start"] == 7.0
    assert points["first_retrieve_answered"] == 9.0
    assert points["participant_verified"] == 10.0
    assert points["finish"] == 11.0
    assert list(points) == sorted(points, key=points.__getitem__)


def test_no_journal_no_timeline(tmp_path: Path) -> None:
    run_dir = _run_dir(tmp_path)
    (run_dir / "journal.2.json").unlink()
    assert timeline(run_dir, 2, _kexec_clock(run_dir, {}), "lab-part.service") == {}
