"""Real buses and a real polkitd for the security tests; the agent runs on them as its own process
(``AgentProcess`` of ``tests/agent_host.py``, entered into the namespace with ``nsenter``).

``PolkitNamespace``: a private mount namespace (``unshare -m --propagation private``) with a tmpfs
on ``/run``, the stock ``dbus-daemon --system`` and ``/usr/lib/polkit-1/polkitd``.  The project's
bus policy, polkit actions and a test rules file are installed into bind-mounted tmpfs copies of
the system directories, so the host's files are never touched; bus activation is switched off (an
empty ``system-services``) so a stopped polkitd stays stopped.  ``/run/dbus`` is a bind mount of a
host directory, so callers outside the namespace (the test, ``setpriv`` subprocesses) reach the
same socket.  ``SessionBus``: a private ``dbus-daemon --session`` for the fast tests.

Every process is started here as a child and ended by pid; ``leftovers()`` lists any process still
in the namespace or still alive.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from luo_agent.kernel.emulator import EmulatedMachine
from tests.agent_host import AgentProcess
from tests.private_bus import HarnessError, PrivateBus, end_process, read_line

REPO = Path(__file__).resolve().parents[2]
POLICY = REPO / "policy"
POLKITD = "/usr/lib/polkit-1/polkitd"
NOBODY = 65534

# Test-only polkit rules: ``daemon`` plays a participant service allowed to hand fds in and start
# updates, ``lp`` a restore helper allowed to read anyone's preserved fds.  Everyone else gets the
# shipped defaults.
TEST_RULES = """\
polkit.addRule(function(action, subject) {
    if (subject.user == "daemon" &&
        (action.id == "org.luoagent.liveupdate1.preserve" ||
         action.id == "org.luoagent.liveupdate1.prepare" ||
         action.id == "org.luoagent.liveupdate1.cancel")) {
        return polkit.Result.YES;
    }
    if (subject.user == "lp" && action.id == "org.luoagent.liveupdate1.retrieve") {
        return polkit.Result.YES;
    }
});
"""
PARTICIPANT_UID = 1  # daemon
RESTORE_HELPER_UID = 7  # lp

_HOLDER_SCRIPT = r"""
set -eu
exposed=$1 policy=$2 rules=$3
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/dbus /run/luo-stage
mount --bind "$exposed" /run/dbus
stage() {  # a writable tmpfs copy of a system directory, mounted over it
    mkdir -p "/run/luo-stage/$2"
    cp -a "$1/." "/run/luo-stage/$2/"
    mount --bind "/run/luo-stage/$2" "$1"
}
stage /usr/share/dbus-1/system.d bus-policy
cp "$policy/org.luoagent.LiveUpdate1.conf" /usr/share/dbus-1/system.d/
stage /usr/share/polkit-1/actions polkit-actions
cp "$policy/org.luoagent.liveupdate1.policy" /usr/share/polkit-1/actions/
stage /etc/polkit-1/rules.d polkit-rules
cp "$rules" /etc/polkit-1/rules.d/49-luo-agent-tests.rules
chown -R polkitd /etc/polkit-1/rules.d
mkdir -p /run/luo-stage/no-activation
mount --bind /run/luo-stage/no-activation /usr/share/dbus-1/system-services
echo ready
exec sleep infinity
"""


def missing_requirements() -> str | None:
    if os.geteuid() != 0:
        return "needs root (mount namespaces, setpriv)"
    for tool in ("unshare", "nsenter", "setpriv", "dbus-daemon"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    if not os.access(POLKITD, os.X_OK):
        return f"{POLKITD} missing (apt-get install polkitd)"
    return None


def _mnt_ns(pid: int | str) -> tuple[int, int] | None:
    try:
        st = os.stat(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None
    return st.st_dev, st.st_ino


def open_fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class SessionBus(PrivateBus):
    """A private session bus (no policy: every local root caller is the agent's own uid)."""

    @property
    def env(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "DBUS_SESSION_BUS_ADDRESS": self.address,
        }


class PolkitNamespace:
    """The system bus and polkitd in a private mount namespace (see the module doc)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        # A world-traversable directory: unprivileged callers connect to the socket in it.
        self.exposed = Path(tempfile.mkdtemp(prefix="luo-sysbus-"))
        self.exposed.chmod(0o755)
        self.socket = self.exposed / "system_bus_socket"
        self.address = f"unix:path={self.socket}"
        self._holder: subprocess.Popen[bytes] | None = None
        self._dbus: PrivateBus | None = None
        self._polkitd: subprocess.Popen[bytes] | None = None
        self._ns: tuple[int, int] | None = None
        self.started_pids: list[int] = []

    def __enter__(self) -> PolkitNamespace:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def holder_pid(self) -> int:
        assert self._holder is not None
        return self._holder.pid

    @property
    def inside(self) -> list[str]:
        """Command prefix that runs a program inside the namespace."""
        return ["nsenter", "-t", str(self.holder_pid), "-m", "--"]

    @property
    def env(self) -> dict[str, str]:
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}

    def _start(self) -> None:
        rules = self.workdir / "test.rules"
        rules.write_text(TEST_RULES)
        rules.chmod(0o644)
        self._holder = subprocess.Popen(
            [
                *("unshare", "-m", "--propagation", "private", "sh", "-c", _HOLDER_SCRIPT, "sh"),
                *(str(self.exposed), str(POLICY), str(rules)),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        self.started_pids.append(self._holder.pid)
        read_line(self._holder, 10.0, "namespace holder")
        self._ns = _mnt_ns(self._holder.pid)
        if self._ns is None or self._ns == _mnt_ns("self"):
            raise HarnessError("the holder did not get its own mount namespace")
        self._dbus = PrivateBus(self.workdir, system_inside=self.inside)
        self.started_pids.append(self._dbus.proc.pid)
        self.start_polkitd()

    def start_polkitd(self) -> None:
        log = open(self.workdir / "polkitd.log", "ab")  # noqa: SIM115 - handed to the child
        with log:
            self._polkitd = subprocess.Popen(
                [*self.inside, POLKITD, "--no-debug"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        self.started_pids.append(self._polkitd.pid)
        self.wait_name("org.freedesktop.PolicyKit1", owned=True)

    def stop_polkitd(self) -> None:
        end_process(self._polkitd)
        self._polkitd = None
        self.wait_name("org.freedesktop.PolicyKit1", owned=False)

    def wait_name(self, name: str, *, owned: bool, timeout: float = 15.0) -> None:
        """Wait until ``name`` has (or has lost) an owner on the bus."""
        deadline = time.monotonic() + timeout
        while True:
            out = subprocess.run(
                ["busctl", f"--address={self.address}", "status", name],
                capture_output=True,
                env=self.env,
            )
            if (out.returncode == 0) == owned:
                return
            if time.monotonic() > deadline:
                raise HarnessError(
                    f"{name} {'not owned' if owned else 'still owned'} after {timeout}s"
                )
            time.sleep(0.05)

    def start_agent(self, workdir: Path, machine: EmulatedMachine, **kwargs: Any) -> AgentProcess:
        agent = AgentProcess(workdir, machine, "system", env=self.env, prefix=self.inside, **kwargs)
        self.started_pids.append(agent.pid)
        return agent

    def call_as(self, uid: int, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Run ``calls`` (see ``wire``) from a process switched to ``uid`` with setpriv."""
        proc = subprocess.run(
            [
                *("setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"),
                *(sys.executable, "-m", "tests.security.caller", self.address),
            ],
            input=json.dumps(calls).encode(),
            capture_output=True,
            cwd=REPO,
            env=self.env | {"PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"},
            timeout=60,
        )
        if proc.returncode != 0:
            raise HarnessError(f"caller uid {uid} failed: {proc.stderr.decode(errors='replace')}")
        results: list[dict[str, Any]] = json.loads(proc.stdout)
        return results

    def namespace_pids(self) -> list[int]:
        if self._ns is None:
            return []
        return [
            int(entry)
            for entry in os.listdir("/proc")
            if entry.isdigit() and _mnt_ns(entry) == self._ns
        ]

    def leftovers(self) -> list[int]:
        alive = [pid for pid in self.started_pids if _mnt_ns(pid) is not None and _is_running(pid)]
        return sorted(set(alive) | set(self.namespace_pids()))

    def close(self) -> None:
        end_process(self._polkitd)
        if self._dbus is not None:
            self._dbus.stop()
        # Anything else started inside (a forgotten agent) goes by pid before the holder.
        holder = self._holder.pid if self._holder else -1
        for pid in self.namespace_pids():
            if pid != holder:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        end_process(self._holder, grace=2.0)
        for proc in (self._polkitd, self._holder):
            if proc is not None and proc.stdout is not None:
                proc.stdout.close()
        shutil.rmtree(self.exposed, ignore_errors=True)


def _is_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
