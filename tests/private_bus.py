"""A ``dbus-daemon`` of our own, for the tests and the benchmarks: the one way they start a
private bus (the security tests' system bus runs inside their namespace, the sandboxes' bus is
socket-activated by their systemd).

``PrivateBus(directory)`` listens on ``directory/bus`` with the stock session configuration;
``any_uid=True`` lets every uid connect and talk to anyone (the CLI's NotAuthorized test runs as
nobody: the agent's own authorizer is what is tested).  The daemon's stderr goes to
``directory/dbus-daemon.log``.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
from pathlib import Path
from types import TracebackType

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


class PrivateBus:
    """A running private bus; ``address`` is what it printed (``unix:path=…,guid=…``)."""

    def __init__(self, directory: Path, *, any_uid: bool = False, timeout: float = 10.0) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.socket = directory / "bus"
        self.log = directory / "dbus-daemon.log"
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()  # a bus of an earlier run in the same directory
        if any_uid:
            config = directory / "bus.conf"
            config.write_text(ANY_UID_CONFIG.format(socket=self.socket))
            how = [f"--config-file={config}"]
        else:
            how = ["--session", f"--address=unix:path={self.socket}"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                ["dbus-daemon", *how, "--nofork", "--nopidfile", "--print-address"],
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        assert self.proc.stdout is not None
        readable, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline().decode().strip() if readable else ""
        if not line:
            self.stop()
            raise RuntimeError(f"dbus-daemon did not start: {self.log.read_text()}")
        self.address = line

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> PrivateBus:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
