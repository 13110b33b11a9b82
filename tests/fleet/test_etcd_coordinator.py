"""The etcd coordinator against a real etcd 3.4 on loopback (Debian's etcd-server)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from luo_agent.errors import (
    ConfigError,
    CoordinatorError,
    CoordinatorInvalid,
    CoordinatorUnavailable,
    RolloutHalted,
)
from luo_agent.fleet import etcd as etcd_module
from luo_agent.fleet.etcd import HALT_KEY, SEMAPHORE_KEY, EtcdCoordinator, EtcdGateway
from luo_agent.fleet.http import tls_context
from luo_agent.fleet.port import Acquired

from .etcd_server import Cluster, Member, free_port


def coordinator(
    endpoints: list[str], group: str, host: str, slots: int = 2, **kw: object
) -> EtcdCoordinator:
    return EtcdCoordinator(EtcdGateway(endpoints), host_id=host, group=group, slots=slots, **kw)  # type: ignore[arg-type]


def stored(etcd: Cluster, group: str) -> dict[str, object]:
    raw = etcd.get(SEMAPHORE_KEY.format(group=group))
    assert raw is not None
    return dict(json.loads(raw))


async def test_slots_counted_in_airlocks_key(etcd: Cluster, group: str) -> None:
    hosts = [coordinator(etcd.endpoints, group, f"host{i}") for i in range(3)]
    assert await hosts[1].acquire() is Acquired.HELD
    assert await hosts[0].acquire() is Acquired.HELD
    assert await hosts[2].acquire() is Acquired.FULL
    # airlock's layout, read back with etcdctl: sorted holders, the slot count.
    assert stored(etcd, group) == {"total_slots": 2, "holders": ["host0", "host1"]}
    await hosts[0].release()
    assert await hosts[2].acquire() is Acquired.HELD
    assert stored(etcd, group) == {"total_slots": 2, "holders": ["host1", "host2"]}


async def test_repeated_acquire_and_release_change_nothing(etcd: Cluster, group: str) -> None:
    host = coordinator(etcd.endpoints, group, "host0")
    other = coordinator(etcd.endpoints, group, "host1")
    for _ in range(3):
        assert await host.acquire() is Acquired.HELD
    assert stored(etcd, group)["holders"] == ["host0"]
    assert await other.acquire() is Acquired.HELD
    for _ in range(3):
        await host.release()
    assert stored(etcd, group)["holders"] == ["host1"]
    status = await host.status()
    assert not status.holding and status.semaphores[0].holders == ("host1",)


async def test_zone_and_fleet_limits_in_one_transaction(etcd: Cluster, group: str) -> None:
    zone_a, zone_b = f"{group}-a", f"{group}-b"

    def host(name: str, zone: str) -> EtcdCoordinator:
        return coordinator(etcd.endpoints, group, name, slots=2, zone=zone, zone_slots=1)

    a1, a2, b1, b2 = host("a1", zone_a), host("a2", zone_a), host("b1", zone_b), host("b2", zone_b)
    assert await a1.acquire() is Acquired.HELD
    assert await a2.acquire() is Acquired.FULL  # its zone is full, the fleet is not
    assert await b1.acquire() is Acquired.HELD
    await a1.release()
    assert await b2.acquire() is Acquired.FULL  # zone b full
    assert await a2.acquire() is Acquired.HELD
    # The refused hosts left no trace in any key: both limits are one transaction.
    assert stored(etcd, group)["holders"] == ["a2", "b1"]
    assert stored(etcd, zone_a)["holders"] == ["a2"]
    assert stored(etcd, zone_b)["holders"] == ["b1"]
    c1 = coordinator(etcd.endpoints, group, "c1", slots=2, zone=f"{group}-c", zone_slots=1)
    assert await c1.acquire() is Acquired.FULL  # its zone is free, the fleet is full
    assert etcd.get(SEMAPHORE_KEY.format(group=f"{group}-c")) is None


async def test_everyone_asking_at_once_never_exceeds_the_slots(etcd: Cluster, group: str) -> None:
    holding: set[str] = set()
    most = 0

    async def host(name: str) -> None:
        nonlocal most
        me = coordinator(etcd.endpoints, group, name, slots=2)
        for _ in range(400):  # bounded: every host gets its turn well before this
            if await me.acquire() is Acquired.HELD:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError(f"{name} never got a slot")
        holding.add(name)
        most = max(most, len(holding))
        # What etcd says agrees with who thinks it holds a slot.
        assert name in (await me.status()).semaphores[0].holders
        await asyncio.sleep(0.1)
        holding.discard(name)
        await me.release()

    await asyncio.gather(*(host(f"host{i}") for i in range(6)))
    # Every host had its turn, never more than two at once (how many overlapped is up to timing).
    assert 1 <= most <= 2
    assert stored(etcd, group)["holders"] == []


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ('{"total_slots":0,"holders":[]}', "total_slots 0"),
        ('{"total_slots":2,"holders":[1,2]}', "do not parse"),
        ('{"total_slots":2,"holders":["a b"]}', "do not parse"),
        ('{"total_slots":2,"holders":["x","x"]}', "twice"),
        ("not json", "not JSON"),
        ('{"holders":[]}', "total_slots None"),
    ],
)
async def test_a_coordinator_that_lies_is_an_error(
    etcd: Cluster, group: str, value: str, why: str
) -> None:
    etcd.put(SEMAPHORE_KEY.format(group=group), value)
    with pytest.raises(CoordinatorInvalid, match=why):
        await coordinator(etcd.endpoints, group, "host0").acquire()
    assert etcd.get(SEMAPHORE_KEY.format(group=group)) == value  # nothing written over it


async def test_failure_past_the_budget_halts_everyone(etcd: Cluster, group: str) -> None:
    hosts = [coordinator(etcd.endpoints, group, f"h{i}", failure_budget=1) for i in range(3)]
    assert await hosts[0].acquire() is Acquired.HELD
    assert await hosts[1].acquire() is Acquired.HELD
    assert await hosts[0].report_failure("restore gate failed") is False  # within the budget
    assert await hosts[1].report_failure("boot fell back") is True
    status = await hosts[2].status()
    assert status.halted.startswith("2 host(s) failed (budget 1)")
    assert status.failed == ("h0", "h1")
    # The failed hosts keep their slots; nobody else gets one while halted.
    assert stored(etcd, group)["holders"] == ["h0", "h1"]
    await hosts[0].force_release("h0")
    with pytest.raises(RolloutHalted, match="boot fell back"):
        await hosts[2].acquire()
    await hosts[2].resume()
    assert etcd.get(HALT_KEY.format(group=group)) is None
    assert await hosts[2].acquire() is Acquired.HELD


async def test_operator_halt_and_set_max_keep_the_holders(etcd: Cluster, group: str) -> None:
    host = coordinator(etcd.endpoints, group, "h0", slots=1)
    other = coordinator(etcd.endpoints, group, "h1", slots=1)
    assert await host.acquire() is Acquired.HELD
    assert await other.acquire() is Acquired.FULL
    await host.set_max(3)
    assert stored(etcd, group) == {"total_slots": 3, "holders": ["h0"]}
    await host.halt("maintenance window over")
    with pytest.raises(RolloutHalted, match="maintenance window over"):
        await other.acquire()
    await host.resume()
    assert await other.acquire() is Acquired.HELD
    await host.set_max(1)  # fewer slots than holders: nobody new gets in, nobody is thrown out
    assert stored(etcd, group) == {"total_slots": 1, "holders": ["h0", "h1"]}


async def test_etcd_down_is_unavailable_fast() -> None:
    dead = [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"]
    host = coordinator(dead, "g", "h0")
    async with asyncio.timeout(10):
        with pytest.raises(CoordinatorUnavailable, match="no etcd member answered"):
            await host.acquire()


class ElectingMember:
    """One member's HTTP gateway during an election, as etcd 3.4's answers it (grpc-gateway: HTTP
    503, the gRPC status in the body): UNAVAILABLE "leader changed" ``busy`` times, then a txn's
    answer."""

    def __init__(self, busy: int) -> None:
        self.busy, self.requests = busy, 0
        self.port = free_port()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        fields = dict(line.partition(": ")[::2] for line in head.decode().split("\r\n")[1:])
        await reader.readexactly(int(fields["Content-Length"]))
        self.requests += 1
        if self.requests <= self.busy:
            status, body = "503 Service Unavailable", {
                "error": "etcdserver: leader changed", "code": 14,
                "message": "etcdserver: leader changed"}  # fmt: skip
        else:
            status, body = "200 OK", {"header": {"revision": "7"}, "succeeded": True}
        payload = json.dumps(body).encode()
        writer.write(f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)  # fmt: skip
        await writer.drain()
        writer.close()

    @contextlib.asynccontextmanager
    async def running(self) -> Any:
        server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        async with server:
            yield f"http://127.0.0.1:{self.port}"


async def test_an_election_is_waited_out() -> None:
    member = ElectingMember(busy=3)
    dead = f"http://127.0.0.1:{free_port()}"
    async with member.running() as url:
        gateway = EtcdGateway([dead, url])
        async with asyncio.timeout(10):
            reply = await gateway.call("/v3/kv/txn", {"compare": [], "success": []})
    assert reply["succeeded"] is True
    assert member.requests == 4


async def test_an_election_that_does_not_end_is_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(etcd_module, "ELECTION_GRACE_SECONDS", 0.5)
    member = ElectingMember(busy=10**6)
    async with member.running() as url:
        gateway = EtcdGateway([url])
        started = time.monotonic()
        with pytest.raises(CoordinatorUnavailable, match="leader changed"):
            await gateway.call("/v3/kv/txn", {"compare": [], "success": []})
    assert 1 < member.requests < 20
    assert time.monotonic() - started < 5


async def test_killing_the_leader_loses_no_slot(etcd3: Cluster, group: str) -> None:
    hosts = [coordinator(etcd3.endpoints, group, f"h{i}") for i in range(3)]
    assert await hosts[0].acquire() is Acquired.HELD
    assert await hosts[1].acquire() is Acquired.HELD
    leader = etcd3.leader()
    leader.kill()
    async with asyncio.timeout(60):
        status = await hosts[2].status()
        assert status.semaphores[0].holders == ("h0", "h1")
        assert await hosts[2].acquire() is Acquired.FULL
        await hosts[0].release()
        assert await hosts[2].acquire() is Acquired.HELD
    assert json.loads(etcd3.get(SEMAPHORE_KEY.format(group=group)) or "")["holders"] == ["h1", "h2"]


async def test_etcd_users_and_root_only_password_file(tmp_path: Path, group: str) -> None:
    from .etcd_server import make_cluster

    cluster = make_cluster(tmp_path, 1)
    try:
        cluster.etcdctl("user", "add", "root", "--new-user-password=rootpw")
        cluster.etcdctl("user", "add", "agent", "--new-user-password=s3cret")
        cluster.etcdctl("role", "add", "fleet")
        cluster.etcdctl(
            "role", "grant-permission", "fleet", "--prefix=true", "readwrite", "com.coreos.airlock/"
        )
        cluster.etcdctl(
            "role", "grant-permission", "fleet", "--prefix=true", "readwrite", "luo-agent/"
        )
        cluster.etcdctl("user", "grant-role", "agent", "fleet")
        cluster.etcdctl("auth", "enable")
        password = tmp_path / "password"
        password.write_text("s3cret\n")
        os.chmod(password, 0o644)
        gateway = EtcdGateway(cluster.endpoints, username="agent", password_file=password)
        host = EtcdCoordinator(gateway, host_id="h0", group=group, slots=1)
        with pytest.raises(ConfigError, match="no group or other access"):
            await host.acquire()
        os.chmod(password, 0o600)
        assert await host.acquire() is Acquired.HELD
        anonymous = coordinator(cluster.endpoints, group, "h1")
        with pytest.raises(CoordinatorError, match=r"user name is empty|permission denied"):
            await anonymous.acquire()
        value = cluster.etcdctl(
            "--user=root:rootpw", "get", "--print-value-only", SEMAPHORE_KEY.format(group=group)
        )
        assert json.loads(value) == {"total_slots": 1, "holders": ["h0"]}
    finally:
        cluster.stop()


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_pki(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate (openssl)."""
    p = {n: directory / n for n in ("ca.key", "ca.pem", "server.key", "server.pem", "client.key",
                                    "client.pem", "ext.cnf")}  # fmt: skip
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
             "-keyout", str(p["ca.key"]), "-out", str(p["ca.pem"]))  # fmt: skip
    p["ext.cnf"].write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n")
    for who in ("server", "client"):
        csr = directory / f"{who}.csr"
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={who}",
                 "-keyout", str(p[f"{who}.key"]), "-out", str(csr))  # fmt: skip
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(p["ca.pem"]), "-CAkey",
                 str(p["ca.key"]), "-CAcreateserial", "-days", "2", "-extfile", str(p["ext.cnf"]),
                 "-out", str(p[f"{who}.pem"]))  # fmt: skip
        os.chmod(p[f"{who}.key"], 0o600)
    return p


