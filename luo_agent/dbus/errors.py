"""The one table from domain errors to registered D-Bus error names, and the boundary that applies
it: a handler's ``LuoError`` leaves as its named error with a clear message; anything else is logged
with its traceback and leaves as an opaque ``Failed`` (never a traceback on the wire)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Final

import structlog
from dbus_fast import DBusError

from .. import errors as e
from .names import error, recorded_error

log = structlog.get_logger(__name__)

# Most specific first: the first isinstance match wins.
ERROR_NAMES: Final[tuple[tuple[type[e.LuoError], str], ...]] = (
    (e.NotAuthorized, error("NotAuthorized")),
    (e.Busy, error("Busy")),
    (e.UpdateEnded, error("UpdateEnded")),
    (e.PhaseError, error("WrongPhase")),
    (e.InvalidArgument, error("InvalidArgument")),
    (e.NoSuchSession, error("NoSuchSession")),
    (e.NoSuchToken, error("NoSuchToken")),
    (e.AlreadyExists, error("AlreadyExists")),
    (e.Unsupported, error("Unsupported")),
    (e.DeviceBusy, error("KernelBusy")),
    (e.DeviceUnavailable, error("KernelUnavailable")),
    (e.WrongKernelState, error("KernelState")),
    (e.KernelError, error("KernelError")),
    (e.GateError, error("ParticipantFailed")),
    (e.HandoverCorrupt, error("HandoverCorrupt")),
    (e.CoordinatorError, error("CoordinatorError")),
    (e.LuoError, error("Failed")),
)

FAILED: Final = error("Failed")
ALL_ERROR_NAMES: Final = tuple(dict.fromkeys(name for _, name in ERROR_NAMES))


def error_name(exc: BaseException) -> str:
    for cls, name in ERROR_NAMES:
        if isinstance(exc, cls):
            return name
    return FAILED


def to_dbus_error(exc: BaseException) -> DBusError:
    if isinstance(exc, e.LuoError):
        text = str(exc)
        if isinstance(exc, e.UpdateEnded):
            text = exc.text(recorded_error(exc.error_name))
        elif isinstance(exc, e.KernelError):
            # Callers script on the errno, not on the text.
            text = f"{text} [errno={exc.errno}]"
        return DBusError(error_name(exc), text)
    return DBusError(FAILED, "internal error (logged by the agent)")


@contextlib.contextmanager
def dbus_errors(method: str) -> Iterator[None]:
    """Wrap every exported method body: the only place domain errors become D-Bus errors."""
    try:
        yield
    except DBusError:
        raise
    except e.LuoError as exc:
        log.info("method_refused", method=method, error=error_name(exc), reason=str(exc))
        raise to_dbus_error(exc) from None
    except Exception:
        log.exception("method_crashed", method=method)
        raise to_dbus_error(RuntimeError()) from None
