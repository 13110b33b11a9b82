"""The FleetLock coordinator: Zincati's protocol, for sites that run a FleetLock server (airlock,
poseidon/fleetlock).

``POST {base}/v1/pre-reboot`` takes a slot, ``POST {base}/v1/steady-state`` gives it back, with the
header ``fleet-lock-protocol: true`` and the body ``{"client_params":{"id":…,"group":…}}``.  Only
200 is success: a full semaphore is 500 ``failed_lock`` on airlock and 423 ``lock_held`` on
poseidon/fleetlock; any answer with an error kind means "not now".  The client keeps no state and
both calls may repeat.  The protocol has no status, halt or slot count: the server's operator
does those, and the failure budget is the server's (a failed host simply keeps its slot).
"""

from __future__ import annotations

import ssl
from typing import Any

from ..errors import CoordinatorError, CoordinatorInvalid, CoordinatorUnavailable
from . import http
from .port import HOLDER_ID_RE, Acquired, FleetStatus

PROTOCOL_HEADER = {"fleet-lock-protocol": "true"}


class FleetLockCoordinator:
    def __init__(
        self, base_url: str, *, host_id: str, group: str, tls: ssl.SSLContext | None = None
    ) -> None:
        if not HOLDER_ID_RE.match(host_id):
            raise CoordinatorError(f"host id {host_id!r} cannot be a holder")
        self._endpoint = http.Endpoint.parse(base_url)
        self._host_id = host_id
        self._group = group
        self._tls = tls

    @property
    def host_id(self) -> str:
        return self._host_id

    @property
    def describe(self) -> str:
        return f"FleetLock {self._endpoint.url} group {self._group}"

    async def _post(self, path: str) -> tuple[int, Any]:
        body = {"client_params": {"id": self._host_id, "group": self._group}}
        answer = await http.request(
            self._endpoint, "POST", path, body, headers=PROTOCOL_HEADER, tls=self._tls
        )
        if answer.status == 200:
            return 200, None
        reply = answer.json()
        if not isinstance(reply, dict) or not isinstance(reply.get("kind"), str):
            raise CoordinatorInvalid(
                f"{self._endpoint.url}{path}: HTTP {answer.status} without an error kind"
            )
        return answer.status, reply

    async def acquire(self) -> Acquired:
        status, reply = await self._post("/v1/pre-reboot")
        if status == 200:
            return Acquired.HELD
        if status >= 500 and reply["kind"] != "failed_lock":
            raise CoordinatorUnavailable(f"{self.describe}: {reply['kind']}: {reply.get('value')}")
        if 400 <= status < 500 and status != 423:
            # A bad identity or group is not fixed by asking again.
            raise CoordinatorError(
                f"{self.describe} refused us: {reply['kind']}: {reply.get('value')}"
            )
        return Acquired.FULL

    async def release(self) -> None:
        status, reply = await self._post("/v1/steady-state")
        if status != 200:
            raise CoordinatorUnavailable(
                f"{self.describe}: steady-state refused: {reply['kind']}: {reply.get('value')}"
            )

    async def report_failure(self, reason: str) -> bool:
        return False  # the slot stays held; halting is the server operator's

    async def status(self) -> FleetStatus:
        raise CoordinatorError("the FleetLock protocol has no status: ask the server's operator")

    async def force_release(self, host_id: str) -> None:
        raise CoordinatorError("the FleetLock protocol releases only its own slot")

    async def halt(self, reason: str) -> None:
        raise CoordinatorError("the FleetLock protocol has no halt")

    async def resume(self) -> None:
        raise CoordinatorError("the FleetLock protocol has no halt")

    async def set_max(self, total_slots: int, *, zone: bool = False) -> None:
        raise CoordinatorError("the FleetLock protocol has no slot count: configure the server")
