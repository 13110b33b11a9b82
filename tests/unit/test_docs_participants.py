"""docs/participants.md shows the smallest participants verbatim: the files the e2e tests run."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GUIDE = (REPO / "docs/participants.md").read_text()


@pytest.mark.parametrize(
    "path",
    [
        "luo_agent/examples/counter.py",
        "luo_agent/examples/counter.sh",
        "units/luo-example-counter.service",
    ],
)
def test_the_guide_shows_the_tested_file_unchanged(path: str) -> None:
    assert (REPO / path).read_text() in GUIDE


def test_the_counter_is_about_fifteen_lines_of_code() -> None:
    code = [
        line
        for line in (REPO / "luo_agent/examples/counter.py")
        .read_text()
        .split('"""')[2]
        .splitlines()
        if line.strip()
    ]
    assert len(code) <= 18, code
