"""Builds the lab's LUO kernel and the kernel's liveupdate selftests, cached by (source, config).

A cache entry is a directory named after the source version and a hash of everything that shapes
the build (the config fragment and this recipe's version).  It is built in a temporary directory and
renamed into place only when complete, and its manifest holds the sha256 of every file: an entry
whose manifest is missing or whose files do not match it is treated as absent and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .source import KernelSource, cache_root, fetch_source, file_sha256, locked, log

FRAGMENT = Path(__file__).with_name("kernel.config")
# Bump when the recipe below changes in a way that changes the artefacts.
RECIPE = "1"
SELFTESTS = ("liveupdate", "luo_kexec_simple", "luo_multi_session", "do_kexec.sh")
BUILD_DEPS = ("flex", "bison", "libelf-dev", "bc", "rsync", "cpio", "gcc", "make", "libc6-dev")


@dataclass(frozen=True)
class KernelBuild:
    """A complete, verified cache entry."""

    dir: Path
    manifest: dict[str, object]

    @property
    def bzimage(self) -> Path:
        return self.dir / "bzImage"

    def selftest(self, name: str) -> Path:
        return self.dir / "selftests" / name

    @property
    def version(self) -> str:
        return str(self.manifest["source_version"])


def build_key(source_version: str, fragment: bytes) -> str:
    digest = hashlib.sha256()
    for part in (source_version.encode(), fragment, RECIPE.encode()):
        digest.update(len(part).to_bytes(8, "little") + part)
    return digest.hexdigest()[:16]


def verify(entry: Path) -> KernelBuild | None:
    """The entry if it is complete and every file matches its manifest; None otherwise."""
    try:
        manifest = json.loads((entry / "manifest.json").read_text())
        files = manifest["files"]
        if not isinstance(files, dict) or "bzImage" not in files:
            return None
        for name, digest in files.items():
            if file_sha256(entry / name) != digest:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return KernelBuild(entry, manifest)


def wanted_options(fragment: str) -> list[str]:
    """The fragment's settings, ``CONFIG_X=y`` and ``# CONFIG_X is not set`` alike."""
    return [
        line.strip()
        for line in fragment.splitlines()
        if re.fullmatch(r"CONFIG_\w+=.*|# CONFIG_\w+ is not set", line.strip())
    ]


def _make(tree: Path, *args: str, log_file: Path) -> None:
    with open(log_file, "a") as out:
        subprocess.run(
            ["make", "-C", str(tree), *args], check=True, stdout=out, stderr=subprocess.STDOUT
        )


def _configure(tree: Path, obj: Path, fragment_path: Path, log_file: Path) -> None:
    arch = ("ARCH=x86_64", f"O={obj}")
    _make(tree, *arch, "tinyconfig", log_file=log_file)
    with open(log_file, "a") as out:
        subprocess.run(
            [
                str(tree / "scripts/kconfig/merge_config.sh"),
                "-m",
                "-O",
                str(obj),
                str(obj / ".config"),
                str(fragment_path),
            ],
            check=True,
            cwd=tree,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    _make(tree, *arch, "olddefconfig", log_file=log_file)
    have = set((obj / ".config").read_text().splitlines())
    dropped = [opt for opt in wanted_options(fragment_path.read_text()) if opt not in have]
    if dropped:
        raise RuntimeError(f"Kconfig dropped options of {fragment_path.name}: {dropped}")


def _build_selftests(tree: Path, obj: Path, out: Path, log_file: Path) -> None:
    headers = obj / "hdr"
    _make(
        tree,
        "ARCH=x86_64",
        f"O={obj}",
        f"INSTALL_HDR_PATH={headers}",
        "headers_install",
        log_file=log_file,
    )
    selftests = obj / "selftests"
    selftests.mkdir()
    _make(
        tree / "tools/testing/selftests/liveupdate",
        f"OUTPUT={selftests}",
        f"KHDR_INCLUDES=-isystem {headers}/include",
        "USERLDFLAGS=-static",
        log_file=log_file,
    )
    (out / "selftests").mkdir()
    for name in SELFTESTS:
        src = selftests / name
        if not src.exists():
            src = tree / "tools/testing/selftests/liveupdate" / name
        shutil.copy2(src, out / "selftests" / name)


def _build(source: KernelSource, fragment_path: Path, final: Path) -> None:
    jobs = str(os.cpu_count() or 1)
    staging = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    obj = staging / "obj"
    obj.mkdir(parents=True)
    log_file = staging / "build.log"
    started = time.monotonic()
    log(
        f"building {source.package} {source.version} (tinyconfig + {fragment_path.name}, "
        f"-j{jobs}); log in {log_file}"
    )
    try:
        _configure(source.tree, obj, fragment_path, log_file)
        _make(source.tree, "ARCH=x86_64", f"O={obj}", f"-j{jobs}", "bzImage", log_file=log_file)
        shutil.copy2(obj / "arch/x86/boot/bzImage", staging / "bzImage")
        shutil.copy2(obj / ".config", staging / "config")
        _build_selftests(source.tree, obj, staging, log_file)
    except (subprocess.CalledProcessError, RuntimeError) as exc:
        tail = log_file.read_text(errors="replace").splitlines()[-25:] if log_file.exists() else []
        shutil.rmtree(obj, ignore_errors=True)  # the log stays, for the reader of the error
        raise RuntimeError(f"kernel build failed: {exc}\n" + "\n".join(tail)) from exc
    _finish(staging, final, source, fragment_path, time.monotonic() - started)


def _finish(
    staging: Path, final: Path, source: KernelSource, fragment_path: Path, elapsed: float
) -> None:
    """Writes the manifest and renames the staging directory into place: the entry exists only
    once it is complete."""
    shutil.rmtree(staging / "obj")
    files = {
        str(p.relative_to(staging)): file_sha256(p)
        for p in sorted(staging.rglob("*"))
        if p.is_file() and p.name != "build.log"
    }
    manifest = {
        "source_package": source.package,
        "source_version": source.version,
        "fragment_sha256": file_sha256(fragment_path),
        "recipe": RECIPE,
        "build_seconds": round(elapsed, 1),
        "cpus": os.cpu_count(),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": files,
    }
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.rename(staging, final)
    log(f"built in {elapsed / 60:.1f} min: {final}")


def missing_build_deps() -> list[str]:
    missing = []
    for package in BUILD_DEPS:
        probe = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True
        )
        if "install ok installed" not in probe.stdout:
            missing.append(package)
    return missing


def ensure_kernel(root: Path | None = None, fragment_path: Path = FRAGMENT) -> KernelBuild:
    """The cached build for the newest source and this fragment; builds it when absent or bad."""
    root = root or cache_root()
    source = fetch_source(root)
    key = build_key(source.version, fragment_path.read_bytes())
    final = root / "kernels" / f"{source.version}-{key}"
    # One lock per entry: a build of another config (another checkout) does not hold this one up.
    with locked(root / "kernels" / f".{final.name}.lock"):
        entry = verify(final)
        if entry is not None:
            return entry
        if final.exists():
            log(f"cache entry {final} is incomplete or corrupt: rebuilding")
        missing = missing_build_deps()
        if missing:
            raise RuntimeError(f"kernel build needs Debian packages: {' '.join(missing)}")
        _build(source, fragment_path, final)
        entry = verify(final)
        if entry is None:
            raise RuntimeError(f"{final}: fresh build does not verify")
        return entry
