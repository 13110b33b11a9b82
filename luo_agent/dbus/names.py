"""Every D-Bus name of the agent, derived from one versioned prefix (0pointer's versioning rules:
the name, the interfaces, the object paths and the error names all end in the same version)."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

API_VERSION: Final = 1
BUS_NAME: Final = f"org.luoagent.LiveUpdate{API_VERSION}"
OBJECT_PATH: Final = f"/org/luoagent/LiveUpdate{API_VERSION}"
UPDATES_PATH: Final = f"{OBJECT_PATH}/update"
IFACE_MANAGER: Final = f"{BUS_NAME}.Manager"
IFACE_UPDATE: Final = f"{BUS_NAME}.Update"
ERROR_PREFIX: Final = f"{BUS_NAME}.Error"
POLKIT_PREFIX: Final = f"org.luoagent.liveupdate{API_VERSION}"


# The polkit verb (action ``org.luoagent.liveupdate1.<verb>``) each method that changes something
# asks about, on the Manager and the Update objects; every other method is open.  Read by the
# Manager (``Authorizer.authorize``), tests/security/test_policy_files.py and docs/security.md.
POLKIT_VERBS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "Prepare": "prepare",
        "Execute": "execute",
        "Cancel": "cancel",
        "Restore": "finish",
        "Finish": "finish",
        "LoadKernel": "load-kernel",
        "Preserve": "preserve",
        "Unpreserve": "preserve",
        "Retrieve": "retrieve",
    }
)


def error(name: str) -> str:
    return f"{ERROR_PREFIX}.{name}"


def recorded_error(code: str) -> str:
    """The bus's name of an update record's ``ErrorCode`` ("" for none)."""
    return error(code) if code else ""


def update_path(update_id: str) -> str:
    """Object path of one update.  Ids are restricted to [A-Za-z0-9_-] (checked at the boundary);
    '-' is escaped as systemd does for unit paths so the path stays valid."""
    escaped = "".join(c if c.isalnum() else f"_{ord(c):02x}" for c in update_id)
    return f"{UPDATES_PATH}/{escaped}"


def polkit_action(verb: str) -> str:
    return f"{POLKIT_PREFIX}.{verb}"
