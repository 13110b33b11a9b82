"""Files the agent writes: its published phase under the runtime directory (for units'
``Condition…=``/``Assert…=`` on every kernel), the in-flight record for a restart in the same boot,
and the history of updates under the state directory (kept across reboots).

Every write is atomic (temp file + rename) so a reader or a crash never sees half a file.  Write
failures (disk full, read-only) raise ``PersistError`` for the caller to report; they never corrupt
what was there before.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

from .errors import LuoError
from .records import UpdateRecord, error_code

HISTORY_LIMIT = 200
# What the archive keeps of an update rotated out of the history: enough to refuse its id with
# its result (about 200-400 bytes an update).
OUTCOME_KEYS: Final = ("id", "result", "error_name", "message", "started_at", "abi")
_CREATE_MARKER = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC


class PersistError(LuoError):
    """A state or history file could not be written (disk full, read-only file system, …)."""


def write_atomic(path: Path, data: bytes, *, durable: bool = False) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        if durable:
            dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise PersistError(f"cannot write {path}: {exc.strerror or exc}") from None


class RuntimeState:
    """``<runtime>/state`` holds the phase name (plus a newline); ``<runtime>/active/<step>`` exists
    while the agent itself runs that phase's gate (the targets assert it); ``current.json`` holds
    the in-flight update."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.active = directory / "active"
        self.state_file = directory / "state"
        self.current_file = directory / "current.json"

    def setup(self) -> None:
        try:
            self.active.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PersistError(f"cannot create {self.active}: {exc.strerror}") from None

    def publish_phase(self, phase: str) -> None:
        write_atomic(self.state_file, f"{phase}\n".encode())

    def set_active(self, steps: Iterable[str]) -> None:
        wanted = set(steps)
        try:
            present = set(os.listdir(self.active))
            for name in present - wanted:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.active / name)
            for name in wanted - present:
                # An empty file appears whole: no temp file and rename needed.
                os.close(os.open(self.active / name, _CREATE_MARKER, 0o644))
        except OSError as exc:  # read-only: reported like a failed write
            raise PersistError(f"cannot update {self.active}: {exc.strerror}") from None

    def save_current(self, record: UpdateRecord | None) -> None:
        if record is None:
            try:
                self.current_file.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise PersistError(f"cannot remove {self.current_file}: {exc.strerror}") from None
            return
        write_atomic(self.current_file, json.dumps(record.to_json()).encode())

    def load_current(self) -> UpdateRecord | None:
        """The in-flight record of this boot, or None.  A corrupt file is moved aside (and
        reported through the raised error) rather than trusted."""
        try:
            raw = self.current_file.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise PersistError(f"cannot read {self.current_file}: {exc.strerror}") from None
        try:
            return UpdateRecord.from_json(json.loads(raw))
        except ValueError as exc:
            aside = self.current_file.with_suffix(".corrupt")
            with contextlib.suppress(OSError):
                os.rename(self.current_file, aside)
            raise PersistError(
                f"{self.current_file} is corrupt ({exc}); moved to {aside}"
            ) from None


class History:
    """Finished updates, newest last, in one JSON file (bounded to HISTORY_LIMIT entries); the
    outcome of every update rotated out of it, in ``history-archive.json`` (unbounded: an id
    names one update for ever, so every id ever ended must stay findable); and
    ``in-flight.json``, the update that is prepared in the kernel, so that a boot that lost it
    (a crash or power cycle, before or after the kexec) can still record it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / "history.json"
        self.archive_path = directory / "history-archive.json"
        self.in_flight_path = directory / "in-flight.json"
        # The outcome of every ended update by id, read once: the agent is the files' only writer.
        self._outcomes: dict[str, dict[str, Any]] | None = None

    def load(self) -> list[dict[str, Any]]:
        return self._load_list(self.path)

    def _load_list(self, path: Path) -> list[dict[str, Any]]:
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return []
        except (OSError, ValueError):
            # A damaged history must not stop the agent: keep it aside for the operator.
            with contextlib.suppress(OSError):
                os.rename(path, path.with_suffix(".corrupt"))
            return []
        return [e for e in data if isinstance(e, dict)] if isinstance(data, list) else []

    def outcome(self, update_id: str) -> dict[str, Any] | None:
        """What update ``update_id`` ended with (``OUTCOME_KEYS``), if it has ended, whether it
        is still in the history or was rotated out of it into the archive."""
        if self._outcomes is None:
            self._outcomes = {
                str(e["id"]): _outcome(e)
                for e in self._load_list(self.archive_path) + self.load()
                if isinstance(e.get("id"), str)
            }
        return self._outcomes.get(update_id)

    def append(self, record: UpdateRecord) -> None:
        entry = record.to_json()
        if self._outcomes is not None:  # known at once, even if the disk refuses the write
            self._outcomes[record.id] = _outcome(entry)
        self._mkdir()
        # The same update recorded again (a restart that finished what a dead agent began)
        # replaces its own entry; another update's id never gets this far (Ledger.begin).
        entries = [e for e in self.load() if e.get("id") != record.id]
        entries.append(entry)
        rotated = entries[:-HISTORY_LIMIT]
        if rotated:
            # The archive first: a crash between the two writes leaves an outcome in both files,
            # never in neither.
            archive = self._load_list(self.archive_path) + [_outcome(e) for e in rotated]
            write_atomic(self.archive_path, json.dumps(archive).encode(), durable=True)
        write_atomic(self.path, json.dumps(entries[-HISTORY_LIMIT:]).encode(), durable=True)

    def save_in_flight(self, record: UpdateRecord) -> None:
        self._mkdir()
        write_atomic(self.in_flight_path, json.dumps(record.to_json()).encode(), durable=True)

    def load_in_flight(self) -> UpdateRecord | None:
        """The update a previous boot (or agent) had prepared, or None; unreadable counts as
        none (it is written atomically, so only a damaged disk makes it so)."""
        try:
            data = json.loads(self.in_flight_path.read_bytes())
            return UpdateRecord.from_json(data) if isinstance(data, dict) else None
        except (OSError, ValueError):
            return None

    def clear_in_flight(self) -> None:
        try:
            self.in_flight_path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise PersistError(f"cannot remove {self.in_flight_path}: {exc.strerror}") from None

    def _mkdir(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PersistError(f"cannot create {self.directory}: {exc.strerror}") from None


def _outcome(entry: dict[str, Any]) -> dict[str, Any]:
    outcome: dict[str, Any] = {key: entry[key] for key in OUTCOME_KEYS if key in entry}
    if "error_name" in outcome:
        outcome["error_name"] = error_code(outcome["error_name"])
    return outcome
