"""The cgroups a ``Sandbox`` runs in: one per mounted hierarchy, nested under the caller's own.

A user manager that finds itself in a root cgroup takes it over and migrates *every* process of
that cgroup into its ``init.scope`` — on a host whose PID 1 is not systemd that would be the whole
machine — so every process of a sandbox first joins these cgroups (``join_prefix``), before the
real program exists.  They also make the final kill complete.  Stdlib only.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

# Joins the cgroups named before "--", then execs the rest: runs before the real program exists,
# so no process of the sandbox is ever outside its cgroup.
_JOIN_CGROUPS = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'


def own_cgroup_dirs() -> list[Path]:
    """The caller's own cgroup directory in every mounted hierarchy (v1 cpuset excluded: it
    needs cpus/mems set up before tasks may join, and systemd never manages it on v1)."""
    mounts: list[tuple[str, str, set[str]]] = []  # (mount point, mount root, super options)
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if rfields and rfields[0] in ("cgroup", "cgroup2"):
            mounts.append((fields[4], fields[3], set(rfields[2].split(",")) | {rfields[0]}))
    dirs: list[Path] = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        wanted = set(controllers.split(",")) if controllers else {"cgroup2"}
        if "cpuset" in wanted:
            continue
        for point, root, opts in mounts:
            if wanted <= opts and (path == root or path.startswith(root.rstrip("/") + "/")):
                rel = path[len(root) :] if root != "/" else path
                dirs.append(Path(point + rel))
                break
    return [d for d in dirs if os.access(d, os.W_OK)]


class SandboxCgroups:
    """A cgroup named ``tag`` under the caller's own in every writable hierarchy."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.paths: list[Path] = []

    def create(self) -> None:
        for parent in own_cgroup_dirs():
            cgroup = parent / self.tag
            cgroup.mkdir()
            self.paths.append(cgroup)

    def join_prefix(self) -> list[str]:
        """An argv prefix that joins these cgroups, then execs the argv that follows it."""
        procs = [str(cg / "cgroup.procs") for cg in self.paths]
        return ["/bin/sh", "-c", _JOIN_CGROUPS, "sh", *procs, "--"]

    def pids(self) -> set[int]:
        pids: set[int] = set()
        for cgroup in self.paths:
            for procs in cgroup.rglob("cgroup.procs"):
                with contextlib.suppress(OSError):
                    pids.update(int(p) for p in procs.read_text().split())
        return pids

    def remove(self, deadline: float) -> bool:
        """rmdir depth-first; a just-killed process can linger in cgroup.procs briefly."""
        while True:
            for cgroup in self.paths:
                if not cgroup.exists():
                    continue
                subdirs = sorted(
                    (p for p in cgroup.rglob("*") if p.is_dir()),
                    key=lambda p: len(p.parts),
                    reverse=True,
                )
                for directory in [*subdirs, cgroup]:
                    with contextlib.suppress(OSError):
                        directory.rmdir()
            if not any(cgroup.exists() for cgroup in self.paths):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
