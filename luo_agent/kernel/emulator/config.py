"""``root/.luo-emu/machine.json``: the machine's "firmware settings" (abi, profile, boot count)."""

from __future__ import annotations

import json
import os
from typing import Any, Final

from ..device import Abi
from .protocol import Layout

ABIS: Final = tuple(Abi)


def read_config(layout: Layout) -> dict[str, Any]:
    try:
        raw = layout.machine_json.read_text()
    except FileNotFoundError:
        return {}
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise ValueError(f"{layout.machine_json}: not a JSON object")
    return value


def write_config(layout: Layout, config: dict[str, Any]) -> None:
    """Atomic replace, so a reader never sees half a file."""
    layout.emu_dir.mkdir(parents=True, exist_ok=True)
    tmp = layout.machine_json.with_name(".machine.json.tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.rename(tmp, layout.machine_json)


def write_atomic(path: os.PathLike[str] | str, text: str) -> None:
    """Write a small file by rename (readers never see a partial value; inotify sees
    IN_MOVED_TO on the directory)."""
    path = os.fspath(path)
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, path)
