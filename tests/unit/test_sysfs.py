"""luo_agent.sysfs on real kernel files and on the emulated kernel's state file.

The POLLPRI path needs a kernel file with the sysfs poll protocol whose value a test may change:
``/proc/self/mounts`` in a private mount namespace and ``/proc/sys/kernel/hostname`` in a private
UTS namespace.  The watcher runs in a child process inside the namespace; the test changes the
namespace from outside (nsenter) and reads what the child reports.  "No polling" is checked on the
child's context switches while nothing changes: a process blocked in epoll_wait makes none.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from luo_agent.errors import LuoError
from luo_agent.kernel.device import Abi, GlobalEvent
from luo_agent.kernel.emulator import EmulatedMachine
from luo_agent.kernel.rfc_v2 import RfcV2Device
from luo_agent.kernel.v3 import V3Device
from luo_agent.sysfs import Mechanism, mechanism_for, watch_state

ROOT = Path(__file__).resolve().parents[2]
STEP = 5.0  # seconds any single notification may take (they take milliseconds)

CHILD = """
import asyncio, json, sys
from luo_agent.sysfs import watch_state

async def main() -> None:
    async with watch_state(sys.argv[1]) as states:
        print(json.dumps({"mechanism": states.mechanism}), flush=True)
        async for value in states:
            print(json.dumps({"value": value}), flush=True)

asyncio.run(main())
"""


def _namespaces_usable(flag: str) -> str | None:
    if os.geteuid() != 0:
        return "needs root (namespaces, mount)"
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        return "util-linux unshare/nsenter not installed"
    probe = subprocess.run(["unshare", flag, "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        return f"unshare {flag} refused: {probe.stderr.decode().strip()}"
    return None


class Child:
    """The watcher in a child process: one JSON line per report on stdout."""

    def __init__(self, unshare: list[str], path: str) -> None:
        self.proc = subprocess.Popen(
            [*unshare, sys.executable, "-c", CHILD, path],
            stdout=subprocess.PIPE,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        self._fd = self.proc.stdout.fileno()
        self._buffer = b""
        # unshare execs the interpreter: the pid is the watcher's.
        assert self.line(STEP) == {"mechanism": "pollpri"}

    def line(self, timeout: float) -> dict[str, str] | None:
        """The next report, or None if none arrives within ``timeout``."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._fd], [], [], left)[0]:
                return None
            chunk = os.read(self._fd, 1 << 16)
            if not chunk:
                raise AssertionError(f"watcher exited with {self.proc.wait()}")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\n", 1)
        value: dict[str, str] = json.loads(raw)
        return value

    def value(self) -> str:
        report = self.line(STEP)
        assert report is not None, f"no report within {STEP}s"
        return report["value"]

    def context_switches(self) -> int:
        total = 0
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            for line in (task / "status").read_text().splitlines():
                if "ctxt_switches:" in line:  # voluntary and nonvoluntary
                    total += int(line.split()[1])
        return total

    def cpu_ticks(self) -> int:
        """utime + stime of the watcher, in clock ticks (proc(5) stat fields 14 and 15)."""
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])

    def nsenter(self, option: str, ns_file: str, *command: str) -> None:
        subprocess.run(
            ["nsenter", f"--{option}=/proc/{self.proc.pid}/ns/{ns_file}", *command],
            check=True,
            capture_output=True,
        )

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, 9)
        self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@contextlib.contextmanager
def child(unshare: list[str], path: str) -> Iterator[Child]:
    watcher = Child(unshare, path)
    try:
        yield watcher
    finally:
        watcher.kill()


def test_mechanism_is_chosen_by_filesystem(tmp_path: Path) -> None:
    regular = tmp_path / "state"
    regular.write_text("normal\n")
    assert mechanism_for("/proc/self/mounts") is Mechanism.POLLPRI
    assert mechanism_for(regular) is Mechanism.INOTIFY
    sysfs_file = Path("/sys/kernel/address_bits")
    if sysfs_file.exists():
        assert mechanism_for(sysfs_file) is Mechanism.POLLPRI
    with pytest.raises(FileNotFoundError):
        watch_state(tmp_path / "missing")


def test_pollpri_mounts_change_wakes_the_watcher_without_polling(tmp_path: Path) -> None:
    if reason := _namespaces_usable("-m"):
        pytest.skip(reason)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    with child(["unshare", "-m", "--propagation", "private"], "/proc/self/mounts") as watcher:
        initial = watcher.value()
        assert str(mountpoint) not in initial
        switches, cpu = watcher.context_switches(), watcher.cpu_ticks()
        # Nothing changes in the child's namespace: no report, no wake-ups (a timer-driven poll
        # would switch context every period) and no CPU time (a spin on the always-readable fd
        # would burn the whole half second).
        assert watcher.line(0.5) is None
        assert watcher.context_switches() - switches <= 2
        assert watcher.cpu_ticks() - cpu <= 2
        started = time.monotonic()
        watcher.nsenter("mount", "mnt", "mount", "-t", "tmpfs", "h7-sysfs-test", str(mountpoint))
        mounted = watcher.value()
        assert time.monotonic() - started < STEP
        assert f"h7-sysfs-test {mountpoint} tmpfs" in mounted
        watcher.nsenter("mount", "mnt", "umount", str(mountpoint))
        assert watcher.value() == initial
    assert str(mountpoint) not in Path("/proc/self/mounts").read_text()  # host untouched


