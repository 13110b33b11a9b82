"""Logging: key=value lines for the journal, with the current update's id on every line."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import structlog

from luo_agent.log import configure_logging, log_update_ids_from


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    yield
    log_update_ids_from(None)
    structlog.reset_defaults()


def test_journal_lines_are_key_value_with_the_update_id(capsys: pytest.CaptureFixture[str]) -> None:
    current = {"id": ""}
    configure_logging("journal")
    log_update_ids_from(lambda: current["id"])
    log = structlog.get_logger("t")
    log.info("agent_ready", abi="session")
    current["id"] = "upd-9"
    log.info("phase_changed", phase="prepared")
    # From another thread too (the kernel thread, the systemd thread).
    thread = threading.Thread(target=lambda: log.warning("kernel_busy_retry", attempt=2))
    thread.start()
    thread.join()
    log.info("fd_retrieved", update_id="explicit")
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "level='info' event='agent_ready' abi='session'",
        "level='info' event='phase_changed' update_id='upd-9' phase='prepared'",
        "level='warning' event='kernel_busy_retry' update_id='upd-9' attempt=2",
        "level='info' event='fd_retrieved' update_id='explicit'",
    ]


def test_debug_is_filtered_by_level(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("journal", "warning")
    log = structlog.get_logger("t")
    log.info("quiet")
    log.warning("loud")
    assert capsys.readouterr().err.splitlines() == ["level='warning' event='loud'"]
