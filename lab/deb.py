"""The Debian package of this checkout, as each boot of the lab's systemd VM installs it
(``Host.install`` in ``lab/guest_setup.py``): built by ``packaging/build-deb.sh`` once per content
of the tree and cached, the few newest kept."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .rootfs import REPO
from .source import cache_root, locked, log

KEEP_DEBS = 4
# What the package is made of (packaging/debian/rules, *.install, *.docs, *.examples).
PACKAGED = ("luo_agent/", "units/", "policy/", "packaging/", "docs/", "pyproject.toml", "README.md")


def _tree_digest() -> str:
    """A digest of the files the package is made of (tracked and untracked, not ignored)."""
    names = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    digest = hashlib.sha256()
    for name in sorted(n for n in names if n and os.fsdecode(n).startswith(PACKAGED)):
        path = REPO / os.fsdecode(name)
        if path.is_file():
            digest.update(name + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def ensure_deb() -> Path:
    """The Debian package of this checkout, built once per content of the tree and cached."""
    entry = cache_root() / "debs" / _tree_digest()
    with locked(cache_root() / "deb.lock"):
        built = sorted(entry.glob("luo-agent_*.deb"))
        if built:
            return built[0]
        entry.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=entry.parent))
        log(f"building the Debian package (packaging/build-deb.sh) into {entry}")
        proc = subprocess.run(
            [str(REPO / "packaging" / "build-deb.sh"), str(staging)],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            raise RuntimeError(f"build-deb.sh failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        shutil.rmtree(entry, ignore_errors=True)
        os.rename(staging, entry)
        # One entry per state of the tree: keep the few newest (other checkouts use them too).
        entries = sorted(
            (p for p in entry.parent.iterdir() if not p.name.startswith(".")),
            key=lambda p: p.stat().st_mtime,
        )
        for old in entries[:-KEEP_DEBS]:
            shutil.rmtree(old, ignore_errors=True)
        return entry / Path(proc.stdout.strip().splitlines()[-1]).name
