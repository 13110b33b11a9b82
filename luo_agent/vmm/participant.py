"""The VM participant: one QEMU guest that survives live updates (``docs/vm-participant.md``).

    serve NAME     the workload (``luo-vm@NAME.service``): owns the guest's RAM memfd, its QEMU
                   and its monitor; listens on <runtime>/control.sock
    prepare NAME   hook: refuse a QEMU that could not load the state after the kexec; hand the
                   RAM, an empty state memfd and the metadata memfd to the agent
    freeze NAME    hook: stop the guest, save its device state and the metadata record into
                   the handed-in memfds (the pause starts here)
    cancel NAME    hook: resume the same guest
    restore NAME   hook (new boot): retrieve RAM, state and metadata, start QEMU on them, load,
                   resume; on any failure keep them for the operator
    finish NAME    hook (new boot): succeed once the guest runs
    status NAME    print the workload's view as JSON

The guest is stopped at freeze, not at prepare: everything that can be done while it runs (the
checks, handing in, the kernel pinning the RAM's pages at the end of the prepare gate) is.  The
state memfd is handed in at prepare with a fixed capacity, since a preserved memfd cannot grow.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..client import CallError
from ..participant import (
    PHASES,
    Command,
    Participant,
    ask,
    command_handler,
    error_is,
    notify,
    run_hooks,
)
from ..persist import write_atomic
from . import qemu as driver
from .guest import ram_sha256, read_counter

RAM_TOKEN, STATE_TOKEN, METADATA_TOKEN = 1, 2, 3
FORMAT = "luo-vm/1"
METADATA_CAPACITY = 64 << 10
# Device state of a small machine is well under a MiB (the firmware's RAM blocks are in it); the
# copy-RAM baseline puts the whole RAM in the stream too.  Its pages are pinned at preserve time.
STATE_CAPACITY = 8 << 20
QEMU_START_TIMEOUT = 120.0  # QEMU under nested TCG (the lab) starts in seconds, not ms
SAVE_TIMEOUT = 600.0
HEALTH_TIMEOUT = 30.0
UNPRESERVE_TIMEOUT = 5.0


def session_name(name: str) -> str:
    return f"luo-vm-{name}"


@dataclass(frozen=True)
class Settings:
    """``/etc/luo-vm/NAME.toml`` (docs/vm-participant.md): the guest (``vm``, the same on both
    sides of an update) and how this service carries it."""

    vm: driver.VmConfig
    state_dir: str
    runtime_dir: str
    copy_ram: bool = False
    verify_ram: bool = False
    bus: str | None = None

    @classmethod
    def load(
        cls, name: str, path: Path, *, state_dir: str, runtime_dir: str, bus: str | None = None
    ) -> Settings:
        raw = tomllib.loads(path.read_text()) if path.exists() else {}
        known = {"ram", "kernel", "qemu", "machine", "args", "copy_ram", "verify_ram"}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"{path}: unknown settings {sorted(unknown)}")
        if "kernel" not in raw:
            raise ValueError(f"{path}: 'kernel' (the guest image QEMU boots) is required")
        vm = driver.VmConfig(
            name=name,
            ram_bytes=_size(raw.get("ram", "64M")),
            kernel=str(raw["kernel"]),
            qemu=str(raw.get("qemu", driver.VmConfig.qemu)),
            machine=str(raw.get("machine", driver.VmConfig.machine)),
            serial_log=str(Path(state_dir) / "serial.log"),
            extra_args=tuple(str(a) for a in raw.get("args", ())),
        )
        return cls(
            vm,
            state_dir,
            runtime_dir,
            copy_ram=bool(raw.get("copy_ram", False)),
            verify_ram=bool(raw.get("verify_ram", False)),
            bus=bus,
        )

    @property
    def control_socket(self) -> Path:
        return Path(self.runtime_dir) / "control.sock"


def _size(value: object) -> int:
    if isinstance(value, int):
        size = value
    else:
        text = str(value).strip().upper()
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        size = int(text[:-1]) * units[text[-1]] if text[-1:] in units else int(text)
    if size <= 0 or size % (1 << 20):
        raise ValueError(f"ram must be a positive whole number of MiB, not {value!r}")
    return size


@dataclass
class Handover:
    """What an update carries besides the RAM: the state memfd and the metadata memfd."""

    state_fd: int
    metadata_fd: int
    stopped: bool = False

    def close(self) -> None:
        os.close(self.state_fd)
        os.close(self.metadata_fd)


@dataclass
class Vm:
    settings: Settings
    agent: Participant | None = None  # the kit's connection, for as long as the service runs
    ram_fd: int = -1
    qemu: driver.Qemu | None = None
    handover: Handover | None = None
    held: str = ""  # where the RAM and state were kept after a failed restore
    held_fds: list[int] = field(default_factory=list)  # and their fds, open while this runs
    restore_started: float = 0.0
    last: dict[str, Any] = field(default_factory=dict)  # the last restore's report
    _expected_exit: bool = False
    died: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def qmp_path(self) -> str:
        return str(Path(self.settings.runtime_dir) / "qmp.sock")

    @property
    def session(self) -> str:
        return session_name(self.settings.vm.name)

    @property
    def result_file(self) -> Path:
        return Path(self.settings.state_dir) / "last-restore.json"

    # ------------------------------------------------------------------ starting the guest

    async def boot(self) -> None:
        """An ordinary boot: fresh RAM, QEMU boots the guest, the RAM is handed in early."""
        self.ram_fd = driver.ram_memfd(self.settings.vm.name, self.settings.vm.ram_bytes)
        async with asyncio.timeout(QEMU_START_TIMEOUT):
            self._watch(await driver.start(self.settings.vm, self.ram_fd, self.qmp_path))
        with contextlib.suppress(CallError, OSError):  # no agent yet: prepare hands it in
            await self._keep_ram()

    async def connected(self) -> Participant:
        if self.agent is None:
            self.agent = await Participant.connect(self.session, self.settings.bus)
        return self.agent

    async def _keep_ram(self) -> None:
        """Keep the RAM handed in (the kit hands it in again after a cancel, an agent restart or
        a finished update), so that an update never starts without it."""
        if not self.settings.copy_ram:  # the baseline carries RAM in the state instead
            await (await self.connected()).keep(RAM_TOKEN, self.ram_fd)

    def _watch(self, vm: driver.Qemu) -> None:
        self.qemu = vm
        self._expected_exit = False
        asyncio.get_running_loop().create_task(self._wait_exit(vm))

    async def _wait_exit(self, vm: driver.Qemu) -> None:
        status = await vm.process.wait()
        if not self._expected_exit and vm is self.qemu:
            print(f"luo-vm: QEMU exited unexpectedly (status {status})", flush=True)
            self.died.set()

    def _running_qemu(self) -> driver.Qemu:
        if self.qemu is None or not self.qemu.alive:
            raise RuntimeError("the guest's QEMU is not running")
        return self.qemu

    # -------------------------------------------------------------------------- the hooks

    async def prepare(self) -> str:
        vm = self._running_qemu()
        if self.handover is not None:  # a prepare again without a cancel in between
            self.handover.close()
            self.handover = None
        refusal = _cannot_load(self.settings.vm.qemu, vm.version, vm.machine)
        if refusal:
            raise RuntimeError(f"refused before the kexec: {refusal}")
        capacity = STATE_CAPACITY + (self.settings.vm.ram_bytes if self.settings.copy_ram else 0)
        handover = Handover(
            _memfd(f"luo-vm-state-{self.settings.vm.name}", capacity),
            _memfd(f"luo-vm-metadata-{self.settings.vm.name}", METADATA_CAPACITY),
        )
        try:
            agent = await self.connected()
            if not self.settings.copy_ram:  # handed in early; make sure (an update goes without
                try:  # an fd the kit has not handed in again yet)
                    await agent.preserve(RAM_TOKEN, self.ram_fd)
                except CallError as exc:
                    if not error_is(exc, "AlreadyExists"):
                        raise
            await agent.preserve(STATE_TOKEN, handover.state_fd)
            await agent.preserve(METADATA_TOKEN, handover.metadata_fd)
        except BaseException:
            handover.close()
            raise
        self.handover = handover
        return f"RAM ({self.settings.vm.ram_bytes} bytes), state and metadata handed in"

    async def freeze(self) -> str:
        vm = self._running_qemu()
        if self.handover is None:
            raise RuntimeError("freeze without prepare: nothing was handed in")
        handover = self.handover
        stopped_at = await vm.stop()
        handover.stopped = True
        os.lseek(handover.state_fd, 0, os.SEEK_SET)
        async with asyncio.timeout(SAVE_TIMEOUT):
            written = await vm.save(handover.state_fd, copy_ram=self.settings.copy_ram)
        saved_at = time.time()
        record = {
            "format": FORMAT,
            "name": self.settings.vm.name,
            "qemu": self.settings.vm.qemu,
            "qemu_version": vm.version,
            "machine": vm.machine,
            "argv": vm.argv,
            "ram_bytes": self.settings.vm.ram_bytes,
            "state_bytes": written,
            "copy_ram": self.settings.copy_ram,
            "stopped_at": stopped_at,
            "save_seconds": round(saved_at - stopped_at, 6),
        }
        record |= _guest_view(self.ram_fd, hash_ram=self.settings.verify_ram)
        encoded = json.dumps(record).encode() + b"\n"
        if len(encoded) > METADATA_CAPACITY:
            raise RuntimeError(f"metadata record of {len(encoded)} bytes does not fit")
        os.pwrite(handover.metadata_fd, encoded, 0)
        return f"guest stopped, {written} bytes of state saved in {saved_at - stopped_at:.3f} s"

    async def cancel(self) -> str:
        handover, self.handover = self.handover, None
        if handover is None:
            return "nothing to undo"
        handover.close()
        if not handover.stopped:
            return "the guest kept running"
        vm = self._running_qemu()
        await vm.resume()
        return f"the same guest resumed ({await vm.status()})"

    async def restore(self) -> str:
        """Retrieve RAM, state and metadata; start QEMU on them, load, resume.  Whatever fails,
        what was retrieved is kept for the operator (``_hold``)."""
        fds: dict[int, int] = {}
        record: dict[str, Any] = {}
        try:
            tokens = [METADATA_TOKEN, STATE_TOKEN] + ([] if self.settings.copy_ram else [RAM_TOKEN])
            self.restore_started = time.time()
            agent = await self.connected()
            for token in tokens:
                fds[token] = await agent.retrieve(token)
            record = _read_record(fds[METADATA_TOKEN])
            return await self._resume_from(record, fds)
        except Exception as exc:
            where = self._hold(record, fds, str(exc)) if fds else ""
            held = f"; RAM and state kept in {where}" if where else ""
            raise RuntimeError(f"{exc}{held}") from exc

    async def _resume_from(self, record: dict[str, Any], fds: dict[int, int]) -> str:
        refusal = _cannot_load(self.settings.vm.qemu, record["qemu_version"], record["machine"])
        if refusal:
            raise RuntimeError(f"cannot load the carried guest: {refusal}")
        if record["ram_bytes"] != self.settings.vm.ram_bytes:
            raise RuntimeError(
                f"the carried guest has {record['ram_bytes']} bytes of RAM, "
                f"the configuration {self.settings.vm.ram_bytes}"
            )
        ram = fds.get(RAM_TOKEN)
        if ram is None:  # the copy-RAM baseline: the stream fills fresh RAM
            ram = driver.ram_memfd(self.settings.vm.name, self.settings.vm.ram_bytes)
            fds[RAM_TOKEN] = ram
        carried = _guest_view(ram, hash_ram="ram_sha256" in record)
        if "ram_sha256" in record and carried.get("ram_sha256") != record["ram_sha256"]:
            raise RuntimeError("the carried RAM does not match its hash at the freeze")
        state = fds[STATE_TOKEN]
        os.lseek(state, 0, os.SEEK_SET)  # QEMU left it at the stream's end; LUO carried that
        async with asyncio.timeout(QEMU_START_TIMEOUT):
            starting = time.time()
            vm = await driver.start(self.settings.vm, ram, self.qmp_path, incoming_fd=state)
            loading = time.time()
        try:
            async with asyncio.timeout(SAVE_TIMEOUT):
                await vm.load(state, copy_ram=bool(record["copy_ram"]))
            loaded_at = time.time()
            loaded = _guest_view(ram, hash_ram="ram_sha256" in record)
            resuming = time.time()
            running_at = await vm.resume()
        except BaseException:
            vm.process.kill()
            await vm.quit()
            raise
        self.ram_fd = ram
        self._watch(vm)
        os.close(state)
        os.close(fds[METADATA_TOKEN])
        await self._keep_ram()  # for the next update, once this one has finished
        self.last = {
            "resumed": True,
            "name": self.settings.vm.name,
            "qemu_version": vm.version,
            "machine": vm.machine,
            "copy_ram": record["copy_ram"],
            "ram_bytes": record["ram_bytes"],
            "state_bytes": record["state_bytes"],
            # Wall clocks of two boots: after a real kexec the new boot's is re-read from the RTC
            # (whole seconds on many machines); the lab puts both on the host's clock instead.
            "pause_seconds": round(running_at - record["stopped_at"], 6),
            "stopped_at": record["stopped_at"],
            "running_at": running_at,
            # The VMM's own share of the pause: saving, and starting QEMU, loading, resuming.
            "save_seconds": record["save_seconds"],
            "qemu_start_seconds": round(loading - starting, 6),
            "load_seconds": round(loaded_at - loading, 6),
            "resume_seconds": round(running_at - resuming, 6),
            "restore_started_at": self.restore_started,
            "frozen": {k: record[k] for k in ("ticks", "ram_sha256") if k in record},
            "carried": carried,
            "loaded": loaded,
        }
        write_atomic(self.result_file, json.dumps(self.last).encode(), durable=True)
        return (
            f"guest resumed after a pause of {self.last['pause_seconds']:.3f} s "
            f"(ticks {carried.get('ticks', '?')})"
        )

    def _hold(self, record: dict[str, Any], fds: dict[int, int], reason: str) -> str:
        """Keep what was carried where the operator finds it: the fds stay open in this process
        and their contents are written under the state directory (with held.json saying why)."""
        self.held_fds += fds.values()
        stamp = time.strftime("%Y%m%dT%H%M%S")
        directory = Path(self.settings.state_dir) / "held" / stamp
        staging = Path(self.settings.state_dir) / f".held-{stamp}.tmp"  # appears complete
        names = {RAM_TOKEN: "ram", STATE_TOKEN: "state", METADATA_TOKEN: "metadata"}
        try:
            staging.mkdir(parents=True, exist_ok=True)
            for token, fd in fds.items():
                _copy_out(fd, staging / names[token])
            report = {"reason": reason, "record": record, "files": sorted(names[t] for t in fds)}
            write_atomic(staging / "held.json", json.dumps(report).encode(), durable=True)
            directory.parent.mkdir(exist_ok=True)
            os.rename(staging, directory)
        except OSError as exc:
            self.held = f"the open fds of pid {os.getpid()} only (writing {directory}: {exc})"
        else:
            self.held = str(directory)
        print(f"luo-vm: restore failed ({reason}); RAM and state kept in {self.held}", flush=True)
        return self.held

    async def finish(self) -> str:
        if self.held and self.qemu is None:  # the operator finishes without the guest
            return f"no guest to check: its RAM and state are held in {self.held}"
        vm = self._running_qemu()
        status = await vm.status()
        if status != "running":
            raise RuntimeError(f"the guest is {status}, not running")
        try:
            start = read_counter(self.ram_fd).ticks
        except ValueError:  # not the project's tiny guest: QEMU's word is all there is
            return "guest running"
        async with asyncio.timeout(HEALTH_TIMEOUT):
            # The counter lives in guest RAM: nothing signals a change, so look again and again.
            while (ticks := read_counter(self.ram_fd).ticks) <= start:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        return f"guest running (ticks {ticks})"

    async def status(self) -> dict[str, Any]:
        view: dict[str, Any] = {"name": self.settings.vm.name, "held": self.held, "last": self.last}
        if self.qemu is not None and self.qemu.alive:
            view |= {
                "qemu_pid": self.qemu.process.pid,
                "status": await self.qemu.status(),
                "qemu_version": self.qemu.version,
            }
        if self.ram_fd >= 0:
            view |= _guest_view(self.ram_fd, hash_ram=False)
        return view

    # ----------------------------------------------------------------- the control socket

    def commands(self) -> dict[str, Command]:
        async def status() -> str:
            return json.dumps(await self.status())

        phases: tuple[Command, ...] = (
            self.prepare,
            self.freeze,
            self.cancel,
            self.restore,
            self.finish,
        )
        return dict(zip(PHASES, phases, strict=True)) | {"status": status}

    async def shutdown(self) -> None:
        """The guest ends (QEMU died, or the service is stopped): take back what was handed in
        for it, so that no update carries a guest that is gone."""
        self._expected_exit = True
        if self.qemu is not None:
            await self.qemu.quit()
        if self.agent is not None:
            # Not handed in, too late (an update under way) or no agent: nothing to take back.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(UNPRESERVE_TIMEOUT):
                    for token in (RAM_TOKEN, STATE_TOKEN, METADATA_TOKEN):
                        with contextlib.suppress(CallError):
                            await self.agent.unpreserve(token)
            with contextlib.suppress(Exception):
                await self.agent.close()


# ------------------------------------------------------------------------------ the helpers


def _memfd(name: str, size: int) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def _cannot_load(binary: str, version: str, machine: str) -> str:
    """Why the QEMU at ``binary`` (the one the next start runs) could not load a state saved by
    QEMU ``version`` on ``machine``, or ""."""
    try:
        installed = driver.installed_version(binary)
    except (OSError, driver.QemuError) as exc:
        return f"{binary} cannot be run: {exc}"
    if installed != version:
        return f"{binary} is QEMU {installed}, the guest's state is of QEMU {version}"
    if not driver.supports_machine(binary, machine):
        return f"{binary} has no machine type {machine.removesuffix('-machine')}"
    return ""


def _guest_view(ram_fd: int, *, hash_ram: bool) -> dict[str, Any]:
    view: dict[str, Any] = {}
    with contextlib.suppress(ValueError):  # the tiny guest's counter, when it is that guest
        view["ticks"] = read_counter(ram_fd).ticks
    if hash_ram:
        view["ram_sha256"] = ram_sha256(ram_fd)
    return view


def _read_record(fd: int) -> dict[str, Any]:
    raw = os.pread(fd, METADATA_CAPACITY, 0).rstrip(b"\0").strip()
    if not raw:
        raise RuntimeError("the metadata memfd is empty: the guest was never saved")
    record: dict[str, Any] = json.loads(raw)
    if record.get("format") != FORMAT:
        raise RuntimeError(f"unknown metadata format {record.get('format')!r}")
    return record


def _copy_out(fd: int, path: Path) -> None:
    size = os.fstat(fd).st_size
    out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        offset = 0
        while offset < size:
            sent = os.sendfile(out, fd, offset, size - offset)
            if sent == 0:
                break
            offset += sent
        os.fsync(out)
    finally:
        os.close(out)


# -------------------------------------------------------------------------------- the program


async def serve(settings: Settings) -> int:
    vm = Vm(settings)
    try:
        live_update_boot = (await vm.connected()).live_update_boot
    except (CallError, OSError) as exc:  # no agent: the guest runs all the same
        print(f"luo-vm: no live-update agent ({exc}); starting the guest", flush=True)
        live_update_boot = False
    if live_update_boot:
        print("luo-vm: live-update boot, the guest waits for the restore phase", flush=True)
    else:
        await vm.boot()
        print(
            f"luo-vm: guest {settings.vm.name} started (QEMU {vm.qemu and vm.qemu.version})",
            flush=True,
        )
    settings.control_socket.unlink(missing_ok=True)
    server = await asyncio.start_unix_server(
        command_handler(vm.commands(), "luo-vm"), path=str(settings.control_socket)
    )
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    notify("READY=1")
    try:
        async with server:
            ended = [asyncio.ensure_future(e.wait()) for e in (vm.died, stopping)]
            await asyncio.wait(ended, return_when=asyncio.FIRST_COMPLETED)
            for waiter in ended:
                waiter.cancel()
        return 0 if stopping.is_set() else 1  # QEMU died under us: so does this service
    finally:
        await vm.shutdown()


async def ask_vm(settings: Settings, command: str) -> None:
    """A hook: ask the workload to act; its "error ..." answer fails the hook (and the gate)."""
    try:
        print(await ask(settings.control_socket, command), flush=True)
    except OSError as exc:
        if command == "cancel":  # no workload (it died with its QEMU): nothing to resume
            print(f"no guest to resume: {exc}", flush=True)
            return
        raise RuntimeError(f"the VM service is not running: {exc}") from exc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m luo_agent.vmm.participant")
    parser.add_argument("command", choices=("serve", *PHASES, "status"))
    parser.add_argument("name", help="the guest's name (the unit's instance)")
    parser.add_argument("--config", help="default: /etc/luo-vm/NAME.toml")
    parser.add_argument("--state-dir", help="default: /var/lib/luo-vm/NAME")
    parser.add_argument("--runtime-dir", help="default: /run/luo-vm/NAME")
    parser.add_argument("--bus", choices=("system", "session"), default=None)
    args = parser.parse_args(argv)
    settings = Settings.load(
        args.name,
        Path(args.config or f"/etc/luo-vm/{args.name}.toml"),
        state_dir=args.state_dir or f"/var/lib/luo-vm/{args.name}",
        runtime_dir=args.runtime_dir or f"/run/luo-vm/{args.name}",
        bus=args.bus,
    )
    if args.command == "serve":
        Path(settings.runtime_dir).mkdir(parents=True, exist_ok=True)
        Path(settings.state_dir).mkdir(parents=True, exist_ok=True)
        return asyncio.run(serve(settings))
    if args.command == "status":
        try:
            asyncio.run(ask_vm(settings, "status"))
        except (RuntimeError, OSError) as exc:
            print(exc, file=sys.stderr)
            return 1
        return 0
    hooks = {phase: lambda phase=phase: ask_vm(settings, phase) for phase in PHASES}
    return run_hooks(hooks, [parser.prog, args.command])


if __name__ == "__main__":
    sys.exit(main())
