"""The host id (stable, machine-id based) and building a coordinator from ``[fleet]``."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from luo_agent.config import FleetConfig, parse_config
from luo_agent.errors import ConfigError
from luo_agent.fleet import make_coordinator
from luo_agent.fleet.identity import APP_ID, app_specific_id, host_id_from_machine_id


@pytest.mark.skipif(shutil.which("systemd-id128") is None, reason="no systemd-id128")
def test_host_id_is_systemds_app_specific_machine_id() -> None:
    # systemd-id128 reads this machine's /etc/machine-id: the same derivation, byte for byte.
    out = subprocess.run(
        ["systemd-id128", f"--app-specific={APP_ID.hex()}", "machine-id"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert host_id_from_machine_id(Path("/etc/machine-id")) == out


def test_host_id_hides_the_machine_id_and_refuses_nonsense(tmp_path: Path) -> None:
    machine_id = "0123456789abcdef0123456789abcdef"
    path = tmp_path / "machine-id"
    path.write_text(machine_id + "\n")
    host = host_id_from_machine_id(path)
    assert host == app_specific_id(bytes.fromhex(machine_id))
    assert machine_id not in host and len(host) == 32
    for bad in ("", "uninitialized", "0" * 32, "ab" * 17):
        path.write_text(bad)
        with pytest.raises(ConfigError, match="not a machine id"):
            host_id_from_machine_id(path)


def test_fleet_table_parses() -> None:
    config = parse_config(
        '[fleet]\nenabled = true\nendpoints = ["http://127.0.0.1:1", "unix:///run/etcd.sock"]\n'
        'zone = "rack-1"\nfailure_budget = 0\n'
    )
    assert config.fleet.endpoints == ("http://127.0.0.1:1", "unix:///run/etcd.sock")
    assert config.fleet.zone == "rack-1" and config.fleet.failure_budget == 0
    for text, key in (
        ("[fleet]\nendpoints = []", "fleet.endpoints"),
        ('[fleet]\ncoordinator = "zk"', "fleet.coordinator"),
        ("[fleet]\nslots = 0", "fleet.slots"),
        ('[fleet]\npassword_file = "relative"', "fleet.password_file"),
    ):
        with pytest.raises(ConfigError, match=key):
            parse_config(text)


def test_make_coordinator_checks_what_it_is_given(tmp_path: Path) -> None:
    machine_id = tmp_path / "machine-id"
    machine_id.write_text("0123456789abcdef0123456789abcdef\n")
    base = FleetConfig(enabled=True, machine_id_file=machine_id)
    assert make_coordinator(base).host_id == host_id_from_machine_id(machine_id)
    with pytest.raises(ConfigError, match=r"fleet\.group"):
        make_coordinator(FleetConfig(group="a/b", machine_id_file=machine_id))
    with pytest.raises(ConfigError, match=r"fleet\.endpoints"):
        make_coordinator(FleetConfig(endpoints=("ftp://x",), machine_id_file=machine_id))
    with pytest.raises(ConfigError, match=r"fleet\.password_file"):
        make_coordinator(FleetConfig(username="u", machine_id_file=machine_id))
    # etcd's own flag (--listen-client-urls unix://etcd.sock:0) names a file in its working
    # directory: the agent wants the absolute path and says so.
    with pytest.raises(ConfigError, match=r"unix:///that/directory/etcd\.sock:0"):
        make_coordinator(FleetConfig(endpoints=("unix://etcd.sock:0",), machine_id_file=machine_id))
    key = tmp_path / "client.key"
    key.write_text("not a key")
    os.chmod(key, 0o640)
    with pytest.raises(ConfigError, match="no group or other access"):
        make_coordinator(
            FleetConfig(
                endpoints=("https://127.0.0.1:2379",),
                cert_file=key,
                key_file=key,
                machine_id_file=machine_id,
            )
        )
