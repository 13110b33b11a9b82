"""luo-agent.service starts without waiting for the system bus, yet stops before it: the shipped
ordering (``After=`` luo-agent-stop-order.target, which is ``After=dbus.service`` and which the
agent starts once it is up) on a real systemd manager, with stand-ins for the agent and the bus
(docs/units.md)."""

from __future__ import annotations

import configparser
import time
from pathlib import Path

import pytest

from luo_agent.sandbox import Sandbox

from .conftest import needs_sandbox

pytestmark = [pytest.mark.systemd, pytest.mark.root, needs_sandbox]

UNITS = Path(__file__).resolve().parents[2] / "units"
BUS = "standin-bus.service"
AGENT = "standin-agent.service"
ORDER = "luo-agent-stop-order.target"


def _shipped_ordering() -> str:
    """The [Unit] ordering lines of the shipped agent unit, verbatim."""
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.read_string((UNITS / "luo-agent.service").read_text())
    unit = parser["Unit"]
    assert "dbus.service" not in unit["After"]  # its start does not wait for the bus
    assert ORDER in unit["After"]
    return f"After={unit['After']}\n"


def _stamp(name: str) -> str:
    return f"/bin/sh -c 'date +%%s%%N > /run/{name}.stopped'"


def _wait(box: Sandbox, unit: str, state: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while box.systemctl("is-active", unit, check=False).stdout.strip() != state:
        assert time.monotonic() < deadline, f"{unit} never {state}"
        time.sleep(0.05)


def test_the_agent_starts_before_the_bus_is_up_and_stops_before_it(sandbox: Sandbox) -> None:
    target = (UNITS / ORDER).read_text().replace("dbus.service", BUS)
    sandbox.write_units(
        {
            ORDER: target,
            # The bus takes 3 s to come up and stops at once.
            BUS: "[Unit]\nDefaultDependencies=no\n[Service]\nType=oneshot\nRemainAfterExit=yes\n"
            f"ExecStart=/bin/sleep 3\nExecStop={_stamp('bus')}\n",
            # Once up it starts the target, as the agent does (order_stop_before_the_bus); it
            # takes 1 s to stop: the bus's stop must wait for it.
            AGENT: f"[Unit]\nDefaultDependencies=no\n{_shipped_ordering()}[Service]\n"
            "ExecStart=/bin/sleep infinity\n"
            f"ExecStartPost=/bin/systemctl --user --no-block start {ORDER}\n"
            f"ExecStop=/bin/sleep 1\nExecStopPost={_stamp('agent')}\n",
            "standin-boot.target": f"[Unit]\nWants={BUS} {AGENT}\n",
        }
    )
    sandbox.systemctl("start", "--no-block", "standin-boot.target")  # one transaction: both
    _wait(sandbox, AGENT, "active")
    assert sandbox.systemctl("is-active", BUS, check=False).stdout.strip() == "activating"
    _wait(sandbox, BUS, "active")
    _wait(sandbox, ORDER, "active")  # started once the agent is up, after the bus

    sandbox.systemctl("stop", AGENT, ORDER, BUS)  # one transaction, as at shutdown
    agent = int(sandbox.path_inside("/run/agent.stopped").read_text())
    bus = int(sandbox.path_inside("/run/bus.stopped").read_text())
    assert agent < bus