def wait_healthy(url: str, context: ssl.SSLContext) -> None:
    for _ in range(300):  # bounded: etcd answers within seconds
        with contextlib.suppress(OSError):
            urllib.request.urlopen(url + "/health", timeout=2, context=context).close()
            return
        time.sleep(0.1)
    raise AssertionError(f"{url} never answered")


async def test_tls_with_a_client_certificate(tmp_path: Path, group: str) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl")
    pki = make_pki(tmp_path)
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    member = Member(
        "tls",
        tmp_path / "data",
        url,
        f"http://127.0.0.1:{free_port()}",
        tmp_path / "etcd.log",
        extra=(
            f"--cert-file={pki['server.pem']}",
            f"--key-file={pki['server.key']}",
            "--client-cert-auth",
            f"--trusted-ca-file={pki['ca.pem']}",
        ),
    )
    member.start(f"tls={member.peer_url}")
    try:
        context = ssl.create_default_context(cafile=str(pki["ca.pem"]))
        context.load_cert_chain(str(pki["client.pem"]), str(pki["client.key"]))
        await asyncio.to_thread(wait_healthy, url, context)
        with_cert = EtcdCoordinator(
            EtcdGateway(
                [url], tls=tls_context(pki["ca.pem"], pki["client.pem"], pki["client.key"])
            ),
            host_id="h0",
            group=group,
            slots=1,
        )
        assert await with_cert.acquire() is Acquired.HELD
        assert (await with_cert.status()).semaphores[0].holders == ("h0",)
        # Without the client certificate the server refuses the handshake.
        without = EtcdCoordinator(
            EtcdGateway([url], tls=tls_context(pki["ca.pem"], None, None)),
            host_id="h1",
            group=group,
            slots=1,
        )
        with pytest.raises(CoordinatorUnavailable):
            await without.acquire()
        # A key others may read is refused before any connection.
        os.chmod(pki["client.key"], 0o644)
        with pytest.raises(ConfigError, match="no group or other access"):
            tls_context(pki["ca.pem"], pki["client.pem"], pki["client.key"])
    finally:
        member.kill()
