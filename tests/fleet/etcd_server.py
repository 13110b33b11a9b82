"""A real etcd 3.4 (Debian's etcd-server) on loopback for the tests: one member or a cluster.

Each member gets free loopback ports and a data directory under the test's tmp_path; every wait
is bounded and every process is killed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ETCD = shutil.which("etcd")
ETCDCTL = shutil.which("etcdctl")
START_SECONDS = 30.0


def need_etcd() -> None:
    if ETCD is None or ETCDCTL is None:
        pytest.skip("etcd-server and etcd-client are not installed (scripts/bootstrap.sh)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Member:
    name: str
    data_dir: Path
    client_url: str
    peer_url: str
    log: Path
    process: subprocess.Popen[bytes] | None = None
    extra: tuple[str, ...] = ()
    cwd: Path | None = None  # where relative paths (unix://NAME:0 sockets) land

    def start(self, initial_cluster: str, state: str = "new") -> None:
        assert ETCD is not None
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    ETCD,
                    f"--name={self.name}",
                    f"--data-dir={self.data_dir}",
                    f"--listen-client-urls={self.client_url}",
                    f"--advertise-client-urls={self.client_url}",
                    f"--listen-peer-urls={self.peer_url}",
                    f"--initial-advertise-peer-urls={self.peer_url}",
                    f"--initial-cluster={initial_cluster}",
                    f"--initial-cluster-state={state}",
                    "--initial-cluster-token=luo-fleet-test",
                    "--logger=zap",
                    "--log-level=warn",
                    *self.extra,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.cwd,
            )

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.client_url + "/health", timeout=2) as answer:
                return bool(json.loads(answer.read()).get("health") == "true")
        except (OSError, ValueError):
            return False

    def status(self) -> dict[str, object]:
        request = urllib.request.Request(
            self.client_url + "/v3/maintenance/status", data=b"{}", method="POST"
        )
        with urllib.request.urlopen(request, timeout=5) as answer:
            return dict(json.loads(answer.read()))


@dataclass
class Cluster:
    members: list[Member] = field(default_factory=list)

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def wait_healthy(self, members: list[Member] | None = None) -> None:
        deadline = time.monotonic() + START_SECONDS
        for member in members or self.members:
            while not member.healthy():
                if member.process is not None and member.process.poll() is not None:
                    raise RuntimeError(
                        f"etcd {member.name} exited: {member.log.read_text()[-2000:]}"
                    )
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"etcd {member.name} not healthy: {member.log.read_text()[-2000:]}"
                    )
                time.sleep(0.1)

    def leader(self) -> Member:
        for member in self.members:
            if member.process is None:
                continue
            status = member.status()
            header = status.get("header")
            assert isinstance(header, dict)
            if status.get("leader") == header.get("member_id"):
                return member
        raise AssertionError("no member says it is the leader")

    def etcdctl(self, *args: str, input_text: str | None = None) -> str:
        assert ETCDCTL is not None
        live = ",".join(m.client_url for m in self.members if m.process is not None)
        done = subprocess.run(
            [ETCDCTL, f"--endpoints={live}", *args],
            input=input_text,
            capture_output=True,
            text=True,
            env={**os.environ, "ETCDCTL_API": "3"},
            timeout=30,
            check=True,
        )
        return done.stdout

    def get(self, key: str) -> str | None:
        out = self.etcdctl("get", "--print-value-only", key)
        return out.removesuffix("\n") if out else None

    def put(self, key: str, value: str) -> None:
        self.etcdctl("put", key, "--", value)

    def stop(self) -> None:
        for member in self.members:
            member.kill()


def make_cluster(tmp: Path, size: int, extra: tuple[str, ...] = ()) -> Cluster:
    need_etcd()
    cluster = Cluster()
    for index in range(size):
        name = f"m{index}"
        cluster.members.append(
            Member(
                name,
                tmp / f"etcd-{name}",
                f"http://127.0.0.1:{free_port()}",
                f"http://127.0.0.1:{free_port()}",
                tmp / f"etcd-{name}.log",
                extra=extra,
            )
        )
    initial = ",".join(f"{m.name}={m.peer_url}" for m in cluster.members)
    try:
        for member in cluster.members:
            member.start(initial)
        cluster.wait_healthy()
    except BaseException:
        cluster.stop()
        raise
    return cluster
