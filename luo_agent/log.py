"""structlog set-up: key=value lines for the journal (journald adds the timestamps), colourless
console rendering on a tty.  The only module that calls ``structlog.configure``."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, MutableMapping
from typing import Any, Literal

import structlog

LogMode = Literal["auto", "journal", "console"]


class _UpdateId:
    """Adds ``update_id`` to every line logged while an update is in progress, whichever task or
    thread logs it (the D-Bus handlers, the gate, the kernel thread): ``journalctl
    UPDATE_ID=…``-style filtering by key=value needs it on each line, not only on the agent's."""

    def __init__(self) -> None:
        self.source: Callable[[], str] | None = None

    def __call__(
        self, logger: Any, method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        if self.source is not None and "update_id" not in event_dict:
            update_id = self.source()
            if update_id:
                event_dict["update_id"] = update_id
        return event_dict


_update_id = _UpdateId()


def log_update_ids_from(source: Callable[[], str] | None) -> None:
    """Where the current update id comes from (the composition root passes the agent's)."""
    _update_id.source = source


def configure_logging(mode: LogMode = "auto", level: str = "info") -> None:
    if mode == "auto":
        mode = (
            "journal" if os.environ.get("JOURNAL_STREAM") or not sys.stderr.isatty() else "console"
        )
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        _update_id,
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
