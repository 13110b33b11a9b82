"""The VMM driver without the agent: a guest whose RAM is a memfd survives a QEMU restart (stop,
device state saved into a second memfd, a new QEMU loads it and resumes).  What the VM
participant does around a kexec, here with the memfds simply kept open."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import pytest

from luo_agent.vmm import qemu
from luo_agent.vmm.guest import ram_sha256, read_counter

from .conftest import needs_qemu

pytestmark = needs_qemu
RAM = 64 << 20


async def _until_ticks(ram: int, ticks: int) -> None:
    async with asyncio.timeout(20):
        while True:
            with contextlib.suppress(ValueError):  # not yet: the guest writes its magic first
                if read_counter(ram).ticks >= ticks:
                    return
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("copy_ram", [False, True], ids=["ram-shared", "ram-copied"])
async def test_the_guest_goes_on_in_a_new_qemu(
    guest_kernel: Path, tmp_path: Path, copy_ram: bool
) -> None:
    config = qemu.VmConfig("t", RAM, str(guest_kernel), serial_log=str(tmp_path / "serial"))
    ram = qemu.ram_memfd("t", RAM)
    state = os.memfd_create("state", os.MFD_CLOEXEC)
    qmp_path = str(tmp_path / "qmp")
    first = await qemu.start(config, ram, qmp_path)
    try:
        assert await first.status() == "running"
        assert first.machine.startswith("pc-i440fx-")
        await _until_ticks(ram, 20)
        await first.stop()
        written = await first.save(state, copy_ram=copy_ram)
        assert await first.status() == "postmigrate"
    finally:
        await first.quit()
    # Without x-ignore-shared the stream carries the RAM; with it, only device state.
    assert (written > RAM // 2) is copy_ram
    assert os.lseek(state, 0, os.SEEK_CUR) == written  # QEMU left the position at the end
    before, digest = read_counter(ram), ram_sha256(ram)
    assert before.ticks >= 20 and before.ram_end > RAM - (1 << 20)
    if copy_ram:  # the baseline: the new QEMU gets fresh RAM and the stream fills it
        os.close(ram)
        ram = qemu.ram_memfd("t", RAM)
    os.lseek(state, 0, os.SEEK_SET)
    second = await qemu.start(config, ram, qmp_path, incoming_fd=state)
    try:
        await second.load(state, copy_ram=copy_ram)
        assert await second.status() == "paused"
        assert ram_sha256(ram) == digest  # byte for byte the RAM the first QEMU left
        assert read_counter(ram) == before
        await second.resume()
        assert await second.status() == "running"
        await _until_ticks(ram, before.ticks + 20)
    finally:
        await second.quit()
        os.close(ram)
        os.close(state)
    assert "luo-guest: started" in (tmp_path / "serial").read_text()


async def test_a_qemu_that_cannot_start_is_reported(guest_kernel: Path, tmp_path: Path) -> None:
    config = qemu.VmConfig("t", RAM, str(guest_kernel), machine="no-such-machine")
    ram = qemu.ram_memfd("t", RAM)
    try:
        with pytest.raises(qemu.QemuError, match="exited with status"):
            await qemu.start(config, ram, str(tmp_path / "qmp"))
    finally:
        os.close(ram)


def test_the_installed_qemu_is_known(guest_kernel: Path) -> None:
    assert qemu.installed_version("qemu-system-x86_64")[0].isdigit()
    assert qemu.supports_machine("qemu-system-x86_64", "pc-machine")
    assert not qemu.supports_machine("qemu-system-x86_64", "no-such-machine")
