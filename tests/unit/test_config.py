"""The TOML configuration: real files, every error names the file and the key."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from luo_agent.config import Config, Timeouts, load_config, parse_config
from luo_agent.errors import ConfigError, InvalidArgument
from luo_agent.kernel.device import Abi
from luo_agent.phase import TIMED_STEPS


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_empty_file_is_the_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == Config()


def test_every_section_overrides(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            f"""
bus = "session"
systemd_user_mode = true
state_directory = "/srv/luo"
auto_finish = false
[timeouts]
prepare = 5
freeze = 0.5
[kernel]
abi = "{Abi.V3}"
emulate_root = "/tmp/machine"
busy_retry_seconds = 2
[limits]
max_sessions = 3
""",
        )
    )
    assert config.bus == "session" and config.systemd_user_mode and not config.auto_finish
    assert str(config.state_directory) == "/srv/luo"
    assert (config.timeouts.prepare, config.timeouts.freeze, config.timeouts.cancel) == (
        5.0,
        0.5,
        120.0,
    )
    assert config.kernel.abi is Abi.V3 and str(config.kernel.emulate_root) == "/tmp/machine"
    assert config.kernel.busy_retry_seconds == 2.0
    assert config.limits.max_sessions == 3 and config.limits.max_fds_total == 1024


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("nope = 1", "nope", "unknown key"),
        ("[timeouts]\nprepare = -1", "timeouts.prepare", "positive number"),
        ("[timeouts]\nprepare = true", "timeouts.prepare", "positive number"),
        ("[timeouts]\nwhenever = 1", "timeouts.whenever", "unknown key"),
        ('bus = "tcp"', "bus", "one of system, session"),
        ('reboot_strategy = "soft-reboot"', "reboot_strategy", "one of direct, systemd, auto"),
        ('[kernel]\nabi = "g0"', "kernel.abi", "one of auto"),
        ('[kernel]\nemulate_root = "relative"', "kernel.emulate_root", "absolute path"),
        ("auto_finish = 1", "auto_finish", "true or false"),
        ("[limits]\nmax_sessions = 0", "limits.max_sessions", "positive integer"),
        ("timeouts = 3", "timeouts", "must be a table"),
        ("bus = [", "-", "not valid TOML"),
    ],
)
def test_errors_name_the_file_and_the_key(tmp_path: Path, text: str, key: str, reason: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.path == str(path)
    assert info.value.key == key
    assert reason in info.value.reason


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        load_config(tmp_path / "missing.toml")


def test_parse_config_defaults_the_path_name() -> None:
    with pytest.raises(ConfigError, match="<config>: bus"):
        parse_config('bus = "x"')


def test_timeouts_defaults_and_lookup_by_step() -> None:
    timeouts = Timeouts()
    assert {step: timeouts.seconds(step) for step in TIMED_STEPS} == {
        "prepare": 300.0,
        "coordinate": 1800.0,
        "freeze": 60.0,
        "cancel": 120.0,
        "restore": 300.0,
        "finish": 120.0,
    }
    assert Timeouts(freeze=5).seconds("freeze") == 5
    # Every timed step of the engine has its key, and no key is left over.
    assert [f.name for f in dataclasses.fields(Timeouts)] == list(TIMED_STEPS)


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf, True, "60"])
def test_timeouts_reject_nonsense(bad: object) -> None:
    with pytest.raises(InvalidArgument, match="freeze"):
        Timeouts(freeze=bad)  # type: ignore[arg-type]
