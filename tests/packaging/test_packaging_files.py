"""The packaging files and the operator documentation against the code, without building: the
activation file names the unit's alias, the example configuration is exactly the defaults, every
configuration key is documented, the vendored pins satisfy pyproject.toml, and every file the
Debian package installs exists."""

from __future__ import annotations

import configparser
import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement

from luo_agent.config import Config, parse_config

REPO = Path(__file__).resolve().parents[2]
PACKAGING = REPO / "packaging"


def _ini(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text())
    return parser


def test_bus_activation_starts_the_alias_of_the_agent_unit() -> None:
    activation = _ini(PACKAGING / "dbus/org.luoagent.LiveUpdate1.service")["D-BUS Service"]
    unit = _ini(REPO / "units/luo-agent.service")
    assert activation["Name"] == unit["Service"]["BusName"] == "org.luoagent.LiveUpdate1"
    assert activation["Exec"] == "/bin/false" and activation["User"] == "root"
    assert activation["SystemdService"] == unit["Install"]["Alias"]


def test_example_configuration_is_exactly_the_defaults() -> None:
    example = PACKAGING / "examples/config.toml"
    assert parse_config(example.read_text(), str(example)) == Config()


def _keys(cls: type[Any], prefix: str = "") -> list[str]:
    keys = []
    for field in dataclasses.fields(cls):
        default = getattr(cls(), field.name)
        if dataclasses.is_dataclass(default):
            keys += _keys(type(default), f"{prefix}{field.name}.")
        else:
            keys.append(f"{prefix}{field.name}")
    return keys


def test_every_configuration_key_is_documented_with_its_default() -> None:
    doc = (REPO / "docs/configuration.md").read_text()
    rows = {m[1]: m[2] for m in re.finditer(r"^\| `([a-z_.]+)` \| ([^|]+) \|", doc, re.M)}
    keys = _keys(Config)
    assert sorted(rows) == sorted(keys)
    defaults = Config()
    for key in keys:
        value: Any = defaults
        for part in key.split("."):
            value = getattr(value, part)
        shown = rows[key].strip().strip("`")
        expected = "unset" if value is None else tomllib.loads(f"v = {shown}")["v"]
        if isinstance(expected, list):  # a TOML array is a tuple in the frozen Config
            expected = tuple(expected)
        if value is None:
            assert shown == expected, key
        else:
            assert str(expected) == str(value), (key, shown, value)


def test_vendored_pins_satisfy_pyproject() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = {Requirement(r).name: Requirement(r) for r in project["dependencies"]}
    pinned = {}
    for line in (PACKAGING / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", line  # exact pins: the package is reproducible
            pinned[requirement.name] = spec.version
    for name, requirement in wanted.items():
        assert name in pinned, name
        assert requirement.specifier.contains(pinned[name]), (name, pinned[name])


def test_every_file_the_debian_package_installs_exists() -> None:
    for line in (PACKAGING / "debian/luo-agent.install").read_text().splitlines():
        source, _destination = line.split()
        assert list(REPO.glob(source)), source
    for line in (PACKAGING / "debian/luo-agent.examples").read_text().splitlines():
        assert (REPO / line).is_file(), line
    for wrapper in ("luo-agent", "liveupdatectl"):
        text = (PACKAGING / "debian/wrappers" / wrapper).read_text()
        assert text.startswith("#!/usr/lib/luo-agent/bin/python3 -I\n"), wrapper
    # The units link their documentation by its installed path.
    for unit in (REPO / "units").iterdir():
        for link in re.findall(r"file:/usr/share/doc/luo-agent/(\S+)", unit.read_text()):
            assert (REPO / "docs" / link).is_file(), (unit.name, link)
