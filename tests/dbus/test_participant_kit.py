"""The participant kit (luo_agent.participant) against the real agent on a real bus: a memfd kept
handed in across a cancel, an agent restart and a whole update, and its bytes back after the
kexec; the hook dispatch."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from dbus_fast.aio import MessageBus

from luo_agent.client import CallError, call
from luo_agent.participant import (
    Participant,
    ask,
    command_handler,
    kernel_update_id,
    notify,
    run_hooks,
)
from tests.dbus.harness import AgentHost, SignalLog, client_bus, disconnect, plain
from tests.dbus.test_dbus_api import load_kernel, prepared


async def handed_in(bus: MessageBus) -> list[list[object]]:
    (rows,) = await call(bus, "ListSessions")
    return [r for r in plain(rows) if r[0] == "counter"]


async def until_handed_in(bus: MessageBus) -> None:
    """The kit hands in on the agent's signals; the test asks until the agent lists it."""
    for _ in range(500):
        if await handed_in(bus) == [["counter", 1, "uid=0", "registered"]]:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not handed in: {await handed_in(bus)}")


async def test_a_kept_memfd_survives_cancel_restart_and_update(host: AgentHost) -> None:
    admin = await client_bus()
    log = SignalLog(admin)
    try:
        lu = await Participant.connect("counter")
        assert not lu.live_update_boot
        fd = await lu.memfd(1, size=4096)
        assert os.fstat(fd).st_size == 4096
        os.pwrite(fd, b"count=1", 0)
        await until_handed_in(admin)

        # A cancelled update lets go of every fd: the kit hands it in again.
        await prepared(admin, log, "cancelled-one")
        await call(admin, "Cancel", "s", [""])
        await log.wait_for(lambda: log.ended("cancelled-one"))
        await until_handed_in(admin)

        # A restarted agent holds nothing of the previous one's: handed in again.
        await host.stop()
        await host.start()
        await until_handed_in(admin)
        await disconnect(admin)

        admin = await client_bus()
        log = SignalLog(admin)
        await load_kernel(admin, host)
        await prepared(admin, log, "kept")
        os.pwrite(fd, b"count=2", 0)  # the contents stay writable; the kernel carries the last
        await call(admin, "Execute", "s", ["kept"])
        await log.wait_for(lambda: "rebooting" in log.phases("kept"))
        await lu.close()
        os.close(fd)
        await disconnect(admin)
        await host.reboot()

        # The new boot: the workload gets its memfd back and knows which update brought it.
        admin = await client_bus()
        log = SignalLog(admin)
        await log.match_manager()
        lu = await Participant.connect("counter")
        assert (lu.live_update_boot, lu.update_id) == (True, "kept")
        fd = await lu.memfd(1, size=4096)
        assert os.pread(fd, 7, 0) == b"count=2" and os.fstat(fd).st_size == 4096
        await call(admin, "Restore", "s", [""])
        await log.wait_for(lambda: "restored" in log.phases("kept"))
        await call(admin, "Finish", "s", [""])
        await log.wait_for(lambda: log.ended("kept"))
        # Once the update is over, the same memfd is handed in for the next one.
        await until_handed_in(admin)
        assert not lu.live_update_boot
        await lu.close()
        os.close(fd)
    finally:
        await disconnect(admin)


async def test_keep_replaces_an_earlier_registration_and_unpreserve_stops(
    host: AgentHost,
) -> None:
    admin = await client_bus()
    first = await Participant.connect("counter")
    second = await Participant.connect("counter")
    try:
        fd = os.memfd_create("one")
        await first.keep(1, fd)
        await first.close()  # the workload died; its registration stays with the agent
        await until_handed_in(admin)
        # Its next run hands in a new memfd under the same token: it replaces the old one.
        other = os.memfd_create("two")
        os.write(other, b"second run")
        await second.keep(1, other)
        await until_handed_in(admin)
        await second.unpreserve(1)
        assert await handed_in(admin) == []
        os.close(fd)
        os.close(other)
    finally:
        await second.close()
        await disconnect(admin)


async def test_dependencies_are_passed_through(host: AgentHost, client: MessageBus) -> None:
    async with await Participant.connect("counter") as lu:
        first, second = os.memfd_create("a"), os.memfd_create("b")
        await lu.preserve(1, first)
        await lu.preserve(2, second, depends_on=[("counter", 1)])
        with pytest.raises(CallError, match="InvalidArgument"):
            await call(client, "Unpreserve", "st", ["counter", 1])  # 2 depends on it
        os.close(first)
        os.close(second)


def test_run_hooks_dispatches_on_the_phase(capsys: pytest.CaptureFixture[str]) -> None:
    ran: list[str] = []

    async def restore() -> None:
        ran.append("restore")

    def cancel() -> None:
        raise RuntimeError("could not resume")

    hooks = {"restore": restore, "cancel": cancel}
    assert run_hooks(hooks, ["hook", "restore"]) == 0 and ran == ["restore"]
    assert run_hooks(hooks, ["hook", "finish"]) == 0  # no function: the phase passes
    assert run_hooks(hooks, ["hook", "cancel"]) == 1
    assert "cancel hook failed: could not resume" in capsys.readouterr().err
    assert run_hooks(hooks, ["hook", "bogus"]) == 2
    assert run_hooks(hooks, ["hook"]) == 2


async def test_a_workloads_control_socket_answers_its_hooks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def preserve() -> str:
        return "handed in 4096 bytes"

    async def restore() -> str:
        raise RuntimeError("data mismatch")

    async def refused() -> str:
        raise CallError("org.luoagent.LiveUpdate1.Error.Busy", "an update is under way")

    path = tmp_path / "control.sock"
    commands = {"preserve": preserve, "restore": restore, "refused": refused}
    server = await asyncio.start_unix_server(command_handler(commands, "myapp"), path=str(path))
    async with server:
        assert await ask(path, "preserve") == "handed in 4096 bytes"
        with pytest.raises(RuntimeError, match=r"^data mismatch$"):
            await ask(path, "restore")
        with pytest.raises(RuntimeError, match=r"Error\.Busy: an update is under way"):
            await ask(path, "refused")
        with pytest.raises(RuntimeError, match="unknown command 'bogus'"):
            await ask(path, "bogus")
    assert "myapp: preserve: ok handed in 4096 bytes" in capsys.readouterr().out
    with pytest.raises((ConnectionRefusedError, FileNotFoundError)):
        await ask(path, "preserve")  # nothing listens any more


def test_kernel_update_id_and_notify(monkeypatch: pytest.MonkeyPatch) -> None:
    assert kernel_update_id("console=ttyS0 luo_agent.update=u-7 quiet") == "u-7"
    assert kernel_update_id("console=ttyS0") == ""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False


def test_notify_reaches_the_socket(
    tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    path = os.path.join(tmp_path, "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert notify("READY=1", "STATUS=kept") is True
        assert server.recv(100) == b"READY=1\nSTATUS=kept"
