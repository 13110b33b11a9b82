"""What liveupdatectl prints, and the exit codes it returns.

Human text by default; with ``--json`` JSON lines: live ``event`` documents, then exactly one
``result`` or ``error`` document (``"schema": "liveupdatectl/1"``, docs/cli-schema.json).
"""

from __future__ import annotations

import enum
import json
import sys
from collections.abc import Callable
from typing import Any, Final

from dbus_fast import Variant

SCHEMA: Final = "liveupdatectl/1"


class ExitCode(enum.IntEnum):
    OK = 0
    FAILURE = 1  # the operation ran and failed (a participant, the kernel)
    NOTHING_TO_DO = 2  # reserved: no command returns it (argparse's usage code elsewhere)
    BUSY = 3  # another update is in progress / the kernel device is held by someone else
    BLOCKED = 4  # check found blockers / wrong phase for this command
    NOT_AUTHORIZED = 5
    INVALID = 6  # a bad argument
    ENDED = 7  # the id names an update that has ended (its result is in the message)
    UNAVAILABLE = 69  # the agent is not running or not reachable (EX_UNAVAILABLE)


class Output:
    def __init__(self, as_json: bool, command: str) -> None:
        self.as_json = as_json
        self.command = command

    def line(self, text: str) -> None:
        if not self.as_json:
            print(text, flush=True)

    def event(self, **fields: Any) -> None:
        """Live progress: JSON lines with --json, text otherwise."""
        if self.as_json:
            print(
                json.dumps({"schema": SCHEMA, "type": "event", "command": self.command, **fields}),
                flush=True,
            )

    def result(self, data: dict[str, Any], human: Callable[[], None]) -> None:
        if self.as_json:
            document = {"schema": SCHEMA, "type": "result", "command": self.command, **data}
            print(json.dumps(document, default=str), flush=True)
        else:
            human()

    def error(self, name: str, message: str, code: ExitCode, hint: str = "") -> None:
        """The error document (--json), or the error and a hint for a person (systemd's style)."""
        if self.as_json:
            print(
                json.dumps(
                    {
                        "schema": SCHEMA,
                        "type": "error",
                        "command": self.command,
                        "error": name,
                        "message": message,
                        "exit": int(code),
                    }
                ),
                flush=True,
            )
        else:
            print(f"liveupdatectl: {message or name} ({name})", file=sys.stderr, flush=True)
            if hint:
                print(f"Hint: {hint}", file=sys.stderr, flush=True)


def jsonable(value: Any) -> Any:
    if isinstance(value, Variant):
        return jsonable(value.value)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value
