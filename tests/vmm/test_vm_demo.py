"""``./scripts/demo --vm``: the demo's update carries a QEMU guest too, and says so."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .conftest import needs_sandbox_and_qemu

pytestmark = needs_sandbox_and_qemu
REPO = Path(__file__).resolve().parents[2]


def test_the_demo_shows_the_guest_surviving() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "luo_agent.demo", "--size", str(256 << 10), "--vm"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    lines = out.splitlines()
    assert any("after the kexec (equal)" in line for line in lines), out
    assert any("booted 1 time(s)" in line for line in lines), out
    assert "==> cleaned up: no process left behind" in lines, out