def test_pollpri_hostname_reports_changes_not_spurious_wakeups() -> None:
    if reason := _namespaces_usable("-u"):
        pytest.skip(reason)
    with child(["unshare", "-u"], "/proc/sys/kernel/hostname") as watcher:
        initial = watcher.value()
        assert initial == os.uname().nodename
        before = watcher.context_switches()
        # The hostname wait queue is global: a change in another UTS namespace wakes the
        # watcher, which re-reads its own unchanged hostname and reports nothing.
        subprocess.run(["unshare", "-u", "hostname", "h7-elsewhere"], check=True)
        deadline = time.monotonic() + STEP
        while watcher.context_switches() == before:
            assert time.monotonic() < deadline, "the foreign change did not wake the watcher"
            time.sleep(0.01)
        watcher.nsenter("uts", "uts", "hostname", "h7-watched")
        assert watcher.value() == "h7-watched"  # the first report: the wake-up gave none
    assert os.uname().nodename == initial


async def test_pollpri_in_process_cancel_and_close_release_fds() -> None:
    fds_before = set(os.listdir("/proc/self/fd"))
    watcher = watch_state("/proc/self/mounts")
    assert watcher.mechanism is Mechanism.POLLPRI
    first = await anext(watcher)
    assert "/proc" in first and not first.endswith("\n")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await anext(watcher)  # cancelled while waiting: the watcher stays usable
    waiting = asyncio.create_task(anext(watcher))
    await asyncio.sleep(0)
    watcher.close()  # ends a pending iteration
    with pytest.raises(StopAsyncIteration):
        await waiting
    assert set(os.listdir("/proc/self/fd")) == fds_before


async def test_inotify_replaced_file_reports_each_value_once(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.write_text("normal\n")

    def replace(text: str) -> None:
        tmp = tmp_path / ".state.tmp"
        tmp.write_text(text)
        os.rename(tmp, state)

    fds_before = set(os.listdir("/proc/self/fd"))
    async with watch_state(state) as states:
        assert states.mechanism is Mechanism.INOTIFY
        assert await anext(states) == "normal"
        (tmp_path / "other").write_text("unrelated")  # another name in the directory
        replace("normal\n")  # same value: no report
        replace("prepared\n")
        async with asyncio.timeout(STEP):
            assert await anext(states) == "prepared"
        state.write_text("frozen\n")  # written in place: IN_CLOSE_WRITE
        async with asyncio.timeout(STEP):
            assert await anext(states) == "frozen"
    assert set(os.listdir("/proc/self/fd")) == fds_before


async def test_inotify_ends_when_the_directory_goes(tmp_path: Path) -> None:
    directory = tmp_path / "liveupdate"
    directory.mkdir()
    (directory / "state").write_text("normal\n")
    async with watch_state(directory / "state") as states:
        assert await anext(states) == "normal"
        shutil.rmtree(directory)
        async with asyncio.timeout(STEP):
            assert [value async for value in states] == []


@pytest.mark.parametrize("abi", [Abi.V3, Abi.RFC_V2])
async def test_emulated_machine_every_transition_in_order(abi: str, tmp_path: Path) -> None:
    image = tmp_path / "vmlinuz"
    image.write_bytes(b"kernel" * 64)
    with EmulatedMachine(tmp_path / "machine", abi) as machine:
        machine.boot()
        sc = machine.syscalls
        device: RfcV2Device | V3Device = RfcV2Device(sc) if abi == Abi.RFC_V2 else V3Device(sc)
        device.open()

        def event(name: GlobalEvent) -> None:
            match device:
                case RfcV2Device():
                    getattr(device, f"event_{name}")()
                case V3Device():
                    device.set_event(name)

        async with watch_state(machine.layout.sysfs_state) as states:
            assert states.mechanism is Mechanism.INOTIFY

            async def next_state() -> str:
                async with asyncio.timeout(STEP):
                    return await anext(states)

            assert await next_state() == "normal"
            event(GlobalEvent.PREPARE)
            assert await next_state() == "prepared"
            event(GlobalEvent.CANCEL)
            assert await next_state() == "normal"
            event(GlobalEvent.PREPARE)
            assert await next_state() == "prepared"
            if abi == Abi.RFC_V2:
                event(GlobalEvent.FREEZE)
                assert await next_state() == "frozen"
            kernel_fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
            try:
                sc.kexec_file_load(kernel_fd, -1, "next", 0)
            finally:
                os.close(kernel_fd)
            await asyncio.to_thread(sc.reboot_kexec)  # returns once the machine went down
            with contextlib.suppress(OSError, LuoError):
                device.close()  # the machine went down under it
            await asyncio.to_thread(machine.wait_down)
            await asyncio.to_thread(machine.boot)
            assert await next_state() == "updated"
            device = RfcV2Device(sc) if abi == Abi.RFC_V2 else V3Device(sc)
            device.open()
            event(GlobalEvent.FINISH)
            assert await next_state() == "normal"
            device.close()
