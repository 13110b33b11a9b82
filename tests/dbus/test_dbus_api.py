"""org.luoagent.LiveUpdate1 on a real bus: every method, its errors and its signals, with the real
Agent on an emulated machine behind it (tests/dbus/harness.py)."""

from __future__ import annotations

import asyncio
import functools
import os
from pathlib import Path

import pytest
from dbus_fast import Variant
from dbus_fast.aio import MessageBus

from luo_agent.client import CallError, call, get_all, get_property
from luo_agent.config import Timeouts
from luo_agent.dbus.names import IFACE_UPDATE, error, update_path
from luo_agent.kernel.device import Abi
from luo_agent.systemd.gate import UnitStatus
from tests.conftest import ABIS
from tests.dbus.harness import AgentHost, SignalLog, client_bus, dbus_host, disconnect, plain

PREPARE_TARGET = "liveupdate-prepare.target"


def memfd_with(data: bytes) -> int:
    fd = os.memfd_create("luo-test", os.MFD_CLOEXEC)
    os.write(fd, data)
    return fd


async def preserve(bus: MessageBus, fd: int, session: str, token: int, **options: Variant) -> None:
    await call(bus, "Preserve", "hsta{sv}", [0, session, token, options], unix_fds=[fd])


async def load_kernel(bus: MessageBus, host: AgentHost, cmdline: str = "console=ttyS0") -> str:
    image = host.workdir / "vmlinuz"
    image.write_bytes(b"emulated kernel image\n" * 64)
    kfd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    nfd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    try:
        (full,) = await call(
            bus,
            "LoadKernel",
            "hhsa{sv}",
            [0, 1, cmdline, {"no-initrd": Variant("b", True)}],
            unix_fds=[kfd, nfd],
        )
    finally:
        os.close(kfd)
        os.close(nfd)
    return str(full)


async def prepared(bus: MessageBus, log: SignalLog, update_id: str) -> None:
    await log.match_manager()
    await log.match_path(update_path(update_id))
    new_id, path = await call(bus, "Prepare", "a{sv}", [{"id": Variant("s", update_id)}])
    assert (new_id, path) == (update_id, update_path(update_id))
    await log.wait_for(lambda: "prepared" in log.phases(update_id))


async def history(bus: MessageBus) -> list[dict[str, object]]:
    (entries,) = await call(bus, "GetHistory", "u", [0])
    return [{k: plain(v.value) for k, v in entry.items()} for entry in entries]


async def expect_error(
    name: str, bus: MessageBus, member: str, sig: str = "", *body: object
) -> str:
    with pytest.raises(CallError) as info:
        await call(bus, member, sig, list(body))
    assert info.value.name == error(name), info.value
    return info.value.text


# ------------------------------------------------------------------------------------- reads


async def test_check_properties_and_empty_lists(client: MessageBus) -> None:
    (report,) = await call(client, "Check")
    values = {k: v.value for k, v in report.items()}
    assert values["ready"] is False
    assert any("LoadKernel" in b for b in values["blockers"])
    assert (values["abi"], values["phase"], values["kernel-loaded"]) == (Abi.SESSION, "idle", False)
    assert values["preserved"] == 0
    props = await get_all(client)
    assert props["Phase"] == "idle"
    assert props["KernelAbi"] == Abi.SESSION
    assert props["CurrentUpdate"] == "" and props["CurrentUpdatePath"] == "/"
    assert props["Progress"] == 0 and props["KernelLoaded"] is False
    assert plain(props["LastResult"]) == ["", "", "", ""]
    assert props["Version"]
    assert plain(await call(client, "ListSessions")) == [[]]
    assert await call(client, "GetHistory", "u", [10]) == [[]]


# --------------------------------------------------------------------- a whole update, by fd


