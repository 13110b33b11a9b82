"""The kernel's own liveupdate selftests in the lab VM: they anchor the lab.

``liveupdate`` runs in the first boot; ``luo_kexec_simple`` and ``luo_multi_session`` run their
stage 1 there (each leaves a daemon holding its sessions), the job kexecs with the selftests' own
``do_kexec.sh``, and their stage 2 runs in the next kernel.  If these fail the lab is broken, not
the project.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from .build import KernelBuild
from .vm import Vm, VmResult

KEXEC_TESTS = ("luo_kexec_simple", "luo_multi_session")


def selftest_job(kernel: KernelBuild) -> str:
    tests = kernel.dir / "selftests"
    lines = [
        'out="$LAB_RUN"',
        'if [ "$LAB_BOOT" = 1 ]; then',
        f'    {tests}/liveupdate > "$out/liveupdate.tap" 2>&1; echo $? > "$out/liveupdate.rc"',
        '    cat "$out/liveupdate.tap"',
    ]
    for name in KEXEC_TESTS:
        lines.append(
            f'    {tests}/{name} --stage 1 > "$out/{name}.1.log" 2>&1;'
            f' echo $? > "$out/{name}.1.rc"; cat "$out/{name}.1.log"'
        )
    lines += [
        f"    KERNEL={kernel.bzimage} sh {tests}/do_kexec.sh",
        '    echo "lab: the kexec did not happen"; exit 9',
        "fi",
    ]
    for name in KEXEC_TESTS:
        lines.append(
            f'{tests}/{name} --stage 2 > "$out/{name}.2.log" 2>&1;'
            f' echo $? > "$out/{name}.2.rc"; cat "$out/{name}.2.log"'
        )
    lines.append("exit 0")
    return "\n".join(lines) + "\n"


@dataclass
class SelftestResults:
    vm: VmResult
    totals: dict[str, int] = field(default_factory=dict)  # of the `liveupdate` TAP run
    exit_codes: dict[str, int | None] = field(default_factory=dict)  # "name.stage" -> rc

    @property
    def ok(self) -> bool:
        return (
            self.vm.ok
            and self.vm.boots == 2
            and self.totals.get("pass", 0) > 0
            and all(self.totals.get(k, 0) == 0 for k in ("fail", "error", "skip"))
            and all(rc == 0 for rc in self.exit_codes.values())
            and len(self.exit_codes) == 1 + 2 * len(KEXEC_TESTS)
        )

    def summary(self) -> list[str]:
        lines = [f"vm: {self.vm.describe()}", f"liveupdate: {self.totals}"]
        lines += [f"{name}: exit {rc}" for name, rc in sorted(self.exit_codes.items())]
        return lines


def _rc(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def parse(vm: VmResult) -> SelftestResults:
    results = SelftestResults(vm)
    tap = vm.run_dir / "liveupdate.tap"
    if tap.exists():
        totals = re.search(r"# Totals: (.*)", tap.read_text(errors="replace"))
        if totals:
            results.totals = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", totals.group(1))}
    results.exit_codes["liveupdate"] = _rc(vm.run_dir / "liveupdate.rc")
    for name in KEXEC_TESTS:
        for stage in (1, 2):
            results.exit_codes[f"{name}.{stage}"] = _rc(vm.run_dir / f"{name}.{stage}.rc")
    return results


def run_selftests(
    kernel: KernelBuild, run_dir: Path, echo: IO[str] | None = None, timeout: float = 300.0
) -> SelftestResults:
    vm = Vm(kernel.bzimage, echo=echo)
    return parse(vm.run(selftest_job(kernel), run_dir, timeout))
