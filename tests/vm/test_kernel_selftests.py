"""The kernel's own liveupdate selftests in the VM: they anchor the lab (if they fail, the lab is
broken, not the project)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from lab.build import KernelBuild
from lab.selftests import KEXEC_TESTS, run_selftests


def test_kernel_selftests_pass_across_a_real_kexec(lab_kernel: KernelBuild) -> None:
    results = run_selftests(lab_kernel, Path(tempfile.mkdtemp(prefix="luo-lab-selftests-")))
    summary = "\n".join(results.summary())
    assert results.vm.ok, summary
    assert results.vm.boots == 2, summary
    assert results.totals.get("pass", 0) >= 15, summary
    assert results.totals.get("fail") == 0 and results.totals.get("error", 0) == 0, summary
    for name in KEXEC_TESTS:
        assert results.exit_codes[f"{name}.1"] == 0, summary
        assert results.exit_codes[f"{name}.2"] == 0, summary
        assert "PASSED" in (results.vm.run_dir / f"{name}.2.log").read_text(), summary
    assert results.ok, summary
