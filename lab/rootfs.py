"""A Debian sid root file system for the lab VM: systemd 262 as PID 1 on the LUO kernel.

Built with ``mmdebstrap`` from the Debian archive (the host's mirror, signatures checked; the sid
Release file is past its Valid-Until, so only that check is off) and cached like the kernel: an
entry is a directory renamed into place once complete, with a manifest naming the package versions.
It holds the distribution plus a private environment at ``/usr/lib/luo-agent`` with the project's
pinned runtime dependencies (``packaging/requirements.txt``, pystemd compiled against sid's
libsystemd) — the layout of the Debian package.  The project's own code is not baked in: each boot
links the checkout (the host's root is at ``/run/host`` in the VM) into that environment and
installs the units, policy and wrappers as the package does (``install_project_hook``), so the
root is rebuilt only when the packages or the requirements change.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .source import KEYRING, cache_root, host_mirror, locked, log

REPO = Path(__file__).resolve().parents[1]
REQUIREMENTS = REPO / "packaging" / "requirements.txt"
RECIPE = "1"
PACKAGES = (
    "systemd,systemd-sysv,dbus,udev,polkitd,python3,python3-venv,python3-dev,gcc,pkg-config,"
    "libsystemd-dev,kexec-tools,procps,mount,util-linux-extra,kmod,less"
)
PRIVATE_ENV = "/usr/lib/luo-agent"


@dataclass(frozen=True)
class SidRoot:
    dir: Path
    manifest: dict[str, object]

    def package_version(self, name: str) -> str:
        versions = self.manifest.get("packages", {})
        assert isinstance(versions, dict)
        return str(versions.get(name, ""))


def _key() -> str:
    digest = hashlib.sha256()
    for part in (PACKAGES, REQUIREMENTS.read_text(), RECIPE):
        digest.update(len(part).to_bytes(8, "little") + part.encode())
    return digest.hexdigest()[:16]


def _verify(entry: Path) -> SidRoot | None:
    try:
        manifest = json.loads((entry / ".lab-manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if (
        not (entry / "lib/systemd/systemd").exists()
        or not (entry / PRIVATE_ENV.lstrip("/") / "bin/python3").exists()
    ):
        return None
    return SidRoot(entry, manifest)


def _build(final: Path) -> None:
    staging = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    source = f"deb [signed-by={KEYRING}] {host_mirror()} sid main"
    venv = PRIVATE_ENV
    # pip in the chroot trusts what the host trusts (a proxy's CA may sit in the host's bundle);
    # the host's pip find-links and extra indexes are local paths the chroot does not have.
    host_ca = Path(os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt")
    ca = f"/tmp/{host_ca.name}"
    pip_env = f"env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null PIP_CERT={ca} SSL_CERT_FILE={ca}"
    pip = f"{pip_env} {venv}/bin/pip install -q --no-cache-dir"
    hooks = [
        f"copy-in {REQUIREMENTS} {host_ca} /tmp",
        f'chroot "$1" python3 -m venv {venv}',
        f'chroot "$1" {pip} -r /tmp/requirements.txt',
        f'rm -f "$1/tmp/requirements.txt" "$1{ca}"',
    ]
    command = [
        "mmdebstrap", "--variant=minbase", "--mode=root",
        "--aptopt=Acquire::Check-Valid-Until \"false\"",
        f"--include={PACKAGES}",
        *(f"--customize-hook={hook}" for hook in hooks),
        "sid", str(staging), source,
    ]  # fmt: skip
    log(f"building the sid root in {staging} (mmdebstrap)")
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise RuntimeError(f"mmdebstrap failed ({result.returncode}):\n{result.stderr[-3000:]}")
    listing = subprocess.run(
        ["chroot", str(staging), "dpkg-query", "-W", "-f=${Package} ${Version}\n"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    packages = dict(line.split(" ", 1) for line in listing.splitlines() if " " in line)
    manifest = {
        "suite": "sid",
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(time.monotonic() - started, 1),
        "packages": packages,
    }
    (staging / ".lab-manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.rename(staging, final)
    log(f"sid root with systemd {packages.get('systemd')} in {final}")


def ensure_sid_root(root: Path | None = None) -> SidRoot:
    root = root or cache_root()
    final = root / "rootfs" / f"sid-{_key()}"
    with locked(root / "rootfs.lock"):
        entry = _verify(final)
        if entry is not None:
            return entry
        if shutil.which("mmdebstrap") is None:
            raise RuntimeError("building the sid root needs mmdebstrap (Debian package)")
        _build(final)
        entry = _verify(final)
        if entry is None:
            raise RuntimeError(f"{final}: fresh sid root does not verify")
        return entry


def install_project_hook(checkout: Path = REPO, config: str = "") -> str:
    """Shell text for ``Vm.run(systemd_setup=...)``: lays the project out in the new root ($1) as
    the Debian package does, with the code taken from the checkout (visible at /run/host): the
    package's own file list (packaging/debian/luo-agent.install), and the agent's unit enabled
    by its [Install] section as the package's postinst does."""
    host = f"/run/host{checkout}"
    site = f'$(echo "$1"{PRIVATE_ENV}/lib/python3*/site-packages)'
    lines = ["set -e", f'echo "{host}" > {site}/luo-agent-checkout.pth']
    listing = (checkout / "packaging" / "debian" / "luo-agent.install").read_text()
    for entry in listing.splitlines():
        if entry.strip() and not entry.startswith("#"):
            source, destination = entry.split()
            lines.append(
                f'mkdir -p "$1/{destination}" && cp {checkout}/{source} "$1/{destination}/"'
            )
    lines += [
        'chroot "$1" systemctl enable luo-agent.service',
        'mkdir -p "$1/etc/luo-agent"',
    ]
    if config:
        lines.append(f"cat > \"$1/etc/luo-agent/config.toml\" <<'LAB_CONFIG'\n{config}LAB_CONFIG")
    return "\n".join(lines) + "\n"
