"""The shipped security files agree with the code: the bus policy allows exactly the exported
methods, every polkit action the agent asks about is declared (and closed by default), and the
unit's hardening parses and keeps its exposure score."""

from __future__ import annotations

import inspect
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from luo_agent.dbus import manager, update_objects
from luo_agent.dbus.names import BUS_NAME, IFACE_MANAGER, IFACE_UPDATE, POLKIT_PREFIX, POLKIT_VERBS

REPO = Path(__file__).resolve().parents[2]
BUS_POLICY = REPO / "policy" / f"{BUS_NAME}.conf"
POLKIT_POLICY = REPO / "policy" / f"{POLKIT_PREFIX}.policy"
UNIT = REPO / "units" / "luo-agent.service"
# systemd-analyze security --offline: the score (x10) the hardened unit must not exceed.
EXPOSURE_THRESHOLD = 20


def exported_methods(cls: type) -> set[str]:
    return {
        member.__dict__["__DBUS_METHOD"].name
        for _, member in inspect.getmembers(cls)
        if "__DBUS_METHOD" in getattr(member, "__dict__", {})
    }


def default_context_rules() -> list[ET.Element]:
    root = ET.parse(BUS_POLICY).getroot()
    (default,) = [p for p in root.iter("policy") if p.get("context") == "default"]
    return list(default)


def test_bus_policy_allows_exactly_the_exported_methods() -> None:
    allowed: dict[str, set[str]] = {}
    for rule in default_context_rules():
        if rule.tag != "allow":
            continue
        assert rule.get("send_destination") == BUS_NAME
        # Exact interface+member pairs only: a new method is denied until listed.
        assert rule.get("send_member"), ET.tostring(rule)
        allowed.setdefault(rule.get("send_interface", ""), set()).add(rule.get("send_member", ""))
    assert allowed.pop(IFACE_MANAGER) == exported_methods(manager.ManagerInterface)
    assert allowed.pop(IFACE_UPDATE) == exported_methods(manager.UpdateInterface)
    assert allowed == {
        "org.freedesktop.DBus.Introspectable": {"Introspect"},
        "org.freedesktop.DBus.Peer": {"Ping", "GetMachineId"},
        "org.freedesktop.DBus.Properties": {"Get", "GetAll"},
    }


def test_only_root_owns_the_name() -> None:
    root = ET.parse(BUS_POLICY).getroot()
    owners = {
        (p.get("user") or p.get("context"), rule.tag)
        for p in root.iter("policy")
        for rule in p
        if rule.get("own") == BUS_NAME
    }
    assert owners == {("root", "allow"), ("default", "deny")}


def test_every_polkit_action_the_agent_asks_about_is_declared_closed() -> None:
    asked = set(POLKIT_VERBS.values())
    assert asked >= {
        "prepare",
        "execute",
        "cancel",
        "finish",
        "load-kernel",
        "preserve",
        "retrieve",
    }
    actions = {
        action.get("id"): {d.tag: d.text for d in action.find("defaults") or ()}
        for action in ET.parse(POLKIT_POLICY).getroot().iter("action")
    }
    # Nothing declared that the agent never asks about.
    assert set(actions) == {f"{POLKIT_PREFIX}.{verb}" for verb in asked}
    for verb in asked:
        defaults = actions[f"{POLKIT_PREFIX}.{verb}"]
        # Remote and inactive sessions never; a local active admin only after authenticating.
        assert defaults["allow_any"] == "no", verb
        assert defaults["allow_inactive"] == "no", verb
        assert defaults["allow_active"] in ("auth_admin", "auth_admin_keep"), verb


def test_the_manager_authorizes_the_methods_of_the_table() -> None:
    source = inspect.getsource(manager) + inspect.getsource(update_objects)
    authorized = set(re.findall(r'authorize\(\s*"([A-Za-z]+)"', source))
    assert authorized == set(POLKIT_VERBS)
    exported = exported_methods(manager.ManagerInterface) | exported_methods(
        update_objects.UpdateInterface
    )
    assert set(POLKIT_VERBS) <= exported


def test_the_security_doc_names_the_verbs_of_the_table() -> None:
    """docs/security.md's table of methods: each method's polkit action is its verb here."""
    documented: dict[str, str] = {}
    for line in (REPO / "docs" / "security.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0].startswith("`"):
            continue
        verb = re.search(r"`([a-z-]+)`", cells[2])
        for method in re.findall(r"`(?:Update\.)?([A-Za-z]+)`", cells[0]):
            documented[method] = verb.group(1) if verb else ""
    for method, verb in POLKIT_VERBS.items():
        assert documented.get(method) == verb, method


def unit_directives() -> dict[str, list[str]]:
    directives: dict[str, list[str]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif "=" in line and not line.startswith("#") and section == "Service":
            key, _, value = line.partition("=")
            directives.setdefault(key, []).append(value)
    return directives


def test_unit_hardening_keeps_what_the_agent_needs() -> None:
    service = unit_directives()
    assert service["CapabilityBoundingSet"] == ["CAP_SYS_BOOT CAP_SYS_ADMIN"]
    assert service["DevicePolicy"] == ["closed"]
    assert service["DeviceAllow"] == ["/dev/liveupdate rw"]
    assert service["RestrictAddressFamilies"] == ["AF_UNIX"]
    assert "@reboot" in service["SystemCallFilter"][0].split()  # kexec_file_load, reboot
    # No ProcSubset=pid: the agent reads /proc/cmdline.  No PrivateDevices=: /dev/liveupdate.
    assert "ProcSubset" not in service and "PrivateDevices" not in service
    assert service["ProtectSystem"] == ["strict"]
    assert service["StateDirectory"] == ["luo-agent"]
    assert service["RuntimeDirectory"] == ["luo-agent"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_unit_parses_and_scores(tmp_path: Path) -> None:
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(UNIT)], capture_output=True, text=True, cwd=tmp_path
    )
    complaints = [
        line
        for line in verify.stderr.splitlines()
        # Not installed here: the binary and the man page the unit names.  systemd < 254 ignores
        # FileDescriptorStorePreserve= (only the systemd reboot strategy needs it: docs/units.md).
        if "/usr/bin/luo-agent" not in line
        and "man liveupdatectl" not in line
        and "Unknown key 'FileDescriptorStorePreserve'" not in line
    ]
    assert complaints == []
    security = subprocess.run(
        [
            *("systemd-analyze", "security", "--offline=yes"),
            *(f"--threshold={EXPOSURE_THRESHOLD}", str(UNIT)),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert security.returncode == 0, security.stdout[-2000:]
    assert re.search(r"Overall exposure level for luo-agent.service: 1\.\d OK", security.stdout)
