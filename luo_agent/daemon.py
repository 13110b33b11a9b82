"""The composition root: arguments → configuration → logging → kernel backend → Agent → D-Bus,
all inside one TaskGroup.  The only module that chooses concrete classes."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import structlog

import luo_agent.systemd.notify as notify

from . import __version__
from .agent import Agent
from .config import ABI_CHOICES, DEFAULT_CONFIG_PATH, Config, load_config
from .errors import ConfigError, LuoError
from .fleet import Coordinator, make_coordinator
from .kernel.backend import FdCustody, KernelBackend, NoCustody
from .kernel.detect import detect_abi
from .kernel.device import Abi
from .kernel.generations import BACKENDS
from .kernel.syscalls import SYSFS_STATE_PATH, RealSyscalls, Syscalls
from .log import configure_logging, log_update_ids_from
from .persist import History, RuntimeState
from .systemd.fdstore import SystemdFdStore
from .systemd.pystemd_gate import PystemdGate

log = structlog.get_logger(__name__)

EX_OK = 0
EX_SOFTWARE = 70
EX_UNAVAILABLE = 69
EX_CONFIG = 78


def make_syscalls(config: Config) -> Syscalls:
    if config.kernel.emulate_root is not None:
        from .kernel.emulator import EmulatedSyscalls

        return EmulatedSyscalls(config.kernel.emulate_root)
    return RealSyscalls()


def kernel_factory(
    config: Config, syscalls: Syscalls, custody: FdCustody | None = None
) -> Callable[[], KernelBackend]:
    def open_kernel() -> KernelBackend:
        abi = Abi(config.kernel.abi) if config.kernel.abi != "auto" else detect_abi(syscalls).abi
        return BACKENDS[abi](syscalls, custody or NoCustody(), config.state_directory)

    return open_kernel


async def run(config: Config, coordinator: Coordinator | None = None) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    syscalls = make_syscalls(config)
    gate = PystemdGate(user_mode=config.systemd_user_mode)
    agent = Agent(
        config=config,
        open_kernel=kernel_factory(
            config, syscalls, SystemdFdStore(runtime_directory=config.runtime_directory)
        ),
        gate=gate,
        runtime=RuntimeState(config.runtime_directory),
        history=History(config.state_directory),
        status=notify.status,
        on_rebooted=stop.set,
        coordinator=coordinator,
    )
    log_update_ids_from(lambda: agent.record.id if agent.record is not None else "")
    from .dbus.bus import wait_until_stopped
    from .dbus.server import serve

    status = EX_OK
    try:
        async with asyncio.TaskGroup() as tg:
            runner = tg.create_task(agent.run(), name="agent")
            try:
                await agent.start()
                bus, _ = await serve(agent, config.bus)
            except BaseException:
                runner.cancel()
                raise
            notify.ready(f"phase: {agent.phase}; kernel ABI {agent.abi}")
            log.info("agent_ready", abi=agent.abi, phase=str(agent.phase), bus=config.bus)
            watchdog = tg.create_task(_watchdog(), name="watchdog")
            state_file = kernel_state_file(agent, syscalls)
            state_watcher = (
                tg.create_task(feed_kernel_state(agent, state_file), name="sysfs-watcher")
                if state_file is not None
                else None
            )
            await agent.resume()
            # After the restore gate is queued: nothing of it is on a participant's path.
            stop_order = tg.create_task(order_stop_before_the_bus(gate), name="stop-order")
            if not await wait_until_stopped(bus, stop):
                # Off the bus the agent serves nobody: a non-zero exit lets Restart= bring it
                # back (the restarted agent recovers the update like after a crash).
                log.error("bus_connection_lost", phase=str(agent.phase))
                status = EX_UNAVAILABLE
            notify.stopping()
            log.info("agent_stopping", phase=str(agent.phase))
            watchdog.cancel()
            stop_order.cancel()
            if state_watcher is not None:
                state_watcher.cancel()
            await agent.stop()
            with contextlib.suppress(Exception):  # already closed if it was lost
                bus.disconnect()
            runner.cancel()
    finally:
        await gate.close()
    return status


# units/luo-agent-stop-order.target: ordered after dbus.service; the agent's unit is After= it.
STOP_ORDER_TARGET = "luo-agent-stop-order.target"


async def order_stop_before_the_bus(gate: PystemdGate) -> None:
    """Start ``STOP_ORDER_TARGET`` now that the agent is up, so that at shutdown the agent stops
    before the system bus.  Started by the unit (``Wants=``/``Upholds=``) it would join the boot's
    first transaction and order the agent's start after the bus (docs/units.md)."""
    try:
        async with asyncio.timeout(60):
            outcome = await gate.run_target(STOP_ORDER_TARGET)
        error = "" if outcome.ok else f"job {outcome.job_result}"
    except (LuoError, TimeoutError) as exc:
        error = str(exc) or type(exc).__name__
    if error:
        # Only the shutdown order is at stake (an agent run outside its unit has no such target).
        log.warning("stop_order_not_set", target=STOP_ORDER_TARGET, error=error)


