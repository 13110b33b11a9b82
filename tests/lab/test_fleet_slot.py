"""The fleet-slot lab scenario's verdict (``lab.fleet_slot.checks``) on run directories written
as the VM job writes them: it passes only when the slot was taken before the freeze, still held
when read in the new boot, then released, and the history says so."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from lab import fleet_slot
from lab.liveupdate import UpdateRun
from lab.vm import VmResult

HOST = "e23e659f8de24453aa40bfd1da9287ba"
UPDATE = "20261207-050337-3e8347"


def _range(holders: list[str] | None, revision: int) -> str:
    """One answer of etcd's /v3/kv/range, as the job's read_key saves it."""
    answer: dict[str, object] = {"header": {"revision": str(revision)}}
    if holders is not None:
        value = json.dumps({"total_slots": 1, "holders": holders}).encode()
        answer["kvs"] = [{"key": "", "value": base64.b64encode(value).decode()}]
    return json.dumps(answer)


# The record's phases of an update that took its slot before the freeze.
PHASES = ["preparing", "prepared", "coordinating", "freezing", "rebooting", "updated", "idle"]


def _history(phases: list[str]) -> str:
    timings = [[phase, 1000.0 + n, 0.1] for n, phase in enumerate(phases)]
    entry = {
        "id": UPDATE,
        "fleet-slot": f"{HOST} @ unix:///x",
        "slot-released-at": 1001.0,
        "timings": timings,
    }
    return json.dumps({"history": [entry]})


def _run(tmp_path: Path, **change: str) -> UpdateRun:
    files = {
        "host-id": HOST,
        "host-id.systemd": HOST,
        # Revision 1: no key; 2: the take; 3: the release.
        "fleet-key.jsonl": "\n".join([_range(None, 1), _range([HOST], 2), _range([], 3)]),
        "fleet-key.held.json": _range([HOST], 2),
        "fleet-held-read": "1000.5",
        "history.json": _history(PHASES),
    }
    files.update(change)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    vm = VmResult("exited", 0, 2, 1.0, tmp_path, tmp_path / "serial.log")
    return UpdateRun("fleet-slot", vm, {"update": {"id": UPDATE, "result": "success"}})


def test_a_slot_held_across_the_kexec_then_released_passes(tmp_path: Path) -> None:
    found = fleet_slot.checks(_run(tmp_path))
    assert [what for what, held, _ in found if not held] == []
    assert len(found) == 6


@pytest.mark.parametrize(
    ("change", "failing"),
    [
        ({"fleet-key.held.json": _range([], 3)}, "still held"),
        ({"fleet-key.held.json": ""}, "still held"),
        ({"fleet-key.jsonl": _range([HOST], 2)}, "then nobody"),
        ({"host-id.systemd": "0" * 32}, "machine id"),
        (
            {"history.json": _history([p for p in PHASES if p != "coordinating"])},
            "before the freeze",
        ),
        (
            {
                "history.json": _history(
                    ["preparing", "prepared", "coordinating", "cancelling", "idle"]
                )
            },
            "before the freeze",
        ),
        ({"fleet-held-read": "1002.0"}, "after that read"),
    ],
)
def test_each_missing_fact_fails_its_check(
    tmp_path: Path, change: dict[str, str], failing: str
) -> None:
    failed = [what for what, held, _ in fleet_slot.checks(_run(tmp_path, **change)) if not held]
    assert len(failed) == 1
    assert failing in failed[0]
