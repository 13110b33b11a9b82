#!/usr/bin/env bash
# Installs what luo_agent needs on a fresh Debian 12 machine (run as root): Debian packages, then a
# virtualenv in .venv with the project and its test tools.  Idempotent; quiet when nothing is missing.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

debs=(libsystemd-dev pkg-config dbus-daemon systemd polkitd python3-venv util-linux procps gcc
      python3-dev dpkg-dev debhelper python3-pip python3-setuptools python3-wheel
      # The real-kernel lab (lab/): QEMU, kexec in the VM, the kernel build, the private apt,
      # the sid root of systemd 262.
      qemu-system-x86 kexec-tools flex bison libelf-dev bc rsync cpio debian-archive-keyring
      mmdebstrap
      # The fleet coordinator's tests (tests/fleet): a real etcd 3.4 on loopback.
      etcd-server etcd-client)
missing=()
for p in "${debs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "bootstrap: installing Debian packages: ${missing[*]}"
    scripts/apt-install "${missing[@]}"  # waits while another apt or dpkg holds the locks
fi

python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
stamp=.venv/.luo-bootstrap
if [[ ! -x .venv/bin/python || ! -f $stamp || pyproject.toml -nt $stamp ]]; then
    echo "bootstrap: preparing .venv"
    "$python" -m venv .venv
    .venv/bin/pip install -q --disable-pip-version-check --upgrade pip
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
    touch "$stamp"
fi