@pytest.mark.parametrize("host", ABIS, indirect=True)
async def test_memfd_survives_the_kexec_and_comes_back_by_retrieve(host: AgentHost) -> None:
    data = os.urandom(256 << 10)
    update_id = f"upd-{host.abi}"
    bus = await client_bus()
    log = SignalLog(bus)
    fd = memfd_with(data)
    try:
        await preserve(bus, fd, "vm-1", 7)
    finally:
        os.close(fd)  # the agent keeps its own duplicate
    assert plain(await call(bus, "ListSessions")) == [[["vm-1", 7, "uid=0", "registered"]]]
    full = await load_kernel(bus, host)
    assert full.startswith("console=ttyS0") and "luo_agent.update=" in full
    assert await get_property(bus, "KernelLoaded") is True
    await prepared(bus, log, update_id)
    assert await get_property(bus, "Phase") == "prepared"
    assert plain(await call(bus, "ListSessions")) == [[["vm-1", 7, "uid=0", "preserved"]]]
    await call(bus, "Execute", "s", [update_id])
    await log.wait_for(lambda: "rebooting" in log.phases(update_id))
    assert log.phases(update_id) == ["preparing", "prepared", "freezing", "rebooting"]
    await disconnect(bus)

    await host.reboot()
    bus = await client_bus()
    log = SignalLog(bus)
    await log.match_manager()
    try:
        props = await get_all(bus)
        assert (props["Phase"], props["CurrentUpdate"]) == ("updated", update_id)
        assert plain(await call(bus, "ListSessions")) == [[["vm-1", 7, "uid=0", "carried"]]]
        (got,) = await call(bus, "Retrieve", "st", ["vm-1", 7])
        try:
            assert os.fstat(got).st_size == len(data)
            assert os.pread(got, len(data), 0) == data
        finally:
            os.close(got)
        assert plain(await call(bus, "ListSessions")) == [[["vm-1", 7, "uid=0", "retrieved"]]]
        await call(bus, "Restore", "s", [update_id])
        await log.wait_for(lambda: "restored" in log.phases(update_id))
        await call(bus, "Finish", "s", [""])  # "" = the current update
        await log.wait_for(lambda: log.ended(update_id))
        (finished,) = log.of("Finished")
        assert finished.body == [update_id, "success", "", ""]
        assert log.phases(update_id) == ["restoring", "restored", "finishing", "idle"]
        (history,) = await call(bus, "GetHistory", "u", [5])
        entry = {k: v.value for k, v in history[-1].items()}
        assert (entry["id"], entry["result"], entry["abi"], entry["boots"]) == (
            update_id,
            "success",
            host.abi,
            1,
        )
        assert {"preparing", "freezing", "restoring"} <= {t[0] for t in entry["timings"]}
        assert entry["blackout-critical"] >= 0
        assert plain(await get_property(bus, "LastResult")) == [update_id, "success", "", ""]
    finally:
        await disconnect(bus)


async def test_retrieve_errors_after_the_reboot(host: AgentHost) -> None:
    bus = await client_bus()
    log = SignalLog(bus)
    fd = memfd_with(b"x" * 4096)
    await preserve(bus, fd, "vm-1", 1)
    os.close(fd)
    await load_kernel(bus, host)
    await prepared(bus, log, "upd-r")
    await call(bus, "Execute", "s", [""])
    await disconnect(bus)
    await host.reboot()
    bus = await client_bus()
    try:
        await expect_error("NoSuchToken", bus, "Retrieve", "st", "vm-1", 2)
        await expect_error("NoSuchSession", bus, "Retrieve", "st", "vm-9", 1)
        await expect_error("InvalidArgument", bus, "Retrieve", "st", "", 1)
        # Fds are handed in before a reboot only.
        fd = memfd_with(b"late")
        try:
            with pytest.raises(CallError) as info:
                await preserve(bus, fd, "vm-2", 1)
        finally:
            os.close(fd)
        assert info.value.name == error("WrongPhase")
        await expect_error("InvalidArgument", bus, "Finish", "s", "not-this-one")
    finally:
        await disconnect(bus)


# --------------------------------------------------------------------------- signals, phases


@pytest.mark.parametrize("host", ABIS, indirect=True)
async def test_race_free_subscription_sees_every_phase_and_property(host: AgentHost) -> None:
    """Subscribe to the Update object's path before it exists (the caller chose the id), then
    Prepare: every phase arrives as PhaseChanged and as PropertiesChanged on both objects."""
    bus = await client_bus()
    log = SignalLog(bus)
    update_id = "race-free-1"
    path = update_path(update_id)
    try:
        await prepared(bus, log, update_id)
        await call(bus, "Cancel", "s", [update_id])
        await log.wait_for(lambda: log.ended(update_id))
        phases = ["preparing", "prepared", "cancelling", "idle"]
        assert log.phases(update_id) == phases
        assert log.changed_props(path, "Phase") == phases
        assert log.changed_props(path, "Result") == ["", "cancelled"]
        assert log.changed_props("/org/luoagent/LiveUpdate1", "Phase") == phases
        assert log.changed_props("/org/luoagent/LiveUpdate1", "CurrentUpdate")[:2] == [
            update_id,
            update_id,
        ]
        assert log.changed_props("/org/luoagent/LiveUpdate1", "CurrentUpdatePath")[-1] == "/"
        (finished,) = log.of("Finished")
        assert finished.body[:3] == [update_id, "cancelled", error("Cancelled")]
        assert plain(log.changed_props("/org/luoagent/LiveUpdate1", "LastResult")[-1])[:2] == [
            update_id,
            "cancelled",
        ]
        update = await get_all(bus, interface=IFACE_UPDATE, path=path)
        assert update["Id"] == update_id
        assert update["Result"] == "cancelled"
        assert update["Progress"] == 100
        assert update["StartedBy"].startswith("uid=0 pid=")
        assert [t[0] for t in update["Timings"]][:3] == ["preparing", "prepared", "cancelling"]
    finally:
        await disconnect(bus)


