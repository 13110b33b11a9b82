"""PystemdGate against a real systemd 252 user manager (luo_agent.sandbox)."""

from __future__ import annotations

import asyncio
import time

import pytest

from luo_agent.errors import GateError
from luo_agent.sandbox import Sandbox
from luo_agent.systemd.gate import JobResult, UnitStatus
from luo_agent.systemd.pystemd_gate import PystemdGate

from .conftest import needs_sandbox

pytestmark = [pytest.mark.systemd, pytest.mark.root, needs_sandbox]

GOOD = """[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/true
"""
PHASE_OK = """[Unit]
Requires=good.service
After=good.service
"""
# Participants hook in the way the design asks of them: RequiredBy= + Before=.
BAD = """[Unit]
Before=phase-fail.target
[Service]
Type=oneshot
ExecStart=/bin/false
[Install]
RequiredBy=phase-fail.target
"""
HANG = """[Unit]
Before=phase-hang.target
[Service]
Type=oneshot
TimeoutStartSec=infinity
ExecStart=/bin/sleep infinity
[Install]
RequiredBy=phase-hang.target
"""
# An empty unit file means "masked" to systemd, hence a description.
PLAIN_TARGET = """[Unit]
Description=test target
"""
PHASE_ASSERT = """[Unit]
AssertPathExists=/run/luo-agent/active/prepare
"""


def _active_state(sandbox: Sandbox, unit: str) -> str:
    return sandbox.systemctl("is-active", unit, check=False).stdout.strip()


async def test_target_requiring_succeeding_oneshot_is_ok(
    sandbox: Sandbox, gate: PystemdGate
) -> None:
    sandbox.write_units({"good.service": GOOD, "phase-ok.target": PHASE_OK})

    outcome = await gate.run_target("phase-ok.target")

    assert outcome.ok
    assert outcome.job_result is JobResult.DONE
    assert outcome.culprits == ()
    assert _active_state(sandbox, "phase-ok.target") == "active"
    assert await gate.unit_statuses("phase-ok.target") == (
        UnitStatus("good.service", "active", "exited", "success"),
    )
    # Starting an already active target is done again, not an error.
    assert (await gate.run_target("phase-ok.target")).ok


async def test_failing_participant_makes_the_job_end_dependency(
    sandbox: Sandbox, gate: PystemdGate
) -> None:
    sandbox.write_units({"bad.service": BAD, "phase-fail.target": PLAIN_TARGET})
    sandbox.systemctl("enable", "--runtime", "bad.service")

    outcome = await gate.run_target("phase-fail.target")

    assert not outcome.ok
    assert outcome.job_result is JobResult.DEPENDENCY
    assert outcome.culprits == (UnitStatus("bad.service", "failed", "failed", "exit-code"),)
    assert _active_state(sandbox, "phase-fail.target") == "inactive"


async def test_caller_timeout_cancels_the_job_in_systemd(
    sandbox: Sandbox, gate: PystemdGate
) -> None:
    sandbox.write_units({"hang.service": HANG, "phase-hang.target": PLAIN_TARGET})
    sandbox.systemctl("enable", "--runtime", "hang.service")

    with pytest.raises(TimeoutError):
        async with asyncio.timeout(1.0):
            await gate.run_target("phase-hang.target")

    # run_target returned only after the jobs were cancelled: none is left in the manager.
    assert sandbox.systemctl("list-jobs", "--no-legend").stdout.strip() == ""
    statuses = await gate.unit_statuses("phase-hang.target")
    assert statuses == (UnitStatus("hang.service", "activating", "start", "success"),)
    assert [s.unit for s in statuses if s.is_failure] == ["hang.service"]
    await gate.stop_unit("hang.service")
    # Stopping a oneshot in "activating" kills its start: it ends failed (result "signal").
    assert await gate.unit_statuses("phase-hang.target") == (
        UnitStatus("hang.service", "failed", "failed", "signal"),
    )


async def test_assert_on_missing_path_fails_the_target_job(
    sandbox: Sandbox, gate: PystemdGate
) -> None:
    sandbox.write_units({"phase-assert.target": PHASE_ASSERT})

    outcome = await gate.run_target("phase-assert.target")

    # systemd 252 ends the job with result "assert"; the target has no participants.
    assert outcome.job_result is JobResult.ASSERT
    assert outcome.culprits == ()
    assert _active_state(sandbox, "phase-assert.target") == "inactive"


