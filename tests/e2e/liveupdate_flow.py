"""Helpers of the end-to-end tests: everything goes through the public interfaces (liveupdatectl,
systemctl) inside the sandbox, and through ``EmulatedMachine.inspect()`` for the kernel's view."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from typing import Any, TypeVar

from luo_agent.sandbox import Sandbox
from luo_agent.testbed import Testbed

T = TypeVar("T")

POLL_INTERVAL = 0.1
FAST = 30.0  # seconds: generous deadlines for steps that take well under a second here


def wait_until(what: str, probe: Callable[[], T | None], timeout: float = FAST) -> T:
    """Poll ``probe`` (at most every 0.1 s) until it returns something other than None/False."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(POLL_INTERVAL)


def ctl_json(bed: Testbed, box: Sandbox, *args: str) -> dict[str, Any]:
    """``liveupdatectl --json ARGS`` inside the sandbox (what ``Testbed.ctl`` runs): its final
    document, a result or an error (events stream before it)."""
    proc = box.run(
        [bed.python, "-m", "luo_agent.cli", "--session-bus", "--json", *args], check=False
    )
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    document: dict[str, Any] = json.loads(lines[-1]) if lines else {}
    assert document.get("type") in ("result", "error"), (
        f"liveupdatectl {' '.join(args)} exited {proc.returncode} without a result:\n"
        f"{proc.stdout}\n{proc.stderr}"
    )
    return document


def status(bed: Testbed, box: Sandbox) -> dict[str, Any]:
    """The agent's properties, or {} while it is not on the bus (e.g. restarting)."""
    document = ctl_json(bed, box, "status")
    props: dict[str, Any] = document.get("status", {})
    return props


def wait_update_ended(bed: Testbed, box: Sandbox, update_id: str) -> dict[str, Any]:
    """Wait until the agent is idle with ``update_id`` as LastResult; return its history entry."""

    def ended() -> dict[str, Any] | None:
        props = status(bed, box)
        if props.get("Phase") == "idle" and props.get("LastResult", [""])[0] == update_id:
            return props
        return None

    props = wait_until(f"update {update_id} to end", ended)
    entry = history_entry(bed, box, update_id)
    # LastResult and the history say the same thing.
    assert props["LastResult"] == [
        entry["id"],
        entry["result"],
        entry["error-name"],
        entry["message"],
    ]
    return entry


def history_entry(bed: Testbed, box: Sandbox, update_id: str) -> dict[str, Any]:
    entries = [e for e in ctl_json(bed, box, "history")["history"] if e["id"] == update_id]
    assert len(entries) == 1, f"expected one history entry for {update_id}: {entries}"
    return dict(entries[0])


def main_pid(box: Sandbox, unit: str) -> int:
    out = box.systemctl("show", "--property=MainPID", "--value", unit).stdout
    return int(out.strip() or 0)


def unit_property(box: Sandbox, unit: str, prop: str) -> str:
    return str(box.systemctl("show", f"--property={prop}", "--value", unit).stdout.strip())


def participant(target: str, command: str, description: str) -> str:
    """A phase participant as docs/participants.md asks for: RequiredBy= + Before= the phase
    target (so its failure fails the gate) and PartOf= it (so it is reset with the gate)."""
    return (
        "[Unit]\n"
        f"Description={description}\n"
        "DefaultDependencies=no\n"
        f"Before={target}\n"
        f"PartOf={target}\n"
        "[Service]\n"
        "Type=oneshot\n"
        f"ExecStart={command}\n"
        "[Install]\n"
        f"RequiredBy={target}\n"
    )


def kernel_is_clean(machine_view: dict[str, Any]) -> bool:
    """The emulated kernel holds nothing for an outgoing update: no outgoing session (session
    ABI), or the global state normal with no preserved file (rfc-v2, v3)."""
    if machine_view["generation"] == "session":
        return not machine_view["outgoing_sessions"]
    return machine_view["state"] == "normal" and not machine_view["files"]


def expected_data(bed: Testbed) -> dict[str, Any]:
    """What the example participant recorded about its memfd when it handed it in."""
    expected: dict[str, Any] = json.loads((bed.example_state / "expected.json").read_text())
    assert expected["size"] == bed.size
    return expected


def restore_and_verify(bed: Testbed, update_id: str, expected: dict[str, Any]) -> None:
    """Second boot over the machine state the kexec left: the agent finds the update in the
    kernel, runs restore (the example participant retrieves and checks its memfd) and finish.
    ``expected`` is ``expected_data`` read before the kexec."""
    with contextlib.ExitStack() as second_boot:
        box = bed.boot_sandbox(second_boot)
        entry = wait_update_ended(bed, box, update_id)
        assert entry["result"] == "success", entry
        assert entry["boots"] == 1
        phases = [t[0] for t in entry["timings"]]
        for phase in ("preparing", "prepared", "freezing", "rebooting", "updated", "restoring"):
            assert phase in phases, phases
        assert phases[-2:] == ["finishing", "idle"]
        assert entry["blackout-critical"] >= 0
        # The restore participant ran in this boot and verified every byte it retrieved.
        assert unit_property(box, "luo-example-restore.service", "Result") == "success"
        verify = json.loads((bed.example_state / "last-restore.json").read_text())
        assert verify["verified"] is True
        assert verify["got"] == expected == verify["expected"]
        # Finished in the kernel too: nothing carried or outgoing is left.
        view = bed.machine.inspect()
        assert view["liveupdate_count"] == 1
        if view["generation"] == "session":
            assert view["incoming_sessions"] == [] and view["outgoing_sessions"] == []
        else:
            assert view["state"] == "normal" and view["incoming_files"] == []
        assert kernel_is_clean(view)
        assert status(bed, box)["CurrentUpdate"] == ""
