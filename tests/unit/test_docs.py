"""Documentation generated from the code says what the code does."""

from __future__ import annotations

from pathlib import Path

from luo_agent.phase import describe

ARCHITECTURE = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


def test_the_architecture_table_is_the_engine() -> None:
    text = ARCHITECTURE.read_text()
    begin, end = "<!-- BEGIN phase.describe() -->\n", "<!-- END phase.describe() -->"
    assert begin in text and end in text
    copy = text.split(begin, 1)[1].split(end, 1)[0]
    assert copy == describe(), (
        "docs/architecture.md: paste luo_agent.phase.describe() between the markers"
    )