async def test_event_loop_keeps_running_while_a_gate_waits(
    sandbox: Sandbox, gate: PystemdGate
) -> None:
    sandbox.write_units({"hang.service": HANG, "phase-hang.target": PLAIN_TARGET})
    sandbox.systemctl("enable", "--runtime", "hang.service")
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    tick_task = asyncio.create_task(ticker())
    try:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1.0):
                await gate.run_target("phase-hang.target")
    finally:
        tick_task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await tick_task
    assert len(gaps) >= 20  # ~1 s of 10 ms ticks, generously
    assert max(gaps) < 0.25


async def test_stop_unit_waits_for_the_stop_job(sandbox: Sandbox, gate: PystemdGate) -> None:
    sandbox.write_units({"good.service": GOOD, "phase-ok.target": PHASE_OK})
    assert (await gate.run_target("phase-ok.target")).ok

    await gate.stop_unit("good.service")

    assert _active_state(sandbox, "good.service") == "inactive"
    # Requires= propagates the stop to the target.
    assert _active_state(sandbox, "phase-ok.target") == "inactive"


async def test_unknown_target_raises_gate_error(gate: PystemdGate) -> None:
    with pytest.raises(GateError, match=r"no-such\.target"):
        await gate.run_target("no-such.target")


async def test_queued_is_called_once_the_job_is_queued(sandbox: Sandbox, gate: PystemdGate) -> None:
    # A participant that waits for a file: the job is queued, and still running, when
    # ``queued`` is called; the gate's outcome comes only after the file appears.
    waiting = sandbox.path_inside("/run/luo-test-go")
    sandbox.write_units(
        {
            "waits.service": "[Service]\nType=oneshot\nRemainAfterExit=yes\n"
            "ExecStart=/bin/sh -c 'while [ ! -e /run/luo-test-go ]; do sleep 0.05; done'\n",
            "phase-wait.target": "[Unit]\nRequires=waits.service\nAfter=waits.service\n",
        }
    )
    seen: list[str] = []

    def queued() -> None:
        seen.append(_active_state(sandbox, "waits.service"))
        waiting.touch()

    outcome = await asyncio.wait_for(gate.run_target("phase-wait.target", queued), 30)

    assert outcome.ok
    assert seen in (["activating"], ["inactive"])  # queued (maybe not yet started), not done
    refused: list[str] = []
    with pytest.raises(GateError):
        await gate.run_target("no-such.target", lambda: refused.append("queued"))
    assert refused == []  # no job, no call


async def test_reload_picks_up_new_units(sandbox: Sandbox, gate: PystemdGate) -> None:
    unit_dir = sandbox.path_inside("/run/user/0/systemd/user")
    (unit_dir / "good.service").write_text(GOOD)
    (unit_dir / "late.target").write_text(PHASE_OK)

    await gate.reload()

    assert (await gate.run_target("late.target")).ok


async def test_manager_version_and_kexec_refused_by_user_manager(gate: PystemdGate) -> None:
    version = await gate.manager_version()
    assert version.split(".")[0].isdigit()
    assert int(version.split(".")[0]) >= 252
    with pytest.raises(GateError, match=r"kexec\.target"):
        await gate.kexec()  # a user manager has no kexec.target


# A user manager has no real kexec.target: stand-ins show which job kexec() queues and how it
# treats the job's end.
KEXEC_STAND_IN = """[Unit]
Description=stand-in kexec.target
Requires={dep}
After={dep}
"""
FAILING = """[Service]
Type=oneshot
ExecStart=/bin/false
"""
SLOW = """[Service]
Type=oneshot
TimeoutStartSec=infinity
ExecStart=/bin/sleep infinity
"""


async def test_kexec_starts_kexec_target_and_waits_for_its_job(
    sandbox: Sandbox, gate: PystemdGate
) -> None:
    sandbox.write_units(
        {"good.service": GOOD, "kexec.target": KEXEC_STAND_IN.format(dep="good.service")}
    )
    await gate.kexec()
    assert _active_state(sandbox, "kexec.target") == "active"

    sandbox.write_units(
        {"failing.service": FAILING, "kexec.target": KEXEC_STAND_IN.format(dep="failing.service")}
    )
    sandbox.systemctl("stop", "kexec.target")
    with pytest.raises(GateError, match=r"kexec\.target job ended dependency"):
        await gate.kexec()


