"""What callers send, checked before anything else sees it: update ids, session names and the
``a{sv}`` options dictionaries.  Each check raises ``InvalidArgument`` with a message that repeats
at most ``MAX_SHOWN`` characters of the caller's string."""

from __future__ import annotations

from typing import Any

from dbus_fast import Variant

from ..agent import UPDATE_ID_RE
from ..errors import InvalidArgument

MAX_NAME = 63
MAX_OPTIONS = 16
# How much of a caller's string an error message repeats (the reply and the log line).
MAX_SHOWN = 64


def shown(text: str) -> str:
    """A caller's string as an error message repeats it: quoted, cut to MAX_SHOWN characters."""
    if len(text) <= MAX_SHOWN:
        return repr(text)
    return f"{text[:MAX_SHOWN]!r}... ({len(text)} characters)"


def parse_options(options: dict[str, Variant], allowed: dict[str, str]) -> dict[str, Any]:
    """Unknown keys and wrong types are refused (RAUC's rule): a typo must not be ignored.
    Parsed after authorisation: an unauthorised caller learns nothing from its options."""
    if len(options) > MAX_OPTIONS:
        raise InvalidArgument(f"too many options ({len(options)} > {MAX_OPTIONS})")
    out: dict[str, Any] = {}
    for key, value in options.items():
        signature = allowed.get(key)
        if signature is None:
            known = ", ".join(sorted(allowed)) or "none"
            raise InvalidArgument(f"unknown option {shown(key)} (known: {known})")
        if value.signature != signature:
            raise InvalidArgument(f"option {key!r} must have type {signature}")
        out[key] = value.value
    return out


def check_session_name(name: str) -> str:
    raw = name.encode()
    if not raw or len(raw) > MAX_NAME or "\0" in name:
        raise InvalidArgument(f"a session name is 1-{MAX_NAME} bytes without NUL")
    return name


def requested_id(options: dict[str, Variant]) -> str:
    """The ``id`` option, checked, for authorisation (the whole dictionary is parsed after)."""
    value = options.get("id")
    if value is None or value.signature != "s":
        return ""
    return check_update_id(value.value)


def check_update_id(update_id: str) -> str:
    """Checked before anything else sees it (a 1 MB id must not reach polkit or the log)."""
    if update_id and not UPDATE_ID_RE.match(update_id):
        raise InvalidArgument("an update id is 1-64 characters of [A-Za-z0-9_-] ('' = current)")
    return update_id
