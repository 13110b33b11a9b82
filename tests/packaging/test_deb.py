"""The Debian package, built from this checkout by packaging/build-deb.sh and inspected with
dpkg-deb: file list, maintainer scripts, and the private environment actually running."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "packaging" / "build-deb.sh"
EX_TEMPFAIL = 75
UNIT_DIR = "lib/systemd/system"  # Debian 12's dh_installsystemd directory
UNITS = sorted(p.name for p in (REPO / "units").iterdir() if not p.name.startswith("luo-example-"))

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _why_not_buildable() -> str | None:
    if not Path("/usr/bin/python3.11").exists():
        return "needs Debian's /usr/bin/python3.11"
    if shutil.which("dpkg-deb") is None:
        return "dpkg-deb missing (not a Debian system)"
    if shutil.which("dpkg-buildpackage") is None and os.geteuid() != 0:
        return "dpkg-buildpackage missing and not root to install it"
    return None


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if (reason := _why_not_buildable()) is not None:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("deb")
    proc = subprocess.run(
        [str(BUILD_SCRIPT), str(out)], capture_output=True, text=True, timeout=540, check=False
    )
    if proc.returncode == EX_TEMPFAIL:
        pytest.skip(f"wheelhouse cannot be filled: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    path = Path(proc.stdout.strip().splitlines()[-1])
    assert path.parent == out and path.name.startswith("luo-agent_") and path.suffix == ".deb"
    return path


@pytest.fixture(scope="module")
def contents(deb: Path) -> dict[str, str]:
    """path (without the leading ./) -> mode string, from `dpkg-deb -c`."""
    listing = subprocess.run(
        ["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True
    ).stdout
    entries: dict[str, str] = {}
    for line in listing.splitlines():
        fields = line.split(maxsplit=5)
        name = fields[5].split(" -> ")[0].removeprefix("./")
        entries[name.rstrip("/")] = fields[0]
    return entries


@pytest.fixture(scope="module")
def control(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("control") / "DEBIAN"
    subprocess.run(["dpkg-deb", "-e", str(deb), str(directory)], check=True)
    return directory


@pytest.fixture(scope="module")
def unpacked(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("root")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    # The private environment's interpreter is a relative link to /usr/bin/python3.11: give the
    # unpacked tree one, as the installed system has.
    (root / "usr/bin/python3.11").symlink_to("/usr/bin/python3.11")
    return root


def test_units_policies_and_activation_file_are_where_systemd_dbus_and_polkit_look(
    contents: dict[str, str],
) -> None:
    expected = [f"{UNIT_DIR}/{unit}" for unit in UNITS] + [
        "usr/share/dbus-1/system.d/org.luoagent.LiveUpdate1.conf",
        "usr/share/polkit-1/actions/org.luoagent.liveupdate1.policy",
        "usr/share/dbus-1/system-services/org.luoagent.LiveUpdate1.service",
        "usr/share/doc/luo-agent/operator-guide.md",  # linked from the units, uncompressed
        "usr/share/doc/luo-agent/units.md",
        "usr/share/doc/luo-agent/examples/config.toml",
    ]
    assert [path for path in expected if path not in contents] == []
    # The example participant is documentation, never an installed unit.
    assert not any("luo-example" in path for path in contents if path.startswith(UNIT_DIR))


def test_executables_are_on_path(contents: dict[str, str]) -> None:
    for name in ("usr/bin/luo-agent", "usr/bin/liveupdatectl"):
        assert contents[name].startswith("-rwxr-xr-x"), (name, contents.get(name))


def test_postinst_enables_and_starts_only_the_agent(control: Path) -> None:
    postinst = (control / "postinst").read_text()
    assert "deb-systemd-helper enable 'luo-agent.service'" in postinst
    assert "deb-systemd-invoke start 'luo-agent.service'" in postinst
    # Starting a phase target or liveupdate.service from a maintainer script would run an update.
    scripts = "".join((control / name).read_text() for name in ("postinst", "prerm", "postrm"))
    assert "liveupdate.service" not in scripts and "liveupdate-" not in scripts


def test_upgrade_never_stops_the_agent(control: Path) -> None:
    prerm = (control / "prerm").read_text()
    stops = [line for line in prerm.splitlines() if "deb-systemd-invoke stop" in line]
    assert stops, prerm  # removing the package does stop it
    assert '"$1" = remove' in prerm and "upgrade" not in prerm
    postinst = (control / "postinst").read_text()
    assert "deb-systemd-invoke restart" not in postinst
    assert "try-restart luo-agent.service" in postinst  # only when idle, see the postinst


def test_private_environment_runs_the_cli_and_imports_the_agent(unpacked: Path) -> None:
    python = unpacked / "usr/lib/luo-agent/bin/python3"
    imports = subprocess.run(
        [
            str(python),
            "-I",
            "-c",
            "import luo_agent.daemon, luo_agent.dbus.manager, luo_agent.systemd.pystemd_gate",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert imports.returncode == 0, imports.stderr
    # The wrapper's shebang is the private interpreter; run the wrapper through the unpacked one.
    wrapper = unpacked / "usr/bin/liveupdatectl"
    assert wrapper.read_text().startswith("#!/usr/lib/luo-agent/bin/python3 -I\n")
    status = subprocess.run(
        [str(python), "-I", str(wrapper), "--json", "status"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "DBUS_SYSTEM_BUS_ADDRESS": "unix:path=/nonexistent/bus"},
        check=False,
    )
    assert status.returncode == 69, status.stderr  # ExitCode.UNAVAILABLE: no bus, a clean error
    assert json.loads(status.stdout)["type"] == "error"


def test_example_units_use_the_private_interpreter(unpacked: Path) -> None:
    examples = sorted((unpacked / "usr/share/doc/luo-agent/examples/units").iterdir())
    assert [p.name for p in examples] == sorted(
        p.name for p in (REPO / "units").glob("luo-example-*.service")
    )
    for unit in examples:
        assert "ExecStart=/usr/lib/luo-agent/bin/python3 -m luo_agent" in unit.read_text()
