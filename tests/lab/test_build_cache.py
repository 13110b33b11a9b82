"""The lab's kernel cache: an entry is used only when complete and intact, and the key changes
with everything that shapes the build."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lab.build import FRAGMENT, build_key, verify, wanted_options


def _entry(tmp_path: Path) -> Path:
    """A cache entry as the builder leaves it: files plus a manifest of their sha256."""
    import hashlib

    entry = tmp_path / "7.2.13-1-0123456789abcdef"
    (entry / "selftests").mkdir(parents=True)
    (entry / "bzImage").write_bytes(b"MZ" + bytes(range(256)) * 64)
    (entry / "selftests" / "liveupdate").write_bytes(b"\x7fELF" + b"x" * 1000)
    files = {
        str(p.relative_to(entry)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in entry.rglob("*")
        if p.is_file()
    }
    (entry / "manifest.json").write_text(json.dumps({"source_version": "7.2.13-1", "files": files}))
    return entry


def test_an_intact_entry_verifies(tmp_path: Path) -> None:
    entry = _entry(tmp_path)
    build = verify(entry)
    assert build is not None
    assert build.bzimage == entry / "bzImage"
    assert build.version == "7.2.13-1"


def test_a_flipped_byte_is_detected(tmp_path: Path) -> None:
    entry = _entry(tmp_path)
    data = bytearray((entry / "bzImage").read_bytes())
    data[100] ^= 1
    (entry / "bzImage").write_bytes(bytes(data))
    assert verify(entry) is None


@pytest.mark.parametrize("missing", ["manifest.json", "bzImage", "selftests/liveupdate"])
def test_a_partial_entry_is_detected(tmp_path: Path, missing: str) -> None:
    entry = _entry(tmp_path)
    (entry / missing).unlink()
    assert verify(entry) is None


def test_a_truncated_manifest_is_detected(tmp_path: Path) -> None:
    entry = _entry(tmp_path)
    manifest = entry / "manifest.json"
    manifest.write_text(manifest.read_text()[:20])
    assert verify(entry) is None


def test_an_absent_entry_is_none(tmp_path: Path) -> None:
    entry = _entry(tmp_path)
    shutil.rmtree(entry)
    assert verify(entry) is None


def test_the_key_follows_source_version_and_config() -> None:
    base = build_key("7.2.13-1", b"CONFIG_LIVEUPDATE=y\n")
    assert build_key("7.2.13-1", b"CONFIG_LIVEUPDATE=y\n") == base
    assert build_key("7.2.14-1", b"CONFIG_LIVEUPDATE=y\n") != base
    assert build_key("7.2.13-1", b"CONFIG_LIVEUPDATE=y\nCONFIG_X=y\n") != base
    # Length-prefixed parts: moving bytes between version and config changes the key.
    assert build_key("7.2.13-1C", b"ONFIG_LIVEUPDATE=y\n") != base


def test_the_fragment_settings_are_all_checked() -> None:
    fragment = '# a comment\nCONFIG_A=y\n\n# CONFIG_B is not set\nCONFIG_C="x"\n'
    assert wanted_options(fragment) == ["CONFIG_A=y", "# CONFIG_B is not set", 'CONFIG_C="x"']


def test_the_shipped_fragment_asks_for_luo_and_kexec_file() -> None:
    wanted = wanted_options(FRAGMENT.read_text())
    for option in (
        "CONFIG_LIVEUPDATE=y",
        "CONFIG_KEXEC_HANDOVER=y",
        "CONFIG_KEXEC_FILE=y",
        "CONFIG_LIVEUPDATE_MEMFD=y",
        "CONFIG_9P_FS=y",
    ):
        assert option in wanted
