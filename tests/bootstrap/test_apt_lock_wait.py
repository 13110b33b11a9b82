"""scripts/apt-install, the bootstrap's Debian step, waits while another apt or dpkg holds a
package lock (unattended upgrades on a fresh VM), says so, then succeeds; it gives up after
LUO_APT_LOCK_TIMEOUT seconds.

The locks are real fcntl locks taken as apt takes them, and apt-get itself finds them held.  The
machine is not changed: APT_CONFIG points the package lists, the caches and extended_states into a
temporary directory with no sources (``apt-get update`` downloads nothing), and the package
installed is already installed (procps), so ``apt-get install`` has nothing to do once it holds
the locks.  The dpkg lock is the real /var/lib/dpkg/lock-frontend, the one unattended upgrades
hold, taken for a few seconds only."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
APT_INSTALL = REPO / "scripts" / "apt-install"
DPKG_FRONTEND_LOCK = Path("/var/lib/dpkg/lock-frontend")
INSTALLED = "procps"  # the bootstrap installs it; the tests only ask for it again

# Takes the lock as apt does (fcntl F_SETLK, exclusive), says so, holds it for argv[2] seconds.
HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o640)
fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _installed(package: str) -> bool:
    status = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True, check=False
    )
    return status.stdout == "install ok installed"


pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="apt-get install needs root"),
    pytest.mark.skipif(shutil.which("apt-get") is None, reason="not a Debian system"),
    pytest.mark.skipif(
        shutil.which("apt-get") is not None and not _installed(INSTALLED),
        reason=f"{INSTALLED} is not installed (the tests must not install anything)",
    ),
]


@pytest.fixture
def apt_env(tmp_path: Path) -> dict[str, str]:
    """An apt configuration whose lists, caches and extended_states are throw-away, without
    sources; the dpkg database (and so its locks) stays the machine's."""
    lists, parts, cache = tmp_path / "lists", tmp_path / "sources.list.d", tmp_path / "cache"
    for directory in (lists / "partial", parts, cache / "archives" / "partial"):
        directory.mkdir(parents=True)
    (tmp_path / "sources.list").write_text("")
    config = tmp_path / "apt.conf"
    config.write_text(
        f'Dir::State::Lists "{lists}";\n'
        f'Dir::State::extended_states "{tmp_path / "extended_states"}";\n'
        f'Dir::Etc::sourcelist "{tmp_path / "sources.list"}";\n'
        f'Dir::Etc::sourceparts "{parts}";\n'
        f'Dir::Cache "{cache}";\n'
    )
    return {**os.environ, "APT_CONFIG": str(config)}


Hold = Callable[[Path, float], "subprocess.Popen[str]"]


@pytest.fixture
def hold_lock() -> Iterator[Hold]:
    holders: list[subprocess.Popen[str]] = []

    def hold(path: Path, seconds: float) -> subprocess.Popen[str]:
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(path), str(seconds)],
            stdout=subprocess.PIPE,
            text=True,
        )
        holders.append(holder)
        assert holder.stdout is not None
        assert holder.stdout.readline() == "held\n"
        return holder

    yield hold
    for holder in holders:
        holder.kill()
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()


def apt_install(env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    proc = subprocess.run(
        [str(APT_INSTALL), INSTALLED], env=env, capture_output=True, text=True, timeout=120
    )
    return proc, time.monotonic() - started


def test_nothing_held_nothing_said(apt_env: dict[str, str]) -> None:
    proc, _ = apt_install(apt_env)
    assert proc.returncode == 0, proc.stderr
    assert "waiting" not in proc.stdout


def test_waits_for_the_dpkg_lock_says_who_holds_it_then_installs(
    apt_env: dict[str, str], hold_lock: Hold
) -> None:
    hold_seconds = 3.0
    holder = hold_lock(DPKG_FRONTEND_LOCK, hold_seconds)
    proc, elapsed = apt_install(apt_env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert elapsed >= hold_seconds - 0.5, "apt-get got the lock while it was held?"
    assert holder.poll() is not None, "finished before the holder let go"
    (said,) = proc.stdout.splitlines()  # said once, not once per second
    assert said.startswith("apt-install: waiting")
    assert str(DPKG_FRONTEND_LOCK) in said and f"held by process {holder.pid}" in said


def test_waits_for_the_lists_lock_of_apt_get_update(
    apt_env: dict[str, str], hold_lock: Hold, tmp_path: Path
) -> None:
    """apt 2.6's DPkg::Lock::Timeout does not cover the lists lock: the script tries again."""
    lists_lock = tmp_path / "lists" / "lock"
    holder = hold_lock(lists_lock, 3.0)
    proc, elapsed = apt_install(apt_env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert elapsed >= 2.5 and holder.poll() is not None
    (said,) = proc.stdout.splitlines()
    assert str(lists_lock) in said and f"held by process {holder.pid}" in said


def test_gives_up_after_the_timeout(apt_env: dict[str, str], hold_lock: Hold) -> None:
    holder = hold_lock(DPKG_FRONTEND_LOCK, 30.0)
    proc, elapsed = apt_install({**apt_env, "LUO_APT_LOCK_TIMEOUT": "2"})
    assert proc.returncode != 0
    assert elapsed < 15 and holder.poll() is None, "it did not give up while the lock was held"
    assert "waiting" in proc.stdout
    assert "lock-frontend" in proc.stderr  # apt's own error
