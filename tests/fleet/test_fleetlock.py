"""The FleetLock client against a FleetLock server on loopback.

No FleetLock server is packaged for Debian (airlock and poseidon/fleetlock are Go programs), so the
server here is a small one that answers as airlock does (docs: 200, 500 ``failed_lock`` when full,
400 ``bad_request`` for a bad identity) and checks every request the protocol's way.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from luo_agent.errors import CoordinatorError, CoordinatorInvalid, CoordinatorUnavailable
from luo_agent.fleet.fleetlock import FleetLockCoordinator
from luo_agent.fleet.port import Acquired


@dataclass
class AirlockLike:
    slots: int
    holders: set[str] = field(default_factory=set)
    seen: list[tuple[str, dict[str, str], object]] = field(default_factory=list)
    full_status: int = 500
    answer_garbage: bool = False

    def answer(self, path: str, headers: dict[str, str], body: object) -> tuple[int, object]:
        self.seen.append((path, headers, body))
        if headers.get("fleet-lock-protocol") != "true":
            return 400, {"kind": "missing_header", "value": "fleet-lock-protocol"}
        params = body.get("client_params") if isinstance(body, dict) else None
        if not isinstance(params, dict) or not params.get("id") or not params.get("group"):
            return 400, {"kind": "bad_request", "value": "client_params"}
        if self.answer_garbage:
            return 500, "<html>oops</html>"
        host = params["id"]
        if path == "/v1/pre-reboot":
            if host in self.holders or len(self.holders) < self.slots:
                self.holders.add(host)
                return 200, {}
            return self.full_status, {"kind": "failed_lock", "value": "semaphore full"}
        if path == "/v1/steady-state":
            self.holders.discard(host)
            return 200, {}
        return 404, {"kind": "not_found", "value": path}

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        request_line, *lines = head.decode().split("\r\n")
        method, path, _ = request_line.split(" ")
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines if x)
        }
        body = json.loads(await reader.readexactly(int(headers["content-length"])))
        assert method == "POST"
        status, reply = self.answer(path, headers, body)
        payload = reply.encode() if isinstance(reply, str) else json.dumps(reply).encode()
        writer.write(
            f"HTTP/1.1 {status} X\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload
        )
        await writer.drain()
        writer.close()


@pytest.fixture
async def server() -> AsyncIterator[tuple[AirlockLike, str]]:
    state = AirlockLike(slots=1)
    listener = await asyncio.start_server(state.serve, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    async with listener:
        yield state, f"http://127.0.0.1:{port}"


async def test_protocol_requests_and_only_200_is_success(
    server: tuple[AirlockLike, str],
) -> None:
    state, url = server
    first = FleetLockCoordinator(url, host_id="h0", group="workers")
    second = FleetLockCoordinator(url, host_id="h1", group="workers")
    assert await first.acquire() is Acquired.HELD
    assert await first.acquire() is Acquired.HELD  # repeating is harmless
    assert await second.acquire() is Acquired.FULL  # airlock's 500 failed_lock
    state.full_status = 423  # poseidon/fleetlock's lock_held
    assert await second.acquire() is Acquired.FULL
    await first.release()
    await first.release()
    assert await second.acquire() is Acquired.HELD
    path, headers, body = state.seen[0]
    assert path == "/v1/pre-reboot"
    assert headers["fleet-lock-protocol"] == "true"
    assert body == {"client_params": {"id": "h0", "group": "workers"}}
    assert {p for p, _, _ in state.seen} == {"/v1/pre-reboot", "/v1/steady-state"}


async def test_refusals_and_garbage(server: tuple[AirlockLike, str]) -> None:
    state, url = server
    with pytest.raises(CoordinatorError, match="bad_request"):
        await FleetLockCoordinator(url, host_id="h0", group="").acquire()
    state.answer_garbage = True
    with pytest.raises(CoordinatorInvalid, match="not JSON"):
        await FleetLockCoordinator(url, host_id="h0", group="g").acquire()
    with pytest.raises(CoordinatorError, match="no status"):
        await FleetLockCoordinator(url, host_id="h0", group="g").status()


async def test_no_server_is_unavailable() -> None:
    from .etcd_server import free_port

    gone = FleetLockCoordinator(f"http://127.0.0.1:{free_port()}", host_id="h0", group="g")
    with pytest.raises(CoordinatorUnavailable):
        await gone.acquire()
    with pytest.raises(CoordinatorUnavailable):
        await gone.release()