async def test_cancelling_the_kexec_wait_leaves_the_job_queued(
    sandbox: Sandbox, gate: PystemdGate
) -> None:
    """PID 1 stops the agent on the way to the kexec: that must not cancel the kexec."""
    sandbox.write_units(
        {"slow.service": SLOW, "kexec.target": KEXEC_STAND_IN.format(dep="slow.service")}
    )
    async with await gate.watch_shutdown_jobs() as watch:
        waiting = asyncio.create_task(gate.kexec())
        async with asyncio.timeout(10):
            assert await anext(watch) == "kexec.target"
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await asyncio.sleep(0.2)  # a cancel, had it been sent, is processed by now
    jobs = sandbox.systemctl("list-jobs", "--no-legend").stdout
    assert "kexec.target" in jobs and "slow.service" in jobs
    sandbox.systemctl("cancel")  # an irreversible job is not replaced by a stop job


async def test_closing_the_gate_during_the_kexec_wait_is_no_refusal(
    sandbox: Sandbox, gate: PystemdGate
) -> None:
    """The agent's stop (PID 1 stopping it for kexec.target) closes the gate under the wait: the
    wait ends without an error, so the sessions stay in the fd store, and the job stays queued."""
    sandbox.write_units(
        {"slow.service": SLOW, "kexec.target": KEXEC_STAND_IN.format(dep="slow.service")}
    )
    async with await gate.watch_shutdown_jobs() as watch:
        waiting = asyncio.create_task(gate.kexec())
        async with asyncio.timeout(10):
            assert await anext(watch) == "kexec.target"
    await gate.close()
    async with asyncio.timeout(10):
        await waiting  # returns: no GateError
    jobs = sandbox.systemctl("list-jobs", "--no-legend").stdout
    assert "kexec.target" in jobs and "slow.service" in jobs
    sandbox.systemctl("cancel")


async def test_fd_store_fill_reads_the_services_counters(
    sandbox: Sandbox, gate: PystemdGate
) -> None:
    sandbox.write_units(
        {"store.service": "[Service]\nExecStart=/bin/sleep infinity\nFileDescriptorStoreMax=7\n"}
    )
    sandbox.systemctl("start", "store.service")
    assert await gate.fd_store_fill("store.service") == (0, 7)
    with pytest.raises(GateError, match=r"GetUnitByPID failed.*not belong to any loaded unit"):
        await gate.fd_store_fill()  # this test process is no unit of the sandbox's manager


async def test_watch_shutdown_jobs_reports_only_shutdown_targets(
    sandbox: Sandbox, gate: PystemdGate
) -> None:
    # A user manager has no real reboot.target: a plain one stands in, to see PID 1's JobNew.
    sandbox.write_units({"reboot.target": PLAIN_TARGET, "other.target": PLAIN_TARGET})
    async with await gate.watch_shutdown_jobs() as watch:
        sandbox.systemctl("start", "other.target")
        sandbox.systemctl("start", "reboot.target")
        async with asyncio.timeout(10):
            first = await anext(watch)
    assert first == "reboot.target"


async def test_close_fails_pending_jobs_and_ends_watches(
    sandbox: Sandbox, gate: PystemdGate
) -> None:
    sandbox.write_units({"hang.service": HANG, "phase-hang.target": PLAIN_TARGET})
    sandbox.systemctl("enable", "--runtime", "hang.service")
    # The JobNew watch doubles as the signal that the target's job is queued.
    watch = await gate.watch_shutdown_jobs({"phase-hang.target"})
    pending = asyncio.create_task(gate.run_target("phase-hang.target"))
    async with asyncio.timeout(10):
        assert await anext(watch) == "phase-hang.target"

    await gate.close()

    with pytest.raises(GateError, match="gate closed"):
        await pending
    assert [unit async for unit in watch] == []  # the watch ended
    with pytest.raises(GateError, match="gate closed"):
        await gate.unit_statuses("phase-hang.target")


async def test_user_mode_finds_the_manager_through_the_session_bus_variable(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", sandbox.bus_address)
    async with PystemdGate(user_mode=True) as gate:
        assert (await gate.manager_version()).startswith("2")