def kernel_state_file(agent: Agent, syscalls: Syscalls) -> str | None:
    """The kernel's sysfs ``state`` file, where the backend has one: state-machine ABIs only,
    and only kernels built with CONFIG_LIVEUPDATE_SYSFS_API (the emulator always publishes it)."""
    if agent.kernel is None or not agent.kernel.capabilities.sysfs_state:
        return None
    path = syscalls.path(SYSFS_STATE_PATH)
    return path if os.path.exists(path) else None


async def feed_kernel_state(agent: Agent, path: str) -> None:
    """Reflect every value of the kernel's state file into the agent, until cancelled."""
    from .sysfs import watch_state  # state-machine ABIs only: not on the session ABI's start

    try:
        async with watch_state(path) as states:
            async for value in states:
                agent.observe_kernel_state(value)
    except OSError as exc:
        # The update itself does not depend on the watcher: report it and carry on without.
        log.warning("kernel_state_unwatchable", path=path, error=str(exc))


async def _watchdog() -> None:
    interval = notify.watchdog_interval()
    if interval is None:
        return
    while True:
        notify.watchdog()
        await asyncio.sleep(interval / 2)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="luo-agent",
        description="The live update agent: holds the kernel's Live Update Orchestrator "
        "(/dev/liveupdate), gates each phase of a live update on systemd units and offers "
        "org.luoagent.LiveUpdate1 on D-Bus.  It normally runs as luo-agent.service; operators "
        "drive it with liveupdatectl.",
        epilog="Exit codes: 69 the kernel or the bus is unavailable, 70 an internal error, "
        "78 a bad configuration.  See docs/operator-guide.md and docs/configuration.md.",
    )
    p.add_argument("--version", action="version", version=f"luo-agent {__version__}")
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help=f"configuration file, TOML (default {DEFAULT_CONFIG_PATH}, if it exists)",
    )
    p.add_argument(
        "--session-bus",
        action="store_true",
        help="serve on the session bus instead of the system bus (tests, the demo)",
    )
    p.add_argument(
        "--user-manager",
        action="store_true",
        help="gate on the systemd user manager instead of PID 1",
    )
    p.add_argument(
        "--emulate",
        type=Path,
        metavar="ROOT",
        help="drive the emulated kernel of the machine at ROOT (luo-emukernel) instead of "
        "/dev/liveupdate",
    )
    p.add_argument(
        "--abi",
        choices=ABI_CHOICES,
        help="the kernel's LUO ABI (default: the configuration's kernel.abi, auto: detected)",
    )
    p.add_argument(
        "--state-directory",
        type=Path,
        metavar="DIR",
        help="where update records and the history are kept (default /var/lib/luo-agent)",
    )
    p.add_argument(
        "--runtime-directory",
        type=Path,
        metavar="DIR",
        help="where this boot's state is kept (default /run/luo-agent)",
    )
    p.add_argument(
        "--log",
        choices=("auto", "journal", "console"),
        default="auto",
        help="log format (default auto: journal under systemd or without a terminal)",
    )
    p.add_argument(
        "--log-level", default="info", metavar="LEVEL", help="debug, info, warning or error"
    )
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return parser().parse_args(argv)


def build_config(args: argparse.Namespace) -> Config:
    config = load_config(args.config)
    kernel = config.kernel
    if args.emulate is not None:
        kernel = dataclasses.replace(kernel, emulate_root=args.emulate.resolve())
    if args.abi is not None:
        kernel = dataclasses.replace(kernel, abi=args.abi)
    changes: dict[str, object] = {"kernel": kernel}
    if args.session_bus:
        changes["bus"] = "session"
    if args.user_manager:
        changes["systemd_user_mode"] = True
    if args.state_directory is not None:
        changes["state_directory"] = args.state_directory
    if args.runtime_directory is not None:
        changes["runtime_directory"] = args.runtime_directory
    return dataclasses.replace(config, **changes)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log, args.log_level)
    # Interpreter and imports done: where the start-up's time goes (bench/real_kernel.py).
    log.info("agent_starting", version=__version__)
    try:
        config = build_config(args)
        coordinator = make_coordinator(config.fleet) if config.fleet.enabled else None
    except ConfigError as exc:
        log.error("bad_configuration", error=str(exc))
        return EX_CONFIG
    status = EX_SOFTWARE
    try:
        status = asyncio.run(run(config, coordinator))
    except* LuoError as group:
        for failure in group.exceptions:
            log.error("agent_failed", error=str(failure), kind=type(failure).__name__)
        notify.notify(STATUS=f"failed: {group.exceptions[0]}")
        status = EX_UNAVAILABLE
    except* Exception as group:
        for crash in group.exceptions:
            log.error("agent_crashed", error=str(crash), exc_info=crash)
        status = EX_SOFTWARE
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    return status


if __name__ == "__main__":
    sys.exit(main())
