"""The host's id towards the fleet's coordinator: the same across a kexec, private to this use.

Zincati derives it from ``/etc/machine-id`` with systemd's ``sd_id128_get_machine_app_specific``
(HMAC-SHA256 keyed by the machine id over an application id, cut to 128 bits and marked as a v4
UUID), so the machine id itself is never published.  The boot id changes at every kexec and would
make the new boot a stranger to its own slot, so it is never used.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path
from typing import Final

from ..errors import ConfigError

MACHINE_ID_PATH: Final = Path("/etc/machine-id")
# This application's id (a random 128-bit value, fixed for good: changing it changes every host's
# id and orphans every slot).  Zincati's is de35106b6ec24688b63afddaa156679b.
APP_ID: Final = bytes.fromhex("5a2c1f0e8b7d4c3e9a61f0d2b4c8e7a1")


def app_specific_id(machine_id: bytes, app_id: bytes = APP_ID) -> str:
    """``sd_id128_get_machine_app_specific(app_id)`` formatted as 32 lowercase hex digits."""
    digest = bytearray(hmac.new(machine_id, app_id, hashlib.sha256).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x40  # version 4
    digest[8] = (digest[8] & 0x3F) | 0x80  # variant DCE
    return digest.hex()


def host_id_from_machine_id(path: Path = MACHINE_ID_PATH) -> str:
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(str(path), "-", f"cannot read the machine id: {exc.strerror}") from None
    try:
        machine_id = bytes.fromhex(text)
    except ValueError:
        machine_id = b""
    if len(machine_id) != 16 or machine_id == bytes(16):
        raise ConfigError(str(path), "-", "not a machine id (32 hex digits, not all zero)")
    return app_specific_id(machine_id)
