"""``liveupdatectl fleet …`` against a real etcd: the same holders as airlock's key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from luo_agent.fleet.etcd import SEMAPHORE_KEY, EtcdCoordinator, EtcdGateway
from luo_agent.fleet.identity import host_id_from_machine_id
from luo_agent.fleet.port import Acquired
from tests.cli import schema

from .etcd_server import Cluster


def ctl(config: Path, *args: str) -> tuple[int, dict[str, object]]:
    done = subprocess.run(
        [sys.executable, "-m", "luo_agent.cli", "fleet", "--config", str(config), *args, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    document = json.loads(done.stdout.splitlines()[-1])
    schema.validate(document)  # docs/cli-schema.json
    return done.returncode, document


async def test_fleet_commands(tmp_path: Path, etcd: Cluster, group: str) -> None:
    machine_id = tmp_path / "machine-id"
    machine_id.write_text("00112233445566778899aabbccddeeff\n")
    config = tmp_path / "config.toml"
    config.write_text(
        f'[fleet]\nenabled = true\nendpoints = {json.dumps(etcd.endpoints)}\ngroup = "{group}"\n'
        f'slots = 2\nmachine_id_file = "{machine_id}"\n'
    )
    me = host_id_from_machine_id(machine_id)
    others = [
        EtcdCoordinator(EtcdGateway(etcd.endpoints), host_id=h, group=group, slots=2)
        for h in ("peer-b", "peer-a")
    ]
    for other in others:
        assert await other.acquire() is Acquired.HELD
    code, doc = ctl(config, "status")
    assert code == 0
    fleet = doc["fleet"]
    assert isinstance(fleet, dict)
    stored = json.loads(etcd.get(SEMAPHORE_KEY.format(group=group)) or "")
    assert fleet["semaphores"] == [
        {"group": group, "total_slots": stored["total_slots"], "holders": stored["holders"]}
    ]
    assert stored["holders"] == ["peer-a", "peer-b"]
    assert fleet["host"] == me and fleet["holding"] is False
    assert ctl(config, "set-max", "3")[0] == 0
    assert json.loads(etcd.get(SEMAPHORE_KEY.format(group=group)) or "")["total_slots"] == 3
    assert ctl(config, "halt", "--reason", "bad kernel")[0] == 0
    assert (await others[0].status()).halted == "bad kernel"
    await others[0].resume()
    assert ctl(config, "release", "peer-a", "--force")[0] == 0
    assert json.loads(etcd.get(SEMAPHORE_KEY.format(group=group)) or "")["holders"] == ["peer-b"]
    code, doc = ctl(config, "set-max", "0")
    assert code == 1 and "at least one slot" in str(doc["message"])