async def test_update_object_cancel_and_participant_failure(host: AgentHost) -> None:
    bus = await client_bus()
    log = SignalLog(bus)
    try:
        await prepared(bus, log, "by-object")
        await call(bus, "Cancel", interface=IFACE_UPDATE, path=update_path("by-object"))
        await log.wait_for(lambda: bool(log.of("Finished")))
        assert log.of("Finished")[0].body[:2] == ["by-object", "cancelled"]

        # A participant fails the prepare gate: Finished names the error and the unit.
        host.gate.failing[PREPARE_TARGET] = UnitStatus(
            "db.service", "failed", "failed", "exit-code"
        )
        await log.match_path(update_path("fails"))
        await call(bus, "Prepare", "a{sv}", [{"id": Variant("s", "fails")}])
        await log.wait_for(lambda: len(log.of("Finished")) == 2)
        update_id, result, name, message = log.of("Finished")[1].body
        assert (update_id, result, name) == ("fails", "failed", error("ParticipantFailed"))
        assert "db.service" in message
        # Participants (of the last gate) named the culprit while the update was cancelled.
        seen = plain(log.changed_props("/org/luoagent/LiveUpdate1", "Participants"))
        assert [["db.service", "failed", "failed", "exit-code"]] in seen
        errors = log.changed_props(update_path("fails"), "ErrorName")
        assert errors == ["", error("ParticipantFailed")]
    finally:
        await disconnect(bus)


