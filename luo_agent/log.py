"""structlog set-up: key=value lines for the journal (journald adds the timestamps), colourless
console rendering on a tty.  The only module that calls ``structlog.configure``."""

from __future__ import annotations

import logging
import os
import sys
from typing import Literal

import structlog

LogMode = Literal["auto", "journal", "console"]


def configure_logging(mode: LogMode = "auto", level: str = "info") -> None:
    if mode == "auto":
        mode = (
            "journal" if os.environ.get("JOURNAL_STREAM") or not sys.stderr.isatty() else "console"
        )
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
    ]
    match mode:
        case "journal":
            processors += [
                structlog.processors.format_exc_info,
                structlog.processors.KeyValueRenderer(
                    key_order=["level", "event", "update_id"], drop_missing=True
                ),
            ]
        case "console":
            processors += [
                structlog.processors.TimeStamper(fmt="%H:%M:%S"),
                structlog.dev.ConsoleRenderer(colors=False),
            ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
