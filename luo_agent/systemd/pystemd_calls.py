"""What the gate asks systemd, as blocking pystemd calls on one sd-bus connection.

Every function here runs on the gate's bus thread (``pystemd_thread``), never on the asyncio
loop, and takes the connection as its first argument.  Each D-Bus call is one ``sd_bus_call``
with sd-bus's default method timeout (25 s): the only timeout inside; callers bound whole
operations with ``asyncio.timeout``.  Bytes from pystemd become ``str`` here, at the edge, and
pystemd's errors become ``GateError``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import types
from typing import Any, Final


def _without_pystemd_package_init() -> None:
    """pystemd's package ``__init__`` loads its unit API and, through it, lxml: a tenth of the
    agent's imports, and the agent's start is on the path of every restore.  The gate uses only
    the extension modules ``dbuslib`` and ``dbusexc``, which need nothing of it: the package is
    registered without running it (unless something already imported the real one)."""
    if "pystemd" in sys.modules:
        return
    spec = importlib.util.find_spec("pystemd")
    if spec is None or spec.submodule_search_locations is None:
        return  # the imports below report the missing package
    package = types.ModuleType("pystemd")
    package.__spec__ = spec
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["pystemd"] = package


_without_pystemd_package_init()

import structlog  # noqa: E402
from pystemd.dbusexc import DBusBaseError  # noqa: E402
from pystemd.dbuslib import DBus as DBus  # noqa: E402  (for pystemd_thread: one pystemd importer)
from pystemd.dbuslib import DBusAddress as DBusAddress  # noqa: E402
from pystemd.dbuslib import apply_signature, path_encode  # noqa: E402

from luo_agent.errors import GateError  # noqa: E402
from luo_agent.systemd.gate import UnitStatus  # noqa: E402

log = structlog.get_logger(__name__)

DEST: Final = b"org.freedesktop.systemd1"
MANAGER_PATH: Final = b"/org/freedesktop/systemd1"
MANAGER_IFACE: Final = b"org.freedesktop.systemd1.Manager"
_UNIT_IFACE: Final = b"org.freedesktop.systemd1.Unit"
_JOB_IFACE: Final = b"org.freedesktop.systemd1.Job"
_UNIT_PATH_PREFIX: Final = b"/org/freedesktop/systemd1/unit"

# What RequiredBy= creates on the target, plus its stricter siblings.
PARTICIPANT_PROPERTIES: Final = ("Requires", "Requisite", "BindsTo")

# The unit types whose type-specific interface carries a Result property.
_RESULT_INTERFACES: Final = {
    "service": b"org.freedesktop.systemd1.Service",
    "socket": b"org.freedesktop.systemd1.Socket",
    "mount": b"org.freedesktop.systemd1.Mount",
    "swap": b"org.freedesktop.systemd1.Swap",
    "timer": b"org.freedesktop.systemd1.Timer",
    "path": b"org.freedesktop.systemd1.Path",
    "automount": b"org.freedesktop.systemd1.Automount",
    "scope": b"org.freedesktop.systemd1.Scope",
}


def text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def call_error(what: str, subject: str, exc: BaseException) -> GateError:
    if isinstance(exc, DBusBaseError):
        name = getattr(exc, "err_name", "") or type(exc).__name__
        detail = text(getattr(exc, "err_message", b"")) or str(exc)
        return GateError(subject, f"{what} failed: {text(name)}: {detail}")
    return GateError(subject, f"{what} failed: {exc!r}")


def manager_call(bus: Any, method: bytes, signature: bytes, args: list[Any]) -> Any:
    try:
        return bus.call_method(
            DEST, MANAGER_PATH, MANAGER_IFACE, method, apply_signature(signature, args)
        ).body
    except DBusBaseError as exc:
        raise call_error(method.decode(), text(args[0]) if args else "systemd", exc) from exc


def manager_version(bus: Any) -> str:
    return text(bus.get_property(DEST, MANAGER_PATH, MANAGER_IFACE, b"Version", b"s"))


_LOGIN1: Final = b"org.freedesktop.login1"
_LOGIN1_PATH: Final = b"/org/freedesktop/login1"
_LOGIN1_MANAGER: Final = b"org.freedesktop.login1.Manager"
# logind is not running (a container, a minimal system): then nobody holds an inhibitor.
_NO_LOGIND: Final = (
    b"org.freedesktop.DBus.Error.ServiceUnknown",
    b"org.freedesktop.DBus.Error.NameHasNoOwner",
)


def shutdown_inhibitors(bus: Any) -> list[str]:
    """logind's block-mode inhibitors of "shutdown" (ListInhibitors), as "who (PID n): why"."""
    try:
        rows = bus.call_method(_LOGIN1, _LOGIN1_PATH, _LOGIN1_MANAGER, b"ListInhibitors", []).body
    except DBusBaseError as exc:
        if bytes(getattr(exc, "err_name", b"") or b"") in _NO_LOGIND:
            return []
        raise call_error("ListInhibitors", "systemd-logind", exc) from exc
    return [
        f"{text(who)} (PID {pid}): {text(why)}"
        for what, who, why, mode, _uid, pid in rows or []
        if text(mode) == "block" and "shutdown" in text(what).split(":")
    ]


