"""A flood of read-only calls from an unprivileged user on a real system bus (the project's policy,
polkitd) leaves the agent on the bus and answering, with its fds and memory flat; and an agent
whose bus connection is lost anyway exits non-zero, so systemd's Restart= brings it back.

Before the fix (luo_agent/dbus/bus.py) dbus-fast closed the agent's connection on the first EAGAIN
of a reply: 4 of 4 floods took the agent off the bus for good while its process lived on."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from luo_agent.daemon import EX_UNAVAILABLE
from luo_agent.kernel.emulator import EmulatedMachine
from tests.agent_host import AgentProcess
from tests.security.conftest import get, needs_root_namespaces
from tests.security.harness import (
    NOBODY,
    REPO,
    PolkitNamespace,
    SessionBus,
    open_fd_count,
)
from tests.security.wire import perform_all

pytestmark = [needs_root_namespaces]

CONNECTIONS, IN_FLIGHT, CALLS = 20, 100, 5000


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def flood_as(ns: PolkitNamespace, uid: int) -> dict[str, int]:
    proc = subprocess.run(
        [
            *("setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"),
            *(sys.executable, "-m", "tests.security.flood", ns.address),
            *map(str, (CONNECTIONS, IN_FLIGHT, CALLS)),
        ],
        capture_output=True,
        cwd=REPO,
        env=ns.env | {"PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    outcomes: dict[str, int] = json.loads(proc.stdout)
    return outcomes


@pytest.fixture
def agent(
    polkit_ns: PolkitNamespace, tmp_path: Path, machine: EmulatedMachine
) -> Iterator[AgentProcess]:
    process = polkit_ns.start_agent(tmp_path / "agent", machine)
    try:
        yield process
    finally:
        process.stop()


async def test_unprivileged_flood_leaves_the_agent_on_the_bus(
    polkit_ns: PolkitNamespace, agent: AgentProcess
) -> None:
    # The first flood grows the caches and buffers a flood needs; the second must not grow them.
    first = flood_as(polkit_ns, NOBODY)
    fds, rss = open_fd_count(agent.pid), rss_kib(agent.pid)
    second = flood_as(polkit_ns, NOBODY)

    for outcomes in (first, second):
        assert outcomes == {"reply": CALLS}, outcomes  # every call answered, none refused
    assert agent.alive()
    (phase,) = await perform_all(polkit_ns.address, [get("Phase")])  # root is still answered
    assert phase["error"] == "" and phase["body"][0]["$variant"][1] == "idle", phase
    assert open_fd_count(agent.pid) == fds
    assert rss_kib(agent.pid) - rss < 8 * 1024, (rss, rss_kib(agent.pid))
    log = agent.log_text()
    assert "Traceback" not in log and "Bad file descriptor" not in log, log[-3000:]


def test_an_agent_that_loses_the_bus_exits_non_zero(
    tmp_path: Path, machine: EmulatedMachine, session_bus: SessionBus
) -> None:
    agent = AgentProcess(tmp_path / "agent", machine, "session", env=session_bus.env)
    try:
        session_bus.stop()  # the bus daemon goes away under the agent
        assert agent.wait_exit(15.0) == EX_UNAVAILABLE, agent.log_text()[-3000:]
    finally:
        agent.stop()
