"""Differential: every raw-byte vector of ``tests/kernel/vectors.py`` on the emulated G6 kernel and
on the real 7.2 kernel in the VM, including the vectors whose second half runs after a real kexec.
The traces (return values, errnos, argument bytes, fd kinds, sizes, seals, positions, contents)
must be equal: the real kernel is the judge and the emulator its copy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from lab.build import KernelBuild
from tests.kernel.vectors import all_vectors, compare
from tests.vm.conftest import RunInVm

REPO = Path(__file__).resolve().parents[2]


def _vectors(path: Path) -> dict[str, object]:
    document = json.loads(path.read_text())
    vectors = document["vectors"]
    assert isinstance(vectors, dict)
    return vectors


def test_real_kernel_and_emulator_agree_on_every_vector(
    run_in_vm: RunInVm, lab_kernel: KernelBuild, tmp_path: Path
) -> None:
    emulated = tmp_path / "emulated.json"
    subprocess.run(
        [sys.executable, "-m", "tests.kernel.vectors", "run", "--stage", "all",
         "--out", str(emulated), "--emulated", str(tmp_path / "machine"), "--profile", "g6"],
        cwd=REPO, check=True, timeout=600,
    )  # fmt: skip
    run = f"cd {REPO} && {sys.executable} -m tests.kernel.vectors run"
    job = (
        'if [ "$LAB_BOOT" = 1 ]; then\n'
        f'  {run} --stage 1 --out "$LAB_RUN/real.1.json" --kexec {lab_kernel.bzimage}\n'
        '  echo "the kexec did not happen"; exit 9\n'
        "fi\n"
        f'{run} --stage 2 --out "$LAB_RUN/real.2.json"\n'
    )
    result = run_in_vm(job, timeout=600)
    assert result.ok, f"{result.describe()}\n{result.job_log(1)[-2000:]}{result.job_log(2)[-2000:]}"
    assert result.boots == 2
    real = _vectors(result.run_dir / "real.1.json") | _vectors(result.run_dir / "real.2.json")
    emu = _vectors(emulated)
    # Every vector ran on both sides, the kexec ones included.
    expected = len(all_vectors())
    assert len(emu) >= expected and set(real) == set(emu), (sorted(real), sorted(emu))
    differences = compare({"vectors": emu}, {"vectors": real})
    assert differences == [], "\n".join(differences[:50])