async def test_phase_timeout_is_reported_as_timed_out(
    bus_address: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = dbus_host(tmp_path, Abi.SESSION, timeouts=Timeouts(prepare=0.3))
    await host.boot()
    host.gate.hanging.add(PREPARE_TARGET)
    bus = await client_bus()
    log = SignalLog(bus)
    try:
        await log.match_manager()
        await call(bus, "Prepare", "a{sv}", [{"id": Variant("s", "slow")}])
        await log.wait_for(lambda: bool(log.of("Finished")))
        assert log.of("Finished")[0].body[:3] == ["slow", "failed", error("TimedOut")]
        assert PREPARE_TARGET in host.gate.cancelled
    finally:
        await disconnect(bus)
        await host.close()


# ------------------------------------------------------------------------------ method errors


async def test_wrong_phase_and_argument_errors(host: AgentHost, client: MessageBus) -> None:
    for member in ("Execute", "Finish", "Restore", "Cancel"):
        await expect_error("WrongPhase", client, member, "s", "")
    await expect_error("WrongPhase", client, "Retrieve", "st", "vm-1", 1)
    await expect_error("InvalidArgument", client, "Execute", "s", "no-such-update")
    await expect_error("InvalidArgument", client, "Prepare", "a{sv}", {"id": Variant("s", "a b")})
    await expect_error("InvalidArgument", client, "Prepare", "a{sv}", {"idd": Variant("s", "x")})
    await expect_error("InvalidArgument", client, "Prepare", "a{sv}", {"id": Variant("u", 1)})
    await expect_error("InvalidArgument", client, "Unpreserve", "st", "vm-1", 1)

    log = SignalLog(client)
    await prepared(client, log, "no-kernel")
    text = await expect_error("WrongPhase", client, "Execute", "s", "no-kernel")
    assert "LoadKernel" in text
    await call(client, "Cancel", "s", [""])
    await log.wait_for(lambda: bool(log.of("Finished")))
    # An id names one update for ever: naming an ended one answers with its recorded result.
    text = await expect_error(
        "UpdateEnded", client, "Prepare", "a{sv}", {"id": Variant("s", "no-kernel")}
    )
    assert "cancelled" in text


async def test_a_reused_id_never_starts_a_second_update_nor_removes_a_record(
    host: AgentHost, client: MessageBus
) -> None:
    """Issue 23's scenario: fail-4, fail-5, then Prepare fail-4 again (a retrying orchestration
    tool).  Only the last update's id used to be refused: the retry started a second update and
    its record replaced the first fail-4 in the history."""
    host.gate.failing[PREPARE_TARGET] = UnitStatus("db.service", "failed", "failed", "exit-code")
    log = SignalLog(client)
    await log.match_manager()
    for update_id in ("fail-4", "fail-5"):
        await call(client, "Prepare", "a{sv}", [{"id": Variant("s", update_id)}])
        await log.wait_for(functools.partial(log.ended, update_id))
    before = await history(client)
    assert [h["id"] for h in before] == ["fail-4", "fail-5"]
    del host.gate.failing[PREPARE_TARGET]
    for _ in range(2):  # the same answer every time
        text = await expect_error(
            "UpdateEnded", client, "Prepare", "a{sv}", {"id": Variant("s", "fail-4")}
        )
        assert "fail-4" in text and "failed" in text, text
        assert error("ParticipantFailed") in text and "db.service" in text, text
    assert (await get_all(client))["Phase"] == "idle"
    assert log.phases("fail-4") == ["preparing", "cancelling", "idle"]  # no second update
    assert await history(client) == before

    # An update in progress: the same id answers with that update, as the first call did.
    await log.match_path(update_path("again"))
    first = await call(client, "Prepare", "a{sv}", [{"id": Variant("s", "again")}])
    await log.wait_for(lambda: "prepared" in log.phases("again"))
    second = await call(client, "Prepare", "a{sv}", [{"id": Variant("s", "again")}])
    assert first == second == ["again", update_path("again")]
    assert log.phases("again") == ["preparing", "prepared"]
    # Another id meanwhile is still Busy.
    await expect_error("Busy", client, "Prepare", "a{sv}", {"id": Variant("s", "other")})
    await call(client, "Cancel", "s", ["again"])
    await log.wait_for(lambda: log.ended("again"))
    assert [(h["id"], h["result"]) for h in await history(client)] == [
        ("fail-4", "failed"),
        ("fail-5", "failed"),
        ("again", "cancelled"),
    ]


async def test_preserve_unpreserve_and_duplicates(client: MessageBus) -> None:
    fd = memfd_with(b"abc")
    try:
        await preserve(client, fd, "vm-1", 1)
        with pytest.raises(CallError) as info:
            await preserve(client, fd, "vm-1", 1)
        assert info.value.name == error("AlreadyExists")
        depends = Variant("a(st)", [["vm-1", 1]])
        await preserve(client, fd, "vm-1", 2, **{"depends-on": depends})
        with pytest.raises(CallError) as info:
            await preserve(client, fd, "vm-1", 3, **{"depends-on": Variant("a(st)", [["x", 9]])})
        assert info.value.name == error("InvalidArgument")
    finally:
        os.close(fd)
    rows = (await call(client, "ListSessions"))[0]
    assert [(s, t) for s, t, _, _ in rows] == [("vm-1", 1), ("vm-1", 2)]
    await call(client, "Unpreserve", "st", ["vm-1", 2])
    await call(client, "Unpreserve", "st", ["vm-1", 1])
    assert plain(await call(client, "ListSessions")) == [[]]
    (report,) = await call(client, "Check")
    assert report["preserved"].value == 0


async def test_two_prepares_at_once_one_wins_the_other_is_busy(host: AgentHost) -> None:
    first, second = await client_bus(), await client_bus()
    log = SignalLog(first)
    await log.match_manager()
    try:
        results = await asyncio.gather(
            call(first, "Prepare", "a{sv}", [{"id": Variant("s", "one")}]),
            call(second, "Prepare", "a{sv}", [{"id": Variant("s", "two")}]),
            return_exceptions=True,
        )
        won = [
            (asked, r)
            for asked, r in zip(("one", "two"), results, strict=True)
            if isinstance(r, list)
        ]
        lost = [r for r in results if isinstance(r, CallError)]
        assert len(won) == 1 and len(lost) == 1, results
        assert lost[0].name == error("Busy")
        winner = won[0][0]
        assert won[0][1] == [winner, update_path(winner)]  # the winner got its own update
        assert await get_property(first, "CurrentUpdate") == winner
        await log.wait_for(lambda: "prepared" in log.phases(winner))
        loser = {"one", "two"} - {winner}
        assert not log.phases(loser.pop())
        await call(second, "Cancel", "s", [winner])
        await log.wait_for(lambda: bool(log.of("Finished")))
        (history,) = await call(first, "GetHistory", "u", [10])
        assert [h["id"].value for h in history] == [winner]
    finally:
        await disconnect(first)
        await disconnect(second)


async def test_load_kernel_errors_and_marker(host: AgentHost, client: MessageBus) -> None:
    full = await load_kernel(client, host, "console=ttyS0 luo_agent.update=stale quiet")
    assert full.split() == ["console=ttyS0", "quiet", "luo_agent.update=pending"]
    image = host.workdir / "vmlinuz"
    kfd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with pytest.raises(CallError) as info:
            await call(
                client,
                "LoadKernel",
                "hhsa{sv}",
                [0, 0, "x" * 5000, {}],
                unix_fds=[kfd],
            )
        assert info.value.name == error("InvalidArgument")
        host.machine.inject_fault("kexec_file_load", 1)  # EPERM
        with pytest.raises(CallError) as info:
            await call(
                client,
                "LoadKernel",
                "hhsa{sv}",
                [0, 0, "", {"no-initrd": Variant("b", True)}],
                unix_fds=[kfd],
            )
        assert info.value.name == error("KernelError")
        assert info.value.text.endswith("[errno=1]")
    finally:
        os.close(kfd)
