"""A ``dbus-daemon`` of our own, for the tests and the benchmarks: the one way they start a
private bus (the sandboxes' bus is socket-activated by their systemd).

``PrivateBus(directory)`` listens on ``directory/bus`` with the stock session configuration;
``any_uid=True`` lets every uid connect and talk to anyone (the CLI's NotAuthorized test runs as
nobody: the agent's own authorizer is what is tested); ``system_inside=[nsenter …]``: the stock
system bus instead, started in the mount namespace that command enters (the security tests').
The daemon's stderr goes to ``directory/dbus-daemon.log``.  ``read_line`` and ``end_process``
serve every child of the tests that says it is ready by printing a line (the buses, the agent as
a process, polkitd).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

ANY_UID_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow receive_sender="*"/>
    <allow eavesdrop="true"/>
  </policy>
</busconfig>
"""


class HarnessError(RuntimeError):
    """A process of the harness did not start or said something unexpected."""


def read_line(proc: subprocess.Popen[bytes], timeout: float, what: str) -> str:
    """The first line a child prints (its "ready" line), bounded by ``timeout``."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(b"\n"):
        readable, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not readable:
            raise HarnessError(f"{what} not ready within {timeout}s")
        chunk = os.read(fd, 1)
        if not chunk:
            raise HarnessError(f"{what} exited (status {proc.wait()})")
        data += chunk
    return data.decode().strip()


def end_process(proc: subprocess.Popen[bytes] | None, grace: float = 5.0) -> None:
    """SIGTERM a child of ours, SIGKILL it after ``grace``."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class PrivateBus:
    """A running private bus; ``address`` is what it printed (``unix:path=…,guid=…``)."""

    def __init__(
        self,
        directory: Path,
        *,
        any_uid: bool = False,
        system_inside: Sequence[str] = (),
        timeout: float = 10.0,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.socket = directory / "bus"
        self.log = directory / "dbus-daemon.log"
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()  # a bus of an earlier run in the same directory
        if system_inside:
            how = [*system_inside, "dbus-daemon", "--system"]
        elif any_uid:
            config = directory / "bus.conf"
            config.write_text(ANY_UID_CONFIG.format(socket=self.socket))
            how = ["dbus-daemon", f"--config-file={config}"]
        else:
            how = ["dbus-daemon", "--session", f"--address=unix:path={self.socket}"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*how, "--nofork", "--nopidfile", "--print-address"],
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        try:
            self.address = read_line(self.proc, timeout, "dbus-daemon")
        except HarnessError as exc:
            self.stop()
            raise HarnessError(f"{exc}: {self.log.read_text()}") from None

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
