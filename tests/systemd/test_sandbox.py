"""The test harness itself: a real user manager, confined, and torn down without leftovers."""

from __future__ import annotations

from pathlib import Path

import pytest

from luo_agent.sandbox import RUNTIME_UNIT_DIR, Sandbox

from .conftest import needs_sandbox

pytestmark = [pytest.mark.systemd, pytest.mark.root, needs_sandbox]


def _host_mounts() -> list[str]:
    return [
        line.split(" - ")[0].split()[4]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
    ]


def test_sandbox_is_isolated_and_leaves_nothing(tmp_path: Path) -> None:
    mounts_before = _host_mounts()
    marker = f"{RUNTIME_UNIT_DIR}/marker.txt"
    host_had_marker = Path(marker).exists()
    box = Sandbox(tmp_path / "box")
    with box:
        pids = box.processes()
        assert len(pids) >= 3  # holder, manager, its dbus-daemon
        box.path_inside(marker).write_text("inside")
        assert box.run(["cat", marker]).stdout == "inside"
        assert Path(marker).exists() == host_had_marker  # the host's /run is untouched
        assert _host_mounts() == mounts_before
        # The manager lives in the sandbox cgroup, not in the host's root cgroup.
        cgroup = box.run(["cat", "/proc/self/cgroup"]).stdout
        assert "luo-sandbox-" in cgroup
        assert box.systemctl("is-system-running").stdout.strip() == "running"
        assert box.run(["sh", "-c", "echo $FOO"], env={"FOO": "bar"}).stdout == "bar\n"
        assert box.manager_pid in pids
    assert box.processes() == []
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists()
    assert not list(Path("/sys/fs/cgroup").glob(f"*/**/{box._tag}"))


def test_reboot_keeps_workdir_and_renews_run(tmp_path: Path) -> None:
    workdir = tmp_path / "box"
    with Sandbox(workdir) as first:
        first.path_inside("/run/volatile").write_text("gone after reboot")
        (first.home / "persistent").write_text("kept")
    with Sandbox(workdir) as second:
        assert not second.path_inside("/run/volatile").exists()
        assert (second.home / "persistent").read_text() == "kept"
        assert second.systemctl("is-system-running").stdout.strip() == "running"


def test_service_output_is_captured_per_unit(tmp_path: Path) -> None:
    with Sandbox(tmp_path / "box") as box:
        box.write_units(
            {
                "talk.service": "[Service]\nType=oneshot\n"
                "ExecStart=/bin/sh -c 'echo to-stdout; echo to-stderr >&2'\n"
            }
        )
        box.systemctl("start", "talk.service")  # a oneshot's start returns once it exited
        assert box.journal("talk.service") == "to-stdout\nto-stderr\n"
        assert box.journal("silent.service") == ""
