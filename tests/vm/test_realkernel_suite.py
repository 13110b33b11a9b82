"""The project's own real-device kernel tests (``-m realkernel`` of ``tests/kernel``) inside the
VM, against the real 7.2 ``/dev/liveupdate``: none may fail, error or skip for the session ABI."""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from tests.vm.conftest import RunInVm

REPO = Path(__file__).resolve().parents[2]


def test_realkernel_suite_passes_on_the_real_session_kernel(run_in_vm: RunInVm) -> None:
    job = (
        f"cd {REPO}\n"
        f"{sys.executable} -m pytest -p no:cacheprovider -q -m realkernel tests/kernel "
        '-o addopts="-ra --strict-markers" --junitxml="$LAB_RUN/junit.xml"\n'
    )
    result = run_in_vm(job, timeout=900)
    junit = result.run_dir / "junit.xml"
    assert junit.exists(), f"{result.describe()}\n{result.job_log(1)[-3000:]}"
    cases = ET.parse(junit).getroot().iter("testcase")
    outcome: dict[str, str] = {}
    for case in cases:
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        outcome[f"{case.get('classname')}::{case.get('name')}"] = kinds[0] if kinds else "passed"
    session = {name: kind for name, kind in outcome.items() if "real-session" in name}
    assert len(session) >= 50, f"too few session-ABI real-kernel tests ran: {sorted(session)}"
    bad = {name: kind for name, kind in session.items() if kind != "passed"}
    assert not bad, f"{result.job_log(1)[-4000:]}\nnot passed: {bad}"
    assert result.ok, result.describe()
