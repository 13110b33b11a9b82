"""The kernel server's process: one per emulated boot.  Logging to ``root/.luo-emu/kernel.log``
(the machine's dmesg), the fd limit, SIGTERM/SIGINT as a power-off, and the ready pipe that tells
the machine the boot succeeded or panicked."""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import resource
import signal
import sys
from pathlib import Path

from luo_agent.errors import HandoverCorrupt

from .protocol import Layout
from .server import Server

log = logging.getLogger("luo_emu.server")


def _setup_logging(layout: Layout) -> logging.handlers.MemoryHandler:
    """The kernel log, buffered until the server is idle (``Server.serve_forever``); warnings and
    errors are written at once, and everything before a control request is answered."""
    file = logging.FileHandler(layout.kernel_log)
    file.setFormatter(
        logging.Formatter("%(asctime)s luo-emu[%(process)d] %(name)s %(levelname)s: %(message)s")
    )
    handler = logging.handlers.MemoryHandler(1024, logging.WARNING, file, flushOnClose=True)
    root = logging.getLogger("luo_emu")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if os.environ.get("LUO_EMU_DEBUG") else logging.INFO)
    root.propagate = False
    return handler


def _raise_fd_limit() -> None:
    # 2000 sessions plus their memfds need far more than the usual soft limit of 1024.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def serve(root: Path, ready_fd: int = -1) -> int:
    """Run one boot of the emulated kernel in this process until kexec or a signal.

    ``ready_fd`` (a pipe) receives ``ok``, ``panic <reason>`` or ``error <reason>``."""
    layout = Layout(root)
    layout.emu_dir.mkdir(parents=True, exist_ok=True)
    log_buffer = _setup_logging(layout)
    _raise_fd_limit()

    def report(line: str) -> None:
        log_buffer.flush()  # the boot's lines are in the log once the machine is up (or not)
        if ready_fd >= 0:
            with contextlib.suppress(OSError):
                os.write(ready_fd, line.encode() + b"\n")
                os.close(ready_fd)

    try:
        server = Server(root, log_buffer)
        server.boot()
    except HandoverCorrupt as exc:
        report(f"panic {exc}")
        return 1
    except Exception as exc:
        log.exception("boot failed")
        report(f"error {exc}")
        return 2

    def on_signal(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    report("ok")
    try:
        server.serve_forever()
    finally:
        if server.running:
            log.info("powering off (signal)")
            server.go_down()
    sys.stdout.flush()
    return 0