def enqueue_job(bus: Any, method: bytes, unit: str, mode: str) -> bytes:
    """StartUnit/StopUnit: the new job's object path."""
    return bytes(manager_call(bus, method, b"ss", [unit.encode(), mode.encode()]))


def cancel_job(bus: Any, job_path: bytes, unit: str, with_participants: bool) -> None:
    try:
        bus.call_method(DEST, job_path, _JOB_IFACE, b"Cancel", [])
    except DBusBaseError as exc:  # already finished: nothing to cancel
        log.debug("job_cancel_skipped", unit=unit, error=str(exc))
    if not with_participants:
        return
    # Cancelling the target's job does not touch the start jobs it pulled in (systemd
    # only fails jobs that depend on the cancelled one); cancel the participants' too,
    # so that a following phase (job mode "fail") does not trip over them.
    members = set(participants(bus, unit))
    for job in manager_call(bus, b"ListJobs", b"", []) or []:
        job_id, job_unit = job[0], text(job[1])
        if job_unit in members:
            with contextlib.suppress(GateError):  # may have finished meanwhile
                manager_call(bus, b"CancelJob", b"u", [job_id])
                log.info("participant_job_cancelled", unit=job_unit, target=unit)


def _unit_property(bus: Any, unit: str, interface: bytes, name: bytes, rtype: bytes) -> Any:
    # Looking the object path up loads the unit if needed (as pystemd's Unit does).
    path = bytes(path_encode(_UNIT_PATH_PREFIX, unit.encode()))
    try:
        return bus.get_property(DEST, path, interface, name, rtype)
    except DBusBaseError as exc:
        raise call_error(f"get {name.decode()}", unit, exc) from exc


def fd_store_fill(bus: Any, unit: str) -> tuple[int, int]:
    """(NFileDescriptorStore, FileDescriptorStoreMax) of ``unit``, or of the caller's own."""
    service = _RESULT_INTERFACES["service"]
    if unit:
        path = bytes(path_encode(_UNIT_PATH_PREFIX, unit.encode()))
    else:
        # pystemd gives a one-value reply's body as the value itself (here the object path): a
        # [0] on it took the path's first byte and made 47 NULs of it, found on systemd 262.
        path = bytes(manager_call(bus, b"GetUnitByPID", b"u", [os.getpid()]))
    try:
        count, room = (
            int(bus.get_property(DEST, path, service, name, b"u"))
            for name in (b"NFileDescriptorStore", b"FileDescriptorStoreMax")
        )
    except DBusBaseError as exc:
        raise call_error("get NFileDescriptorStore", unit or "own unit", exc) from exc
    return count, room


def participants(bus: Any, target: str) -> list[str]:
    seen: dict[str, None] = {}  # ordered set
    for prop in PARTICIPANT_PROPERTIES:
        for name in _unit_property(bus, target, _UNIT_IFACE, prop.encode(), b"as") or []:
            seen[text(name)] = None
    return list(seen)


def unit_statuses(bus: Any, target: str) -> tuple[UnitStatus, ...]:
    units = participants(bus, target)
    if not units:
        return ()
    # One ListUnitsByNames call for every unit's states: pystemd holds the GIL for each bus
    # call, so three calls per participant stalled the agent's loop for tens of ms at 50.
    rows = manager_call(bus, b"ListUnitsByNames", b"as", [[u.encode() for u in units]])
    listed = {text(row[0]): row for row in rows or []}
    return tuple(_listed_status(bus, unit, listed.get(unit)) for unit in units)


def _listed_status(bus: Any, unit: str, row: Any) -> UnitStatus:
    # (name, description, load, active, sub, following, path, job id, job type, job path)
    if row is None:
        return _unit_status(bus, unit)
    load, active, sub = text(row[2]), text(row[3]), text(row[4])
    interface = _RESULT_INTERFACES.get(unit.rpartition(".")[2])
    if interface is None or load != "loaded":
        result = ""
    elif active in ("active", "inactive"):
        result = "success"  # systemd resets Result at start; any failure makes it "failed"
    else:
        result = ""
        with contextlib.suppress(GateError):
            result = text(_unit_property(bus, unit, interface, b"Result", b"s"))
    return UnitStatus(unit, active, sub, result)


def _unit_status(bus: Any, unit: str) -> UnitStatus:
    active = text(_unit_property(bus, unit, _UNIT_IFACE, b"ActiveState", b"s"))
    sub = text(_unit_property(bus, unit, _UNIT_IFACE, b"SubState", b"s"))
    result = ""
    interface = _RESULT_INTERFACES.get(unit.rpartition(".")[2])
    if interface is not None:
        with contextlib.suppress(GateError):  # e.g. a not-found unit
            result = text(_unit_property(bus, unit, interface, b"Result", b"s"))
    return UnitStatus(unit, active, sub, result)
