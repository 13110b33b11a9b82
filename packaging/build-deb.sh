#!/usr/bin/env bash
# Builds the luo-agent Debian package from this checkout: ./packaging/build-deb.sh [OUTPUT_DIR]
# (default build/deb).  Prints the .deb's path as the last line of its output.
#
# 1. installs missing build dependencies (as root, with apt-get);
# 2. fills the wheelhouse ($LUO_WHEELHOUSE, default ~/.cache/luo-agent/wheels) with the pinned
#    runtime dependencies of packaging/requirements.txt: the only step that needs the network
#    (PyPI), and only once; pystemd is compiled here against libsystemd;
# 3. copies the tree and packaging/debian to a temporary directory and runs
#    `dpkg-buildpackage -us -uc -b` there, offline.
# Exit 75 (EX_TEMPFAIL): the wheelhouse is incomplete and PyPI cannot be reached.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "${1:-$top/build/deb}" && cd "${1:-$top/build/deb}" && pwd)
py=/usr/bin/python3.11
wheelhouse=${LUO_WHEELHOUSE:-${XDG_CACHE_HOME:-$HOME/.cache}/luo-agent/wheels}

# Build-Depends of packaging/debian/control, plus what compiling pystemd's wheel needs.
debs=(dpkg-dev debhelper python3.11 python3-pip python3-setuptools python3-wheel
      libsystemd-dev pkg-config gcc python3.11-dev)
missing=()
for p in "${debs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    if ((EUID != 0)); then
        echo "build-deb: missing build dependencies (install them as root): ${missing[*]}" >&2
        exit 1
    fi
    echo "build-deb: installing ${missing[*]}" >&2
    # Waits while another apt or dpkg holds the locks (unattended upgrades on a fresh machine).
    "$top/scripts/apt-install" "${missing[@]}" >&2
fi

# Is every pinned requirement already in the wheelhouse?  pip answers without the network.
mkdir -p "$wheelhouse"
if ! PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= "$py" -m pip download --quiet --no-index \
        --find-links "$wheelhouse" --dest "$(mktemp -d)" -r "$top/packaging/requirements.txt" \
        >/dev/null 2>&1; then
    echo "build-deb: filling the wheelhouse $wheelhouse from PyPI" >&2
    if ! "$py" -m pip wheel --quiet --wheel-dir "$wheelhouse" \
            -r "$top/packaging/requirements.txt" >&2; then
        echo "build-deb: cannot fill the wheelhouse (no network?); set LUO_WHEELHOUSE to a" \
            "directory holding the wheels of packaging/requirements.txt" >&2
        exit 75
    fi
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
src="$work/luo-agent-$(sed -n '1s/.*(\(.*\)).*/\1/p' "$top/packaging/debian/changelog")"
mkdir -p "$src"
tar -C "$top" --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./debian-build \
    --exclude='*.egg-info' --exclude=__pycache__ --exclude=.mypy_cache --exclude=.ruff_cache \
    --exclude=.pytest_cache --exclude=.hypothesis -cf - . | tar -C "$src" -xf -
cp -a "$top/packaging/debian" "$src/debian"

echo "build-deb: dpkg-buildpackage in $src" >&2
(cd "$src" && LUO_WHEELHOUSE="$wheelhouse" dpkg-buildpackage -us -uc -b >&2)

shopt -s nullglob
debs_built=("$work"/luo-agent_*.deb)
((${#debs_built[@]} == 1)) || { echo "build-deb: no .deb was produced" >&2; exit 1; }
cp "${debs_built[0]}" "$out/"
echo "$out/$(basename "${debs_built[0]}")"
