"""docs/cli.md's exit-code table is the code's: every code and name of ``ExitCode``, and each
D-Bus error name in a row's text is one ``ERROR_EXIT`` maps to that row's code (and the other way
round)."""

from __future__ import annotations

import re
from pathlib import Path

from luo_agent.cli import ExitCode
from luo_agent.cli.program import ERROR_EXIT

DOC = (Path(__file__).resolve().parents[2] / "docs/cli.md").read_text()


def exit_table() -> dict[int, tuple[str, str]]:
    section = DOC.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d+) \| `(\w+)` \| (.*) \|$", section, re.MULTILINE)
    return {int(code): (name, text) for code, name, text in rows}


def test_the_table_lists_every_exit_code_by_its_name() -> None:
    assert {code: name for code, (name, _) in exit_table().items()} == {
        int(c): c.name for c in ExitCode
    }


def test_each_error_name_is_in_the_row_of_its_code() -> None:
    table = exit_table()
    for error, code in ERROR_EXIT.items():
        short = error.rsplit(".", 1)[1]
        rows = [c for c, (_, text) in table.items() if f"`{short}`" in text]
        assert rows == [int(code)], (error, rows)


def test_cancel_with_nothing_to_cancel_is_wrong_phase_like_any_command() -> None:
    assert ERROR_EXIT["org.luoagent.LiveUpdate1.Error.WrongPhase"] == ExitCode.BLOCKED
    assert "| requested (4, `WrongPhase`, if nothing to cancel) |" in DOC
