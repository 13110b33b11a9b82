"""liveupdatectl as an operator runs it (a subprocess, ``--session-bus``) against the real agent on
a private bus: every command, its human and JSON output (validated against docs/cli-schema.json)
and every documented exit code."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from luo_agent.cli import SCHEMA, ExitCode
from luo_agent.dbus.names import error
from luo_agent.kernel.device import Abi
from luo_agent.systemd.gate import UnitStatus
from tests.cli import schema
from tests.dbus.harness import AgentHost, SignalLog, client_bus, disconnect

REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str
    docs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def result(self) -> dict[str, Any]:
        (final,) = [d for d in self.docs if d["type"] in ("result", "error")]
        assert self.docs[-1] is final, "the result or error comes last"
        return final

    @property
    def events(self) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["type"] == "event"]


async def ctl(
    *args: str,
    as_json: bool = False,
    uid: int | None = None,
    pass_fds: Sequence[int] = (),
    env: dict[str, str] | None = None,
    session_bus: bool = True,
) -> Run:
    """Run liveupdatectl; with ``as_json`` every stdout line must be a valid schema document."""
    command = [sys.executable, "-m", "luo_agent.cli"]
    if session_bus:
        command.append("--session-bus")
    if as_json:
        command.append("--json")
    command += args
    if uid is not None:
        command = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *command]
    proc = await asyncio.create_subprocess_exec(
        *command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
        pass_fds=pass_fds,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    run = Run(proc.returncode, out.decode(), err.decode())
    assert "Traceback" not in run.stderr, run.stderr
    if as_json:
        for line in run.stdout.splitlines():
            document = json.loads(line)
            schema.validate(document)
            assert document["schema"] == SCHEMA
            run.docs.append(document)
        assert run.docs, f"no JSON output: {run.stderr}"
        if run.code != 0:
            assert run.result.get("exit", run.code) == run.code
    return run


def kernel_image(host: AgentHost) -> str:
    image = host.workdir / "vmlinuz"
    image.write_bytes(b"emulated kernel image\n" * 64)
    return str(image)


def memfd(data: bytes) -> int:
    fd = os.memfd_create("cli-test", os.MFD_CLOEXEC)
    os.write(fd, data)
    return fd


# ---------------------------------------------------------------------------------- reading


async def test_status_check_sessions_history_on_an_idle_agent(host: AgentHost) -> None:
    run = await ctl("status")
    assert run.code == ExitCode.OK
    assert "Phase:          idle" in run.stdout
    assert "Kernel ABI:     session" in run.stdout
    run = await ctl("status", as_json=True)
    status = run.result["status"]
    assert (status["Phase"], status["KernelAbi"], status["CurrentUpdate"]) == (
        "idle",
        Abi.SESSION,
        "",
    )

    run = await ctl("check")
    assert run.code == ExitCode.BLOCKED
    assert "not ready" in run.stdout and "blocker:" in run.stdout
    run = await ctl("check", as_json=True)
    assert run.code == ExitCode.BLOCKED and run.result["check"]["ready"] is False

    run = await ctl("load-kernel", kernel_image(host), "--cmdline", "console=ttyS0", as_json=True)
    assert run.code == ExitCode.OK
    assert run.result["cmdline"].startswith("console=ttyS0 luo_agent.update=")
    run = await ctl("check", as_json=True)
    assert run.code == ExitCode.OK, run.result
    assert run.result["check"]["ready"] is True and run.result["check"]["kernel-loaded"] is True

    run = await ctl("sessions")
    assert run.code == ExitCode.OK and "no preserved file descriptors" in run.stdout
    run = await ctl("history", as_json=True)
    assert run.code == ExitCode.OK and run.result["history"] == []


# ------------------------------------------------------------------------ a whole update


@pytest.mark.parametrize("host", [Abi.SESSION, Abi.V3, Abi.RFC_V2], indirect=True)
async def test_update_wait_streams_each_phase_once_then_retrieve_after_the_kexec(
    host: AgentHost, tmp_path: Path
) -> None:
    data = os.urandom(64 << 10)
    fd = memfd(data)
    try:
        run = await ctl("preserve", "--session", "vm-1", "--token", "7", "--fd", str(fd),
                        pass_fds=[fd], as_json=True)  # fmt: skip
        assert run.code == ExitCode.OK and run.result["token"] == 7
    finally:
        os.close(fd)
    run = await ctl("sessions", as_json=True)
    assert run.result["sessions"] == [
        {"session": "vm-1", "token": 7, "owner": "uid=0", "state": "registered"}
    ]

    image = kernel_image(host)
    run = await ctl("update", "--wait", "--id", "cli-1", "--kernel", image, "--cmdline",
                    "console=ttyS0", as_json=True)  # fmt: skip
    assert run.code == ExitCode.OK, run.stdout + run.stderr
    assert [e["phase"] for e in run.events if e["event"] == "phase"] == [
        "preparing",
        "prepared",
        "freezing",
        "rebooting",
    ]
    assert run.events[0]["event"] == "kernel-loaded"
    assert "luo_agent.update=" in run.events[0]["cmdline"]
    assert run.result["type"] == "result"
    assert (run.result["update"], run.result["phase"], run.result["result"]) == (
        "cli-1",
        "rebooting",
        "",
    )
    assert "kexec issued" in run.result["message"]

    await host.reboot()
    run = await ctl("status", as_json=True)
    assert (run.result["status"]["Phase"], run.result["status"]["CurrentUpdate"]) == (
        "updated",
        "cli-1",
    )
    output = tmp_path / "retrieved"
    run = await ctl("retrieve", "--session", "vm-1", "--token", "7", "--output", str(output))
    assert run.code == ExitCode.OK and f"{len(data)} bytes" in run.stdout
    assert output.read_bytes() == data
    run = await ctl("sessions", as_json=True)
    assert run.result["sessions"][0]["state"] == "retrieved"

    bus = await client_bus()
    log = SignalLog(bus)
    try:
        await log.match_manager()
        run = await ctl("restore", "--id", "cli-1", as_json=True)
        assert run.code == ExitCode.OK and run.result["update"] == "cli-1"
        await log.wait_for(lambda: "restored" in log.phases("cli-1"))
        run = await ctl("finish")
        assert run.code == ExitCode.OK and "finish: requested" in run.stdout
        await log.wait_for(lambda: log.ended("cli-1"))
    finally:
        await disconnect(bus)
    run = await ctl("history", "--limit", "1", as_json=True)
    (entry,) = run.result["history"]
    assert (entry["id"], entry["result"], entry["abi"]) == ("cli-1", "success", host.abi)
    # One timing per phase entered: the kexec path and the new boot do not enter one twice.
    assert [t[0] for t in entry["timings"]] == [
        "preparing", "prepared", "freezing", "rebooting", "updated", "restoring", "restored",
        "finishing", "idle",
    ]  # fmt: skip
    run = await ctl("history")
    assert "cli-1" in run.stdout and "success" in run.stdout


async def test_update_wait_human_output_has_one_line_per_phase(host: AgentHost) -> None:
    run = await ctl("update", "--wait", "--id", "human-1", "--kernel", kernel_image(host),
                    "--cmdline", "console=ttyS0")  # fmt: skip
    assert run.code == ExitCode.OK, run.stderr
    lines = run.stdout.splitlines()
    phase_lines = [line for line in lines if line.startswith("[")]
    assert [line.rsplit(": ", 1)[1] for line in phase_lines] == [
        "preparing",
        "prepared",
        "freezing",
        "rebooting",
    ]
    assert lines[-1].startswith("update human-1: rebooting: kexec issued")
    assert len([line for line in lines if "human-1" in line]) == 5  # no duplicate lines


async def test_update_failure_exits_with_the_updates_result(host: AgentHost) -> None:
    host.gate.failing["liveupdate-prepare.target"] = UnitStatus(
        "db.service", "failed", "failed", "exit-code"
    )
    run = await ctl("update", "--wait", "--id", "doomed", "--kernel", kernel_image(host),
                    as_json=True)  # fmt: skip
    assert run.code == ExitCode.FAILURE
    assert [e["phase"] for e in run.events if e["event"] == "phase"] == [
        "preparing",
        "cancelling",
        "idle",
    ]
    result = run.result
    assert (result["type"], result["result"], result["error"]) == (
        "result",
        "failed",
        error("ParticipantFailed"),
    )
    assert "db.service" in result["message"]
    run = await ctl("update", "--id", "doomed-2")
    assert run.code == ExitCode.FAILURE and "failed" in run.stdout


async def test_update_without_a_loaded_kernel_is_refused_before_anything_starts(
    host: AgentHost,
) -> None:
    # Seen on the real kernel (tests/vm/test_whole_update.py): `update` used to prepare (the
    # participants handed in their fds, the kernel preserved them), then fail at Execute and
    # leave that update prepared.
    run = await ctl("update", "--wait", as_json=True)
    assert run.code == ExitCode.BLOCKED
    assert run.result["error"] == "liveupdatectl.NoKernel"
    assert "load-kernel" in run.result["message"]
    assert run.events == []
    status = (await ctl("status", as_json=True)).result["status"]
    assert (status["Phase"], status["CurrentUpdate"]) == ("idle", "")
    assert (await ctl("history", as_json=True)).result["history"] == []


async def test_update_without_wait_returns_once_execute_is_accepted(host: AgentHost) -> None:
    await ctl("load-kernel", kernel_image(host))
    run = await ctl("update", "--id", "quiet-1", as_json=True)
    assert run.code == ExitCode.OK
    assert run.events == []
    assert (run.result["update"], run.result["phase"]) == ("quiet-1", "freezing")
    await asyncio.wait_for(host.down.wait(), 30)  # the kexec follows on its own


async def test_prepare_execute_cancel_and_their_exit_codes(host: AgentHost) -> None:
    bus = await client_bus()
    log = SignalLog(bus)
    await log.match_manager()
    try:
        run = await ctl("prepare", "--id", "p-1", as_json=True)
        assert run.code == ExitCode.OK
        assert (run.result["update"], run.result["path"]) == (
            "p-1",
            "/org/luoagent/LiveUpdate1/update/p_2d1",
        )
        await log.wait_for(lambda: "prepared" in log.phases("p-1"))
        # BUSY: another update is in progress.
        run = await ctl("prepare", "--id", "p-2", as_json=True)
        assert run.code == ExitCode.BUSY and run.result["error"] == error("Busy")
        # BLOCKED: no kernel loaded, Execute is not possible in this state.
        run = await ctl("execute")
        assert run.code == ExitCode.BLOCKED and "LoadKernel" in run.stderr
        run = await ctl("cancel", "--id", "p-1")
        assert run.code == ExitCode.OK
        await log.wait_for(lambda: log.ended("p-1"))
    finally:
        await disconnect(bus)
    run = await ctl("status")
    assert "Last update:    p-1: cancelled\n" in run.stdout, run.stdout  # not "(cancelled)"
    # Nothing left to cancel: WrongPhase, BLOCKED as everywhere.
    run = await ctl("cancel", as_json=True)
    assert run.code == ExitCode.BLOCKED and run.result["error"] == error("WrongPhase")

    run = await ctl("prepare", "--wait", "--id", "p-3")
    assert run.code == ExitCode.OK
    # "started" first, then each phase (heard before Prepare's reply, printed after it).
    assert run.stdout.splitlines()[0].startswith("update p-3 started"), run.stdout
    assert [line.rsplit(" ", 1)[1] for line in run.stdout.splitlines()[1:3]] == [
        "preparing",
        "prepared",
    ], run.stdout
    assert run.stdout.splitlines()[-1] == "update p-3: prepared"
    await ctl("load-kernel", kernel_image(host))
    run = await ctl("execute", "--wait", as_json=True)
    assert run.code == ExitCode.OK
    assert [e["phase"] for e in run.events] == ["freezing", "rebooting"]
    assert run.result["update"] == "p-3"


async def test_prepare_with_the_same_id_is_idempotent_and_an_ended_id_exits_7(
    host: AgentHost,
) -> None:
    bus = await client_bus()
    log = SignalLog(bus)
    await log.match_manager()
    try:
        first = await ctl("prepare", "--id", "retry-me", as_json=True)
        await log.wait_for(lambda: "prepared" in log.phases("retry-me"))
        again = await ctl("prepare", "--id", "retry-me", as_json=True)
        assert first.code == again.code == ExitCode.OK, again.stderr
        assert again.result["update"] == "retry-me" and again.result["path"] == first.result["path"]
        assert log.phases("retry-me") == ["preparing", "prepared"]
        assert (await ctl("cancel", "--id", "retry-me")).code == ExitCode.OK
        await log.wait_for(lambda: log.ended("retry-me"))
    finally:
        await disconnect(bus)
    for _ in range(2):
        run = await ctl("prepare", "--id", "retry-me", as_json=True)
        assert run.code == ExitCode.ENDED, run.stderr
        assert run.result["error"] == error("UpdateEnded")
        assert "retry-me" in run.result["message"] and "cancelled" in run.result["message"]
    history = (await ctl("history", as_json=True)).result["history"]
    assert [(h["id"], h["result"]) for h in history] == [("retry-me", "cancelled")]


async def test_invalid_arguments_exit_6(host: AgentHost, tmp_path: Path) -> None:
    run = await ctl("prepare", "--id", "no spaces allowed", as_json=True)
    assert run.code == ExitCode.INVALID and run.result["error"] == error("InvalidArgument")
    run = await ctl("preserve", "--session", "vm", "--token", "-1", "--fd", "0", as_json=True)
    assert run.code == ExitCode.INVALID
    assert run.result["error"] == "liveupdatectl.InvalidArgument"
    run = await ctl("preserve", "--session", "vm", "--token", "1", "--fd", "0",
                    "--depends-on", "no-colon", as_json=True)  # fmt: skip
    assert run.code == ExitCode.INVALID
    run = await ctl("preserve", "--session", "vm", "--token", "1", "--file", "/dev/null")
    assert run.code == ExitCode.INVALID and "memfd" in run.stderr
    run = await ctl("load-kernel", str(tmp_path / "missing"), as_json=True)
    assert run.code == ExitCode.INVALID and run.result["error"] == "liveupdatectl.OSError"
    for usage in (["frobnicate"], ["preserve", "--session", "vm"], ["history", "--limit", "x"]):
        run = await ctl(*usage)
        assert run.code == ExitCode.INVALID, usage
        assert "usage:" in run.stderr
    run = await ctl("retrieve", "--session", "vm", "--token", "1", as_json=True)
    assert run.code == ExitCode.BLOCKED  # only after a live-update boot


async def test_another_uid_is_not_authorized(host: AgentHost, bus_address: str) -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run the CLI as another uid")
    run = await ctl("status", uid=NOBODY)
    assert run.code == ExitCode.OK, run.stderr  # reading is open to everyone
    run = await ctl("prepare", "--id", "intruder", uid=NOBODY, as_json=True)
    assert run.code == ExitCode.NOT_AUTHORIZED
    assert run.result["error"] == error("NotAuthorized")
    run = await ctl("status", as_json=True)
    assert run.result["status"]["Phase"] == "idle"


async def test_no_agent_is_unavailable_with_a_hint(bus_address: str, tmp_path: Path) -> None:
    run = await ctl("status", as_json=True)
    assert run.code == ExitCode.UNAVAILABLE
    assert run.result["error"] == "org.freedesktop.DBus.Error.ServiceUnknown"
    run = await ctl("check")
    assert run.code == ExitCode.UNAVAILABLE and "ServiceUnknown" in run.stderr
    assert "Hint: luo-agent is not running on the session bus" in run.stderr
    no_bus = {"DBUS_SESSION_BUS_ADDRESS": f"unix:path={tmp_path / 'no-such-socket'}"}
    run = await ctl("status", env=no_bus, as_json=True)
    assert run.code == ExitCode.UNAVAILABLE
    assert run.result["error"] == "org.freedesktop.DBus.Error.NoServer"
    assert run.stderr == ""  # with --json, the error document is all


async def test_on_the_system_bus_the_hints_name_the_unit_and_session_bus(
    bus_address: str, tmp_path: Path
) -> None:
    """Without --session-bus: a bus without the agent (the private bus, posing as the system
    bus), then no bus at all."""
    system = {"LUO_AGENT_BUS": "", "DBUS_SYSTEM_BUS_ADDRESS": bus_address}
    run = await ctl("status", env=system, session_bus=False)
    assert run.code == ExitCode.UNAVAILABLE
    (error, hint) = run.stderr.splitlines()
    assert error.startswith("liveupdatectl: ") and error.endswith(
        "(org.freedesktop.DBus.Error.ServiceUnknown)"
    )
    assert hint.startswith("Hint: luo-agent is not running on the system bus")
    assert "systemctl start luo-agent.service" in hint and "--session-bus" in hint
    socket = tmp_path / "no-such-socket"
    system["DBUS_SYSTEM_BUS_ADDRESS"] = f"unix:path={socket}"
    run = await ctl("status", env=system, session_bus=False)
    assert run.code == ExitCode.UNAVAILABLE
    (error, hint) = run.stderr.splitlines()
    assert error == (
        f"liveupdatectl: cannot connect to the system bus at unix:path={socket}: "
        "No such file or directory (org.freedesktop.DBus.Error.NoServer)"
    )
    assert hint.startswith("Hint: ") and "--session-bus" in hint


async def test_json_and_session_bus_go_before_or_after_the_command(host: AgentHost) -> None:
    """Where people put them (systemctl accepts its options after the verb too)."""
    for args in (
        ["--json", "history"],
        ["history", "--json"],
        ["history", "--limit", "5", "--json"],
    ):
        run = await ctl(*args)
        assert run.code == ExitCode.OK, (args, run.stderr)
        (document,) = [json.loads(line) for line in run.stdout.splitlines()]
        schema.validate(document)
        assert (document["type"], document["command"], document["history"]) == (
            "result",
            "history",
            [],
        )
    # --session-bus after the command; the environment does not say "session" either.
    run = await ctl(
        "status", "--session-bus", "--json", env={"LUO_AGENT_BUS": ""}, session_bus=False
    )
    assert run.code == ExitCode.OK, run.stderr
    assert json.loads(run.stdout)["status"]["Phase"] == "idle"
    # Given before the command, an option is not undone by its absence after it.
    run = await ctl("--json", "status", env={"LUO_AGENT_BUS": ""})
    assert run.code == ExitCode.OK and json.loads(run.stdout)["status"]["Phase"] == "idle"


async def test_keep_runs_the_command_with_a_kept_memfd_and_unpreserve_takes_it_back(
    host: AgentHost,
) -> None:
    # The command writes through $LIVEUPDATE_FILE and lists what the agent holds meanwhile.
    script = (
        'printf "count=1" > "$LIVEUPDATE_FILE"; '
        f"{sys.executable} -m luo_agent.cli --session-bus sessions; "
        'echo "fd=$LIVEUPDATE_FD update=[$LIVEUPDATE_UPDATE]"; exit 3'
    )
    run = await ctl("keep", "--session", "counter", "--size", "64", "--", "sh", "-c", script)
    assert run.code == 3, run.stderr  # the command's own exit code
    assert "counter" in run.stdout and "registered" in run.stdout
    assert "update=[]" in run.stdout  # not a live-update boot
    # Handed in it stays (the agent's own duplicate) until taken back.
    run = await ctl("sessions", as_json=True)
    assert [(s["session"], s["token"]) for s in run.result["sessions"]] == [("counter", 1)]
    run = await ctl("unpreserve", "--session", "counter", "--token", "1", as_json=True)
    assert run.code == ExitCode.OK and run.result["token"] == 1
    run = await ctl("sessions", as_json=True)
    assert run.result["sessions"] == []
    run = await ctl("unpreserve", "--session", "counter", "--token", "1", as_json=True)
    assert run.code == ExitCode.INVALID and "no fd registered" in run.result["message"]
    run = await ctl("keep", "--session", "counter", as_json=True)
    assert run.code == ExitCode.INVALID and "COMMAND" in run.result["message"]
    run = await ctl("keep", "--session", "counter", "--", "true", as_json=True)
    assert run.code == ExitCode.OK and run.result["exit"] == 0


async def test_watch_follows_phases_and_participants_until_the_update_ends(
    host: AgentHost,
) -> None:
    host.gate.failing["liveupdate-prepare.target"] = UnitStatus(
        "broken-hook.service", "failed", "failed", "exit-code"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "luo_agent.cli", "--session-bus", "--json", "watch",
        "--until-finished", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.stdout is not None
    first = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
    assert (first["event"], first["phase"]) == ("status", "idle")  # subscribed before this
    run = await ctl("prepare", "--id", "watched")
    assert run.code == ExitCode.OK
    rest, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == ExitCode.FAILURE, err  # the update failed
    docs = [first] + [json.loads(line) for line in rest.decode().splitlines()]
    for document in docs:
        schema.validate(document)
    phases = [d["phase"] for d in docs if d.get("event") == "phase"]
    assert phases[:2] == ["preparing", "cancelling"], phases
    shown = [d["participants"] for d in docs if d.get("event") == "participants"]
    assert shown and shown[-1][0] == ["broken-hook.service", "failed", "failed", "exit-code"]
    (finished,) = [d for d in docs if d.get("event") == "finished"]
    assert (finished["update"], finished["result"]) == ("watched", "failed")
    assert docs[-1]["type"] == "result"
