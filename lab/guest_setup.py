"""What a boot of the lab's systemd VM is given before PID 1 starts: the system it boots
(``Host``: this machine's root with the package, or the sid root), the project and the example
participant's units laid into it, the agent's configuration, the state directories bound to the
run directory, the services masked, and an optional disk with a page cache."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .deb import ensure_deb
from .rootfs import PRIVATE_ENV, REPO, ensure_sid_root, install_project_hook

VENV_PYTHON = REPO / ".venv" / "bin" / "python"
EXAMPLE_UNITS = ("luo-example-workload", "luo-example-prepare", "luo-example-restore")
CONFIG_TOML = """\
# /etc/luo-agent/config.toml of the lab VM (docs/configuration.md)
reboot_strategy = "{strategy}"
auto_finish = true

[timeouts]
prepare = 120.0
freeze = 60.0
restore = 120.0
"""

MASKED = (
    "postgresql.service",
    "postgresql@.service",
    "kexec-load.service",
    "kexec.service",
    "e2scrub_reap.service",
)

# Puts the moment the participant holds its verified fd on the host's clock (lab/liveupdate.py).
RESTORE_MARK_DROPIN = """\
[Service]
ExecStartPost=/bin/sh -c 'echo "lab-mark: restored $(date +%%s.%%N)" > /dev/console'
"""


def systemd_setup(
    install: str, extra_units: dict[str, str], strategy: str, example: bool = True, more: str = ""
) -> str:
    """Shell text run by init.sh before systemd starts, with the new root as $1; ``install`` lays
    the project and the example participant's units into it (``Host.install``); ``example``: the
    example participant is enabled; ``more``: shell text of the scenario's own."""
    units = "".join(
        f"cat > \"$root/etc/systemd/system/{name}\" <<'UNIT'\n{text}UNIT\n"
        for name, text in extra_units.items()
    )
    examples = [f"{u}.service" for u in EXAMPLE_UNITS] if example else []
    enable = " ".join(examples + list(extra_units))
    # ``systemctl enable`` with no unit fails ("Too few arguments"), and the set-up with it.
    enable_line = f'chroot "$root" systemctl enable {enable} >> "$log" 2>&1\n' if enable else ""
    return f"""\
set -e
root=$1
log="$root$LAB_RUN/setup.$LAB_BOOT.log"
echo "lab-mark: setup-start $(date +%s.%N)" > /dev/console
echo "LAB_RUN=$LAB_RUN" > "$root/etc/lab.env"
# What shapes this boot's speed under TCG (a kexec'd kernel may choose another clock source).
{{ cat "$root/sys/devices/system/clocksource/clocksource0/current_clocksource"
  grep MemTotal /proc/meminfo; }} > "$root$LAB_RUN/machine.$LAB_BOOT.txt" 2>&1 || true
# The disk a real machine keeps across the kexec: the agent's history, the participant's record.
for dir in luo-agent luo-example; do
    mkdir -p "$root$LAB_RUN/state/$dir" "$root/var/lib/$dir"
    mount --bind "$root$LAB_RUN/state/$dir" "$root/var/lib/$dir"
done
{install}
mkdir -p "$root/etc/luo-agent"
cat > "$root/etc/luo-agent/config.toml" <<'TOML'
{CONFIG_TOML.format(strategy=strategy)}TOML
mkdir -p "$root/etc/systemd/system/luo-example-restore.service.d"
cat > "$root/etc/systemd/system/luo-example-restore.service.d/lab-mark.conf" <<'UNIT'
{RESTORE_MARK_DROPIN}UNIT
{units}{enable_line}
# Services of this host that the VM does not need: a database (CPU under TCG), kexec-tools'
# boot-time load of the host's own kernel (the agent loads the kernel to switch to), and
# e2fsprogs' e2scrub_reap (its IOSchedulingClass= fails with ENOSYS on the lab kernel, which has
# no block layer: a failed unit in every boot that has nothing to do with the update).
for unit in {" ".join(MASKED)}; do
    ln -sf /dev/null "$root/etc/systemd/system/$unit"
done
{more}echo "lab-mark: setup-done $(date +%s.%N)" > /dev/console
"""


# The run directory exported a second time and mounted with the guest's page cache (9p
# ``cache=mmap``): a disk that survives the kexec as the run directory does, on which what was
# written and fsync'd reaches the host and the rest is lost with the boot.  For programs that map
# their files shared (etcd's bbolt): the run directory's own mount has no guest cache, and there
# the kernel refuses a shared mapping of a file open for writing (EINVAL).  A virtio-9p channel
# takes one mount only, hence a second export of the same directory.
DISK_TAG = "labdisk"
DISK_MOUNT = "/var/lib/lab-disk"
DISK_SETUP = f"""mkdir -p "$root{DISK_MOUNT}"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=mmap {DISK_TAG} "$root{DISK_MOUNT}"
"""


def disk_share(run_dir: Path) -> list[str]:
    """QEMU arguments exporting ``run_dir`` for DISK_MOUNT."""
    return [
        *("-fsdev", f"local,id={DISK_TAG},path={run_dir.resolve()},security_model=none"),
        *("-device", f"virtio-9p-pci,fsdev={DISK_TAG},mount_tag={DISK_TAG}"),
    ]


@dataclass(frozen=True)
class Host:
    """The system the VM boots.  ``bookworm``: this machine's own root (Debian 12, systemd 252)
    with the project's Debian package installed by ``dpkg -i``.  ``sid``: ``lab/rootfs.py``'s
    root (systemd 262), the project laid out as the package lays it out, its code from the
    checkout (sid has no Python 3.11 for the Debian 12 package's private environment)."""

    name: str
    root: Path | None = None

    def seen(self, path: Path) -> str:
        """Where a host path is inside the VM (a root of its own has the host's at /run/host)."""
        return str(path) if self.root is None else f"/run/host{path}"

    @property
    def python(self) -> str:
        """An interpreter in the VM that imports luo_agent and runs ``lab.in_vm``."""
        return str(VENV_PYTHON) if self.root is None else f"{PRIVATE_ENV}/bin/python3"

    def install(self) -> str:
        """Setup shell text: the project and the example participant's units into $root."""
        if self.root is None:
            deb = ensure_deb()
            return (
                f'chroot "$root" dpkg -i {deb} > "$log" 2>&1\n'
                'cp "$root"/usr/share/doc/luo-agent/examples/units/luo-example-*.service '
                '"$root/etc/systemd/system/"'
            )
        # As the package's rules do: the example units run the private environment's python.
        examples = " ".join(str(REPO / "units" / f"{unit}.service") for unit in EXAMPLE_UNITS)
        return (
            f'( {install_project_hook()} ) > "$log" 2>&1\n'
            f"for unit in {examples}; do\n"
            f"    sed 's|^ExecStart=/usr/bin/python3 |ExecStart={PRIVATE_ENV}/bin/python3 |' "
            '"$unit" > "$root/etc/systemd/system/$(basename "$unit")"\n'
            "done"
        )


BOOKWORM = Host("bookworm")


def sid_host() -> Host:
    return Host("sid", ensure_sid_root().dir)
