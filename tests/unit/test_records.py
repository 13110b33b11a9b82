"""UpdateRecord's phase timings."""

from __future__ import annotations

from luo_agent.kernel.device import Abi
from luo_agent.records import UpdateRecord


def test_a_phase_within_one_boot_is_timed_by_the_monotonic_clock() -> None:
    record = UpdateRecord("u", Abi.SESSION).with_phase("preparing", now=1000.0, mono=50.0)
    record = record.with_phase("prepared", now=1000.9, mono=51.5)  # the wall clock was stepped
    assert record.timings[0].duration == 1.5
    assert record.timings[1].duration is None  # still open


def test_a_phase_across_the_kexec_is_timed_by_the_wall_clock() -> None:
    # Seen on the real kernel (tests/vm/test_whole_update.py): the new boot's monotonic clock
    # starts again, so end minus start of "rebooting" was meaningless (47.9 s for 121.9 s).
    record = UpdateRecord("u", Abi.SESSION).with_phase("rebooting", now=1000.0, mono=71.7)
    record = record.with_phase("updated", now=1121.9, mono=119.6, new_boot=True)
    (rebooting, updated) = record.timings
    assert rebooting.duration is not None and abs(rebooting.duration - 121.9) < 1e-6
    assert updated.monotonic_start == 119.6 and updated.duration is None
    assert UpdateRecord.from_json(record.to_json()).timings[0].duration == rebooting.duration
