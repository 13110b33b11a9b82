"""The agent's start is on the path of every restore: what it imports before READY=1 stays what
the session ABI's restore needs (other ABIs' backends, the sysfs watcher, the emulator and
pystemd's unit API with lxml are loaded only where used)."""

from __future__ import annotations

import subprocess
import sys

NOT_AT_START = (
    "lxml",
    "pystemd.base",
    "luo_agent.kernel.global_list_backends",
    "luo_agent.kernel.emulator",
    "luo_agent.sysfs",
)


def test_what_the_daemon_imports_before_it_serves() -> None:
    code = (
        "import sys, luo_agent.daemon, luo_agent.dbus.server, luo_agent.dbus.bus\n"
        "print('\\n'.join(sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "luo_agent.systemd.pystemd_gate" in loaded  # the gate is there, without these:
    assert [name for name in NOT_AT_START if name in loaded] == []


def test_the_gate_works_without_pystemds_package_init() -> None:
    code = (
        "import sys, luo_agent.systemd.pystemd_calls as c\n"
        "bus = c.DBus(False)\n"  # not opened: no bus in a unit test
        "unit = c.path_encode(b'/org/freedesktop/systemd1/unit', b'a-b.service')\n"
        "print(type(bus).__name__, unit)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["DBus", "b'/org/freedesktop/systemd1/unit/a_2db_2eservice'"]
