"""The public API is pinned: the live introspection data of both objects equals the golden files
(tests/dbus/data/*.xml, our interfaces only, normalised), and the real busctl shows it.

After an intended API change: ``LUO_UPDATE_GOLDEN=1 pytest tests/dbus/test_dbus_introspection.py``
rewrites the golden files; review the diff and docs/dbus-api.md with it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from dbus_fast import Variant
from dbus_fast.aio import MessageBus

from luo_agent.client import call
from luo_agent.dbus.names import BUS_NAME, IFACE_MANAGER, IFACE_UPDATE, OBJECT_PATH, update_path
from tests.dbus.harness import AgentHost

DATA = Path(__file__).parent / "data"


def canonical(xml: str, prefix: str = "org.luoagent.") -> str:
    """Our interfaces only; members sorted by kind and name, arguments in order, fixed attribute
    order; so only a change of the API changes the text."""
    root = ET.fromstring(xml)
    lines = ["<node>"]
    for iface in sorted(root.findall("interface"), key=lambda i: i.get("name", "")):
        name = iface.get("name", "")
        if not name.startswith(prefix):
            continue
        lines.append(f'  <interface name="{name}">')
        for kind in ("method", "signal", "property"):
            for member in sorted(iface.findall(kind), key=lambda m: m.get("name", "")):
                attrs = _attrs(member, ("name", "type", "access"))
                args = member.findall("arg")
                annotations = member.findall("annotation")
                if not args and not annotations:
                    lines.append(f"    <{kind} {attrs}/>")
                    continue
                lines.append(f"    <{kind} {attrs}>")
                for arg in args:
                    direction = arg.get("direction") or ("out" if kind == "signal" else "in")
                    if kind == "signal":
                        direction = "out"  # signal arguments have no direction
                    lines.append(
                        f'      <arg name="{arg.get("name", "")}" type="{arg.get("type")}"'
                        f' direction="{direction}"/>'
                    )
                for ann in sorted(annotations, key=lambda a: a.get("name", "")):
                    lines.append(f"      <annotation {_attrs(ann, ('name', 'value'))}/>")
                lines.append(f"    </{kind}>")
        lines.append("  </interface>")
    lines.append("</node>")
    return "\n".join(lines) + "\n"


def _attrs(element: ET.Element, names: tuple[str, ...]) -> str:
    return " ".join(f'{n}="{element.get(n)}"' for n in names if element.get(n) is not None)


async def introspect(bus: MessageBus, path: str) -> str:
    (xml,) = await call(
        bus, "Introspect", interface="org.freedesktop.DBus.Introspectable", path=path
    )
    return str(xml)


def check_golden(name: str, live: str) -> None:
    golden = DATA / name
    if os.environ.get("LUO_UPDATE_GOLDEN") == "1":
        golden.write_text(live)
    text = golden.read_text()
    assert canonical(text) == text, f"{golden} is not in canonical form"
    assert live == text, f"the live API differs from {golden}"


async def test_manager_introspection_matches_the_golden_file(client: MessageBus) -> None:
    live = canonical(await introspect(client, OBJECT_PATH))
    check_golden("manager.xml", live)
    assert f'<interface name="{IFACE_MANAGER}">' in live


async def test_update_introspection_matches_the_golden_file(client: MessageBus) -> None:
    await call(client, "Prepare", "a{sv}", [{"id": Variant("s", "golden-1")}])
    live = canonical(await introspect(client, update_path("golden-1")))
    check_golden("update.xml", live)
    assert f'<interface name="{IFACE_UPDATE}">' in live
    # The Manager's node lists the updates' subtree, so tools can walk to it.
    root = ET.fromstring(await introspect(client, OBJECT_PATH))
    assert "update" in {n.get("name") for n in root.findall("node")}


def busctl_rows(output: str) -> dict[str, tuple[str, str, str]]:
    """``busctl introspect`` rows: member → (type, signature, result/value)."""
    rows = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0].startswith("."):
            rows[parts[0][1:]] = (parts[1], parts[2], parts[3])
    return rows


async def test_busctl_introspect_shows_the_documented_api(host: AgentHost) -> None:
    busctl = shutil.which("busctl")
    if busctl is None:
        pytest.skip("busctl (systemd) is not installed")
    address = os.environ["DBUS_SESSION_BUS_ADDRESS"]
    proc = await asyncio.create_subprocess_exec(
        busctl,
        f"--address={address}",
        "--no-pager",
        "introspect",
        BUS_NAME,
        OBJECT_PATH,
        IFACE_MANAGER,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    rows = busctl_rows(out.decode())
    golden = ET.fromstring((DATA / "manager.xml").read_text())
    (iface,) = golden.findall("interface")
    for method in iface.findall("method"):
        ins = "".join(
            a.get("type", "") for a in method.findall("arg") if a.get("direction") == "in"
        )
        outs = "".join(
            a.get("type", "") for a in method.findall("arg") if a.get("direction") == "out"
        )
        assert rows[method.get("name", "")] == ("method", ins or "-", outs or "-")
    for signal in iface.findall("signal"):
        sig = "".join(a.get("type", "") for a in signal.findall("arg"))
        assert rows[signal.get("name", "")][:2] == ("signal", sig)
    for prop in iface.findall("property"):
        assert rows[prop.get("name", "")][:2] == ("property", prop.get("type"))
    # busctl read the properties through the agent too.
    assert rows["Phase"][2] == '"idle"'
    assert rows["KernelAbi"][2] == '"session"'
