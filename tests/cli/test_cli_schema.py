"""docs/cli-schema.json itself: it covers every command, and the checker used by the CLI tests
rejects what the schema forbids (so a passing CLI test means something)."""

from __future__ import annotations

from typing import Any

import pytest

from luo_agent.cli import COMMANDS, SCHEMA, ExitCode
from tests.cli import schema


def test_schema_names_its_version_and_every_command_and_exit_code() -> None:
    root = schema.load()
    assert root["$id"] == SCHEMA
    assert root["$defs"]["schema"] == {"const": SCHEMA}
    # "fleet" asks the coordinator, not the agent: it is no entry of COMMANDS.
    assert set(root["$defs"]["command"]["enum"]) == {*COMMANDS, "fleet"}
    error_exits = set(root["$defs"]["error"]["properties"]["exit"]["enum"])
    assert error_exits == {int(c) for c in ExitCode if c is not ExitCode.OK}


GOOD: dict[str, Any] = {"schema": SCHEMA, "type": "result", "command": "cancel", "update": "u"}


@pytest.mark.parametrize(
    "document",
    [
        {**GOOD, "schema": "liveupdatectl/2"},
        {**GOOD, "type": "answer"},
        {k: v for k, v in GOOD.items() if k != "command"},
        {**GOOD, "command": "status"},  # a status result needs "status"
        {**GOOD, "command": "preserve", "session": "s", "token": -1},
        {**GOOD, "command": "preserve", "session": "s", "token": 2**64},
        {"schema": SCHEMA, "type": "event", "command": "update", "event": "phase", "x": 1},
        {"schema": SCHEMA, "type": "error", "command": "check", "error": "E", "message": "",
         "exit": 0},
        {**GOOD, "command": "update", "update": "u", "phase": "exploded"},
        {**GOOD, "command": "sessions", "sessions": [{"session": "s", "token": 1}]},
    ],
)  # fmt: skip
def test_the_checker_rejects_documents_outside_the_schema(document: dict[str, Any]) -> None:
    with pytest.raises(AssertionError):
        schema.validate(document)


def test_the_checker_accepts_a_good_document() -> None:
    schema.validate(GOOD)
    schema.validate({**GOOD, "command": "update", "phase": "rebooting", "result": ""})
