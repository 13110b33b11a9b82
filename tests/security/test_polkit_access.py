"""Who may do what, on a real system bus (the project's bus policy) with a real polkitd (the
project's actions plus a test rules file): reads are open, every mutating method is refused to an
unprivileged caller, root always works, polkit grants per action, the agent fails closed without
polkit, and a preserved fd is only handed to its owner or to a caller polkit allows."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from luo_agent.dbus.names import BUS_NAME, IFACE_MANAGER, IFACE_UPDATE, error, update_path
from luo_agent.kernel.emulator import EmulatedMachine
from tests.agent_host import AgentProcess
from tests.security.conftest import get, needs_root_namespaces, wait_phase
from tests.security.harness import (
    NOBODY,
    PARTICIPANT_UID,
    RESTORE_HELPER_UID,
    PolkitNamespace,
)
from tests.security.wire import perform_all

pytestmark = needs_root_namespaces

NOT_AUTHORIZED = error("NotAuthorized")
ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"


def call(member: str, signature: str = "", *body: Any, **extra: Any) -> dict[str, Any]:
    return {"member": member, "signature": signature, "body": list(body), **extra}


def memfd(data: str = "") -> dict[str, str]:
    return {"$fd": "memfd", "data": data}


READS = [
    get("Phase"),
    {
        "interface": "org.freedesktop.DBus.Properties",
        "member": "GetAll",
        "signature": "s",
        "body": [IFACE_MANAGER],
    },
    {"interface": "org.freedesktop.DBus.Introspectable", "member": "Introspect"},
    {"interface": "org.freedesktop.DBus.Peer", "member": "Ping"},
    call("Check"),
    call("ListSessions"),
    call("GetHistory", "u", 10),
]

# Every mutating method with well-formed arguments.
MUTATIONS = {
    "Prepare": call("Prepare", "a{sv}", {}),
    "Execute": call("Execute", "s", ""),
    "Cancel": call("Cancel", "s", ""),
    "Finish": call("Finish", "s", ""),
    "Restore": call("Restore", "s", ""),
    "LoadKernel": call(
        "LoadKernel", "hhsa{sv}", {"$fd": "regular"}, {"$fd": "regular"}, "quiet", {}
    ),
    "Preserve": call("Preserve", "hsta{sv}", memfd("x"), "app", 1, {}),
    "Unpreserve": call("Unpreserve", "st", "app", 1),
    "Retrieve": call("Retrieve", "st", "app", 1),
}


@pytest.fixture
def agent(
    polkit_ns: PolkitNamespace, tmp_path: Path, machine: EmulatedMachine
) -> Iterator[AgentProcess]:
    process = polkit_ns.start_agent(tmp_path / "agent", machine, config="auto_finish = false\n")
    try:
        yield process
    finally:
        process.stop()


def errors(results: list[dict[str, Any]]) -> list[str]:
    return [r["error"] for r in results]


def test_unprivileged_caller_reads_status(polkit_ns: PolkitNamespace, agent: AgentProcess) -> None:
    results = polkit_ns.call_as(NOBODY, READS)
    assert errors(results) == [""] * len(READS), results
    assert results[0]["body"] == [{"$variant": ["s", "idle"]}]
    assert "org.luoagent.LiveUpdate1.Manager" in results[2]["body"][0]


def test_unprivileged_caller_cannot_mutate(polkit_ns: PolkitNamespace, agent: AgentProcess) -> None:
    results = polkit_ns.call_as(NOBODY, list(MUTATIONS.values()))
    refused = dict(zip(MUTATIONS, errors(results), strict=True))
    assert refused == dict.fromkeys(MUTATIONS, NOT_AUTHORIZED), results
    # The agent asked polkit about each and changed nothing.
    after = polkit_ns.call_as(NOBODY, [get("Phase"), get("KernelLoaded"), call("ListSessions")])
    assert [r["body"] for r in after] == [
        [{"$variant": ["s", "idle"]}],
        [{"$variant": ["b", False]}],
        [[]],
    ]


def test_authorisation_comes_before_options_and_errors_are_bounded(
    polkit_ns: PolkitNamespace, agent: AgentProcess
) -> None:
    huge = {"k" * (1 << 20): {"$variant": ["b", True]}}
    results = polkit_ns.call_as(
        NOBODY,
        [
            call("Prepare", "a{sv}", huge),
            call("Preserve", "hsta{sv}", memfd("x"), "app", 1, huge),
            call("LoadKernel", "hhsa{sv}", {"$fd": "regular"}, {"$fd": "regular"}, "", huge),
            call("Retrieve", "st", "no-such-session", 5),
        ],
    )
    # Refused for who the caller is, before its options are looked at.
    assert errors(results) == [NOT_AUTHORIZED] * 4, [r["error"] for r in results]
    assert all(len(r["message"]) < 200 for r in results), [len(r["message"]) for r in results]
    # The fd does not exist: the refusal says so, not that someone else owns it.
    assert "'no-such-session'/5 is not carried" in results[3]["message"], results[3]
    assert "k" * 100 not in agent.log_text()


def test_bus_policy_denies_what_the_agent_does_not_serve(
    polkit_ns: PolkitNamespace, agent: AgentProcess
) -> None:
    results = polkit_ns.call_as(
        NOBODY,
        [
            # Writable properties do not exist; the bus refuses Set outright.
            {
                "interface": "org.freedesktop.DBus.Properties",
                "member": "Set",
                "signature": "ssv",
                "body": [IFACE_MANAGER, "Phase", {"$variant": ["s", "idle"]}],
            },
            call("NoSuchMethod"),
            call("Ping", interface="org.luoagent.LiveUpdate1.Debug"),
            {"op": "request_name", "name": BUS_NAME},
            {"op": "request_name", "name": "org.luoagent.LiveUpdate1.Fake"},
        ],
    )
    assert errors(results) == [ACCESS_DENIED] * 5, results


def test_a_service_user_cannot_own_the_agent_name(
    polkit_ns: PolkitNamespace, agent: AgentProcess
) -> None:
    # Even a uid polkit trusts for some actions (the bus policy is about uid 0 only).
    (result,) = polkit_ns.call_as(PARTICIPANT_UID, [{"op": "request_name", "name": BUS_NAME}])
    assert result["error"] == ACCESS_DENIED


async def test_root_may_do_everything_and_is_recorded(
    polkit_ns: PolkitNamespace, agent: AgentProcess
) -> None:
    results = await perform_all(
        polkit_ns.address,
        [
            call("LoadKernel", "hhsa{sv}", {"$fd": "regular"}, {"$fd": "regular"}, "quiet", {}),
            call("Preserve", "hsta{sv}", memfd("root data"), "app", 1, {}),
            call("ListSessions"),
            call("Unpreserve", "st", "app", 1),
            call("Prepare", "a{sv}", {"id": {"$variant": ["s", "root-1"]}}),
        ],
    )
    assert errors(results) == [""] * 5, results
    assert results[2]["body"] == [[["app", 1, "uid=0", "registered"]]]
    await wait_phase(polkit_ns.address, "prepared")
    update_cancel = {"path": update_path("root-1"), "interface": IFACE_UPDATE, "member": "Cancel"}
    (stranger,) = polkit_ns.call_as(NOBODY, [update_cancel])
    assert stranger["error"] == NOT_AUTHORIZED
    started_by = await perform_all(
        polkit_ns.address,
        [
            {
                "path": update_path("root-1"),
                "interface": "org.freedesktop.DBus.Properties",
                "member": "Get",
                "signature": "ss",
                "body": [IFACE_UPDATE, "StartedBy"],
            },
            update_cancel,
        ],
    )
    assert errors(started_by) == ["", ""], started_by
    assert started_by[0]["body"][0]["$variant"][1].startswith(f"uid=0 pid={os.getpid()} ")
    await wait_phase(polkit_ns.address, "idle")
    (history,) = await perform_all(polkit_ns.address, [call("GetHistory", "u", 10)])
    (entry,) = history["body"][0]
    assert entry["id"]["$variant"][1] == "root-1"
    assert entry["result"]["$variant"][1] == "cancelled"
    assert entry["started-by"]["$variant"][1].startswith(f"uid=0 pid={os.getpid()} ")


async def test_polkit_grants_per_action_and_the_caller_is_recorded(
    polkit_ns: PolkitNamespace, agent: AgentProcess
) -> None:
    """The test rules let uid 1 prepare, preserve and cancel, nothing else."""
    results = polkit_ns.call_as(
        PARTICIPANT_UID,
        [
            {"op": "whoami"},
            MUTATIONS["Preserve"],
            MUTATIONS["LoadKernel"],
            call("Prepare", "a{sv}", {"id": {"$variant": ["s", "by-uid-1"]}}),
            MUTATIONS["Execute"],
            MUTATIONS["Finish"],
        ],
    )
    assert errors(results) == ["", "", NOT_AUTHORIZED, "", NOT_AUTHORIZED, NOT_AUTHORIZED]
    caller_pid = results[0]["body"][0]
    await wait_phase(polkit_ns.address, "prepared")
    (cancel,) = polkit_ns.call_as(PARTICIPANT_UID, [MUTATIONS["Cancel"]])
    assert cancel["error"] == ""
    await wait_phase(polkit_ns.address, "idle")
    (history,) = await perform_all(polkit_ns.address, [call("GetHistory", "u", 10)])
    (entry,) = history["body"][0]
    assert entry["started-by"]["$variant"][1].startswith(f"uid={PARTICIPANT_UID} pid={caller_pid} ")
    (sessions,) = await perform_all(polkit_ns.address, [call("ListSessions")])
    assert sessions["body"] == [[]]  # the cancelled update released the handed-in fd


async def test_without_polkit_only_root_is_served(
    polkit_ns: PolkitNamespace, agent: AgentProcess
) -> None:
    polkit_ns.stop_polkitd()
    try:
        refused = polkit_ns.call_as(PARTICIPANT_UID, [MUTATIONS["Preserve"], call("Check")])
        assert errors(refused) == [NOT_AUTHORIZED, ""], refused  # fail closed; reads still work
        root = await perform_all(polkit_ns.address, [MUTATIONS["Preserve"]])
        assert errors(root) == [""], root
    finally:
        polkit_ns.start_polkitd()
    (again,) = polkit_ns.call_as(
        PARTICIPANT_UID, [call("Preserve", "hsta{sv}", memfd(), "app", 2, {})]
    )
    assert again["error"] == ""


async def test_preserved_fds_go_back_to_their_owner_or_an_authorised_caller(
    polkit_ns: PolkitNamespace, agent: AgentProcess, machine: EmulatedMachine, tmp_path: Path
) -> None:
    """uid 1 hands three memfds in; after a live update its own fd comes back to it, nobody is
    refused, the polkit-authorised restore helper and root may read the others."""
    handed = polkit_ns.call_as(
        PARTICIPANT_UID,
        [call("Preserve", "hsta{sv}", memfd(f"secret {t}"), "app", t, {}) for t in (1, 2, 3)],
    )
    assert errors(handed) == ["", "", ""], handed
    started = await perform_all(
        polkit_ns.address,
        [
            MUTATIONS["LoadKernel"],
            call("Prepare", "a{sv}", {"id": {"$variant": ["s", "carry-1"]}}),
        ],
    )
    assert errors(started) == ["", ""], started
    await wait_phase(polkit_ns.address, "prepared")
    (execute,) = await perform_all(polkit_ns.address, [call("Execute", "s", "carry-1")])
    assert execute["error"] == ""
    assert agent.wait_exit() == 0  # the agent ends itself after the kexec
    machine.wait_down()
    machine.boot()
    agent = polkit_ns.start_agent(tmp_path / "agent", machine, config="auto_finish = false\n")
    try:
        await wait_phase(polkit_ns.address, "restored")
        listed = polkit_ns.call_as(NOBODY, [call("ListSessions")])[0]["body"][0]
        assert sorted(listed) == [
            ["app", t, f"uid={PARTICIPANT_UID}", "carried"] for t in (1, 2, 3)
        ]

        own = polkit_ns.call_as(PARTICIPANT_UID, [call("Retrieve", "st", "app", 1)])
        stranger = polkit_ns.call_as(NOBODY, [call("Retrieve", "st", "app", 2)])
        helper = polkit_ns.call_as(RESTORE_HELPER_UID, [call("Retrieve", "st", "app", 3)])
        root = await perform_all(polkit_ns.address, [call("Retrieve", "st", "app", 2)])
        assert own[0]["body"] == [{"$data": "secret 1"}], own
        assert stranger[0]["error"] == NOT_AUTHORIZED, stranger
        assert "another user" in stranger[0]["message"]
        assert helper[0]["body"] == [{"$data": "secret 3"}], helper
        assert root[0]["body"] == [{"$data": "secret 2"}], root
        (finish,) = await perform_all(polkit_ns.address, [call("Finish", "s", "carry-1")])
        assert finish["error"] == ""
        await wait_phase(polkit_ns.address, "idle")
    finally:
        agent.stop()


async def test_a_participant_cannot_take_back_another_users_fd(
    polkit_ns: PolkitNamespace, agent: AgentProcess
) -> None:
    (root,) = await perform_all(
        polkit_ns.address, [call("Preserve", "hsta{sv}", memfd(), "shared", 7, {})]
    )
    assert root["error"] == ""
    results = polkit_ns.call_as(
        PARTICIPANT_UID,
        [
            call("Unpreserve", "st", "shared", 7),
            call("Preserve", "hsta{sv}", memfd(), "shared", 8, {}),
            call("Unpreserve", "st", "shared", 8),
        ],
    )
    assert errors(results) == [NOT_AUTHORIZED, "", ""], results
    assert "another user" in results[0]["message"]
    (listed,) = await perform_all(polkit_ns.address, [call("ListSessions")])
    assert listed["body"] == [[["shared", 7, "uid=0", "registered"]]]


async def test_concurrent_callers_are_told_apart(
    polkit_ns: PolkitNamespace, agent: AgentProcess
) -> None:
    """The caller's identity travels with each call: an unprivileged caller racing root never
    borrows root's identity, and root is never refused."""
    count = 20
    stranger = asyncio.create_task(
        asyncio.to_thread(
            polkit_ns.call_as,
            NOBODY,
            [call("Preserve", "hsta{sv}", memfd(), "stranger", t, {}) for t in range(count)],
        )
    )
    root = await perform_all(
        polkit_ns.address,
        [call("Preserve", "hsta{sv}", memfd(), "root", t, {}) for t in range(count)],
    )
    refused = await stranger
    assert errors(root) == [""] * count, root
    assert errors(refused) == [NOT_AUTHORIZED] * count, refused
    (listed,) = await perform_all(polkit_ns.address, [call("ListSessions")])
    assert sorted(listed["body"][0]) == [["root", t, "uid=0", "registered"] for t in range(count)]
