"""Run inside a private mount namespace (``unshare -m``) by test_faults_disk: the agent's state
and runtime directories are tiny tmpfs mounts that the scenario fills up or remounts read-only
while the agent runs.  Prints one JSON line with what happened.

    unshare -m --propagation private python -m tests.faults.persist_scenario \
        --abi ABI --machine ROOT --work DIR --fault {full,readonly}
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from luo_agent import phase as ph
from luo_agent.kernel.emulator import EmulatedMachine
from tests.agent_host import AgentHost, until
from tests.fakes.gate import FakeGate


def mount_tmpfs(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)], check=True)


def fill(path: Path) -> None:
    fd = os.open(path / "filler", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)


def set_fault(paths: list[Path], fault: str, on: bool) -> None:
    for path in paths:
        if fault == "full":
            if on:
                fill(path)
            else:
                (path / "filler").unlink()
        else:
            mode = "remount,ro" if on else "remount,rw"
            subprocess.run(["mount", "-o", mode, str(path)], check=True)


async def one_update(host: AgentHost, agent: Any, update_id: str) -> dict[str, Any]:
    phases: list[str] = []

    class Seen:
        def phase_changed(self, record: object, phase: ph.Phase) -> None:
            phases.append(str(phase))

        def update_finished(self, record: object) -> None:
            pass

        def kernel_state_changed(self, value: str) -> None:
            pass

    seen = Seen()
    agent.listeners.append(seen)
    await agent.prepare(update_id, caller="test")
    await until(agent, lambda: agent.phase in (ph.Phase.PREPARED, ph.Phase.IDLE))
    if agent.phase is ph.Phase.PREPARED:
        await agent.cancel()
        await until(agent, lambda: agent.phase is ph.Phase.IDLE)
    agent.listeners.remove(seen)
    last = agent.last
    return {
        "phases": phases,
        "result": last.result if last else "",
        "message": last.message if last else "",
        "kernel": host.kernel_state(),
    }


def history_ids(state: Path) -> list[str]:
    try:
        return [e["id"] for e in json.loads((state / "history.json").read_text())]
    except FileNotFoundError:
        return []


async def scenario(args: argparse.Namespace) -> dict[str, Any]:
    work: Path = args.work
    state, run = work / "state", work / "run"
    for path in (state, run):
        mount_tmpfs(path)
    host = AgentHost(work, args.abi, EmulatedMachine(args.machine))
    async with host.agent(FakeGate()) as agent:
        await one_update(host, agent, "before-fault")
        set_fault([state, run], args.fault, on=True)
        during = await one_update(host, agent, "during-fault")
        history_during = history_ids(state)
        set_fault([state, run], args.fault, on=False)
        after = await one_update(host, agent, "after-fault")
        return {
            "during": during,
            "after": after,
            "history_during": history_during,
            "history_after": history_ids(state),
            "state_file": (run / "state").read_text(),
        }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--abi", required=True)
    parser.add_argument("--machine", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--fault", choices=("full", "readonly"), required=True)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(scenario(args))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
