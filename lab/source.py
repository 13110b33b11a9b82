"""The kernel source: the newest ``linux-source-7.N`` of Debian sid, through a private apt setup.

The host's own apt sources, lists and packages are never read or changed: apt runs with its
source list, lists and caches under the lab's cache directory.  Sid moves (a version disappears
from the archive), so the newest package is taken and its version recorded; without a network the
newest source already extracted is used.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CACHE = Path("/var/cache/luo-lab")
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
LISTS_MAX_AGE = 6 * 3600.0


def cache_root() -> Path:
    return Path(os.environ.get("LUO_LAB_CACHE", DEFAULT_CACHE))


def log(message: str) -> None:
    print(f"lab: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Serialises lab steps across processes (two test runs must not build the same entry)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def host_mirror() -> str:
    """The Debian mirror the host's apt uses, so the lab reaches what the host reaches."""
    candidates = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in candidates:
        try:
            text = path.read_text()
        except OSError:
            continue
        for match in re.finditer(r"(?:URIs:|^deb(?:\s+\[[^]]*\])?)\s+(\S+/debian)/?\s", text, re.M):
            return match.group(1)
    return DEFAULT_MIRROR


@dataclass(frozen=True)
class PrivateApt:
    """apt-get/apt-cache confined to ``root``: its own sources.list, lists and archives."""

    root: Path
    suite: str = "sid"

    def options(self) -> list[str]:
        return [
            f"-oDir::Etc::sourcelist={self.root / 'sources.list'}",
            "-oDir::Etc::sourceparts=-",
            f"-oDir::State::Lists={self.root / 'lists'}",
            f"-oDir::Cache={self.root / 'cache'}",
            # The archive's sid Release file is past its Valid-Until; signatures are still checked.
            "-oAcquire::Check-Valid-Until=false",
            "-oAPT::Sandbox::User=root",
        ]

    def prepare(self) -> None:
        for sub in ("lists/partial", "cache/archives/partial"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        line = f"deb [signed-by={KEYRING}] {host_mirror()} {self.suite} main\n"
        sources = self.root / "sources.list"
        if not sources.exists() or sources.read_text() != line:
            sources.write_text(line)

    def update(self) -> None:
        """Refreshes the lists unless they are recent (a warm run needs no network)."""
        self.prepare()
        stamp = self.root / "lists" / ".updated"
        if stamp.exists() and time.time() - stamp.stat().st_mtime < LISTS_MAX_AGE:
            return
        log(f"apt-get update of {self.suite} (private lists in {self.root})")
        subprocess.run(
            ["apt-get", *self.options(), "-q", "update"], check=True, stdout=subprocess.DEVNULL
        )
        stamp.touch()

    def newest(self, prefix: str) -> tuple[str, str]:
        """(package, version) of the newest package named ``prefix<major>.<minor>``."""
        out = subprocess.run(
            ["apt-cache", *self.options(), "pkgnames", prefix],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()
        pattern = re.compile(re.escape(prefix) + r"(\d+)\.(\d+)$")
        names = sorted((tuple(map(int, m.groups())), n) for n in out if (m := pattern.match(n)))
        if not names:
            raise RuntimeError(f"no {prefix}N.M package in {self.suite}")
        package = names[-1][1]
        show = subprocess.run(
            ["apt-cache", *self.options(), "show", "--no-all-versions", package],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        version = re.search(r"^Version: (\S+)$", show, re.M)
        if version is None:
            raise RuntimeError(f"apt-cache show {package}: no Version")
        return package, version.group(1)

    def download(self, package: str, version: str, into: Path) -> Path:
        into.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["apt-get", *self.options(), "-q", "download", f"{package}={version}"],
            check=True,
            cwd=into,
            stdout=subprocess.DEVNULL,
        )
        debs = list(into.glob(f"{package}_*.deb"))
        if len(debs) != 1:
            raise RuntimeError(f"apt-get download {package}: expected one .deb, found {debs}")
        return debs[0]


@dataclass(frozen=True)
class KernelSource:
    package: str  # linux-source-7.2
    version: str  # 7.2.13-1
    tree: Path  # the extracted kernel tree

    @property
    def release(self) -> str:
        return self.package.removeprefix("linux-source-")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _extracted(src_dir: Path, package: str) -> Path | None:
    tree = src_dir / package
    return tree if (src_dir / ".complete").is_file() and (tree / "Makefile").is_file() else None


def _newest_extracted(root: Path) -> KernelSource | None:
    found: list[tuple[str, KernelSource]] = []
    for complete in root.glob("src/*/.complete"):
        package, _, version = complete.read_text().partition(" ")
        version = version.split()[0] if version else ""
        tree = _extracted(complete.parent, package)
        if tree is not None and version:
            found.append((version, KernelSource(package, version, tree)))
    if not found:
        return None
    newest = max(found, key=lambda item: _version_key(item[0]))
    return newest[1]


def _version_key(version: str) -> list[int]:
    return [int(part) for part in re.findall(r"\d+", version)]


def fetch_source(root: Path | None = None) -> KernelSource:
    """The newest sid kernel source with LUO, downloaded and extracted once into the cache."""
    root = root or cache_root()
    apt = PrivateApt(root / "apt")
    with locked(root / "source.lock"):
        try:
            apt.update()
            package, version = apt.newest("linux-source-")
        except (subprocess.CalledProcessError, RuntimeError) as exc:
            cached = _newest_extracted(root)
            if cached is None:
                raise
            log(f"cannot reach the archive ({exc}); using the cached {cached.version}")
            return cached
        src_dir = root / "src" / version
        tree = _extracted(src_dir, package)
        if tree is not None:
            return KernelSource(package, version, tree)
        log(f"fetching {package} {version}")
        shutil.rmtree(src_dir, ignore_errors=True)
        src_dir.mkdir(parents=True)
        deb = apt.download(package, version, root / "apt" / "debs")
        # The .deb holds /usr/src/<package>.tar.xz: unpack it straight into the tree.
        unpack = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        subprocess.run(
            ["tar", "-x", "-C", str(src_dir), f"./usr/src/{package}.tar.xz"],
            stdin=unpack.stdout,
            check=True,
        )
        if unpack.wait() != 0:
            raise RuntimeError(f"dpkg-deb --fsys-tarfile {deb} failed")
        tarball = src_dir / "usr" / "src" / f"{package}.tar.xz"
        subprocess.run(["tar", "-xJf", str(tarball), "-C", str(src_dir)], check=True)
        shutil.rmtree(src_dir / "usr")
        (src_dir / ".complete").write_text(f"{package} {version} {file_sha256(deb)}\n")
        deb.unlink()
        log(f"kernel source {package} {version} in {src_dir / package}")
        return KernelSource(package, version, src_dir / package)
