"""The history's bound and the ids rotated out of it: an id names one update for ever, so the
outcome of every ended update stays findable (``History.outcome``), by this agent and the next."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from luo_agent import persist
from luo_agent.dbus.values import history_entry, result_summary
from luo_agent.errors import ErrorCode
from luo_agent.kernel.device import Abi
from luo_agent.persist import History
from luo_agent.records import UpdateRecord

ERROR_NAME_ABORTED = "org.luoagent.LiveUpdate1.Error.Aborted"


def ended(update_id: str, result: str = "success") -> UpdateRecord:
    return UpdateRecord(id=update_id, abi=Abi.SESSION).ended(result, "", f"{update_id} done")


def test_rotated_updates_stay_findable_in_the_archive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(persist, "HISTORY_LIMIT", 3)
    history = History(tmp_path)
    assert history.outcome("u0") is None
    for n in range(7):
        history.append(ended(f"u{n}", "failed" if n == 0 else "success"))
    assert [e["id"] for e in history.load()] == ["u4", "u5", "u6"]  # the bound holds
    archive = json.loads(history.archive_path.read_bytes())
    assert [e["id"] for e in archive] == ["u0", "u1", "u2", "u3"]
    assert set(archive[0]) == set(persist.OUTCOME_KEYS)
    for agent in (history, History(tmp_path)):  # this agent's index, and a new agent's files
        assert agent.outcome("u0") == {
            "id": "u0",
            "result": "failed",
            "error_name": "",
            "message": "u0 done",
            "started_at": archive[0]["started_at"],
            "abi": "session",
        }
        assert all(agent.outcome(f"u{n}") is not None for n in range(7))
        assert agent.outcome("u7") is None


def test_an_update_recorded_again_replaces_only_its_own_entry(tmp_path: Path) -> None:
    history = History(tmp_path)
    history.append(ended("a"))
    history.append(ended("b", "aborted"))
    history.append(ended("b", "cancelled"))  # a restart finishing what a dead agent began
    entries = [(e["id"], e["result"]) for e in history.load()]
    assert entries == [("a", "success"), ("b", "cancelled")]
    outcome = History(tmp_path).outcome("b")
    assert outcome is not None and outcome["result"] == "cancelled"


def test_an_outcome_is_known_even_when_the_disk_refuses_it(tmp_path: Path) -> None:
    history = History(tmp_path)
    history.append(ended("a"))
    assert history.outcome("a") is not None  # the index is built
    (tmp_path / ".history.json.tmp").mkdir()  # the atomic write's temporary file cannot be made
    with pytest.raises(persist.PersistError):
        history.append(ended("b"))
    assert history.outcome("b") is not None
    assert History(tmp_path).outcome("b") is None  # not on disk: only this agent knows it


def test_a_history_written_with_bus_error_names_reads_as_codes(tmp_path: Path) -> None:
    """Until 2026-12 records held the bus's error name; they read as the code, and the bus
    still answers with the same name."""
    old_name = "org.luoagent.LiveUpdate1.Error.TimedOut"
    entry = {"id": "old", "abi": "session", "result": "failed", "error_name": old_name}
    (tmp_path / "history.json").write_text(json.dumps([entry]))
    archived = {"id": "older", "result": "aborted", "error_name": ERROR_NAME_ABORTED}
    (tmp_path / "history-archive.json").write_text(json.dumps([archived]))
    history = History(tmp_path)
    record = UpdateRecord.from_json(history.load()[0])
    assert record.error_name == ErrorCode.TIMED_OUT
    assert history_entry(record)["error-name"].value == old_name
    assert result_summary(record)[2] == old_name
    for update_id, code in (("old", "TimedOut"), ("older", "Aborted")):
        outcome = history.outcome(update_id)
        assert outcome is not None and outcome["error_name"] == code, outcome


def test_a_record_holds_the_code_and_the_bus_names_it(tmp_path: Path) -> None:
    history = History(tmp_path)
    history.append(
        UpdateRecord(id="a", abi=Abi.SESSION).ended("cancelled", ErrorCode.CANCELLED, "why")
    )
    history.append(ended("b"))
    first, second = history.load()
    assert first["error_name"] == "Cancelled" and second["error_name"] == ""
    cancelled, success = (UpdateRecord.from_json(e) for e in (first, second))
    assert (
        history_entry(cancelled)["error-name"].value == "org.luoagent.LiveUpdate1.Error.Cancelled"
    )
    assert history_entry(success)["error-name"].value == ""
