"""The etcd coordinator: airlock's counted semaphore, taken and given back by compare-and-swap.

Keys (etcd v3, through its HTTP/JSON gateway: ``/v3/kv/txn``, base64 keys and values):

- ``com.coreos.airlock/groups/<group>/v1/semaphore`` = ``{"total_slots":N,"holders":[sorted ids]}``,
  exactly airlock's key and layout, so hosts run by airlock/Zincati and by this agent count
  against the same slots.  The fleet-wide group, and optionally the host's zone as a group of its
  own: both are taken in ONE transaction (a host holds both or neither).
- ``luo-agent/groups/<group>/v1/halt`` = ``{"reason":…}``: while it exists nobody takes a slot.
- ``luo-agent/groups/<group>/v1/failed`` = ``{"hosts":[sorted ids]}``: hosts whose update failed
  while holding a slot; past the failure budget the same transaction writes the halt key.

Every write compares the version of each key it read (0: absent), like airlock; a lost race is
read again, a bounded number of times.  No lease, no TTL: a slot stays held until released.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ..errors import CoordinatorError, CoordinatorInvalid, CoordinatorUnavailable, RolloutHalted
from . import http
from .port import HOLDER_ID_RE, Acquired, FleetStatus, Semaphore

SEMAPHORE_KEY: Final = "com.coreos.airlock/groups/{group}/v1/semaphore"
HALT_KEY: Final = "luo-agent/groups/{group}/v1/halt"
FAILED_KEY: Final = "luo-agent/groups/{group}/v1/failed"
# Compare-and-swap rounds lost to other hosts before giving up for this attempt.
CAS_ROUNDS: Final = 32
# gRPC codes the gateway passes on that mean "ask another member".
_TRY_ANOTHER: Final = frozenset({4, 14})  # DEADLINE_EXCEEDED, UNAVAILABLE
# While the cluster elects a leader its live members answer UNAVAILABLE ("leader changed", "no
# leader"); an election takes a few election timeouts (1 s each by default).  Members that
# answered are asked again for this long; members that cannot be reached are not waited for.
ELECTION_GRACE_SECONDS: Final = 5.0


class _ClusterBusy(CoordinatorUnavailable):
    """A member answered, but cannot serve now (an election, a request timed out inside etcd)."""


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@dataclass(frozen=True, slots=True)
class Stored:
    """One key as read: its value (None when absent) and its version (0 when absent)."""

    value: bytes | None
    version: int


@dataclass(frozen=True, slots=True)
class Put:
    key: str
    value: str


@dataclass(frozen=True, slots=True)
class Delete:
    key: str


class EtcdGateway:
    """etcd's v3 HTTP/JSON gateway on a list of members, tried in turn (a dead one is skipped)."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        tls: ssl.SSLContext | None = None,
        username: str = "",
        password_file: Path | None = None,
    ) -> None:
        if not endpoints:
            raise CoordinatorError("no etcd endpoint configured")
        self._endpoints = [http.Endpoint.parse(url) for url in endpoints]
        self._tls = tls
        self._username = username
        self._password_file = password_file
        self._token = ""
        self._first = 0  # the member that answered last is asked first

    @property
    def describe(self) -> str:
        return ",".join(e.url for e in self._endpoints)

    async def _authenticate(self, endpoint: http.Endpoint) -> None:
        assert self._password_file is not None
        password = http.check_secret_file(self._password_file, "fleet.password_file").read_text()
        answer = await http.request(
            endpoint,
            "POST",
            "/v3/auth/authenticate",
            {"name": self._username, "password": password.rstrip("\n")},
            tls=self._tls,
        )
        body = answer.json()
        if answer.status != 200 or not isinstance(body, dict) or not body.get("token"):
            raise CoordinatorUnavailable(f"{endpoint.url}: etcd refused user {self._username!r}")
        self._token = str(body["token"])

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """Every member in turn; again, backing off, while a live member says the cluster is
        busy.  Every request made here is safe to repeat: writes compare versions."""
        grace_ends = time.monotonic() + ELECTION_GRACE_SECONDS
        delay = 0.05
        while True:
            errors, busy = [], False
            count = len(self._endpoints)
            for offset in range(count):
                index = (self._first + offset) % count
                endpoint = self._endpoints[index]
                try:
                    answer = await self._call_one(endpoint, path, body)
                except CoordinatorUnavailable as exc:
                    errors.append(str(exc))
                    busy = busy or isinstance(exc, _ClusterBusy)
                    continue
                self._first = index
                return answer
            if not busy or time.monotonic() + delay > grace_ends:
                raise CoordinatorUnavailable("no etcd member answered: " + "; ".join(errors))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _call_one(
        self, endpoint: http.Endpoint, path: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        for _ in range(2):  # a second time only after a fresh token
            if self._username and not self._token:
                await self._authenticate(endpoint)
            headers = {"Authorization": self._token} if self._token else {}
            answer = await http.request(
                endpoint, "POST", path, body, headers=headers, tls=self._tls
            )
            reply = answer.json()
            if not isinstance(reply, dict):
                raise CoordinatorInvalid(f"{endpoint.url}: etcd answered {reply!r}")
            if answer.status == 200:
                return reply
            code, message = reply.get("code"), str(reply.get("message") or reply.get("error"))
            if self._username and "auth token" in message:
                self._token = ""
                continue
            if code in _TRY_ANOTHER or answer.status in (502, 503, 504):
                raise _ClusterBusy(f"{endpoint.url}: {message}")
            raise CoordinatorError(f"{endpoint.url}: etcd refused {path}: {message}")
        raise CoordinatorUnavailable(f"{endpoint.url}: etcd keeps refusing the auth token")

    async def read(self, keys: Sequence[str]) -> dict[str, Stored]:
        """Several keys in one consistent snapshot (a transaction of ranges)."""
        reply = await self.call(
            "/v3/kv/txn", {"success": [{"request_range": {"key": _b64(k)}} for k in keys]}
        )
        responses = reply.get("responses")
        if not isinstance(responses, list) or len(responses) != len(keys):
            raise CoordinatorInvalid(f"etcd answered a read of {len(keys)} keys with {reply!r}")
        out = {}
        for key, response in zip(keys, responses, strict=True):
            kvs = (response.get("response_range") or {}).get("kvs") or []
            if not kvs:
                out[key] = Stored(None, 0)
                continue
            try:
                value = base64.b64decode(kvs[0].get("value", ""), validate=True)
                version = int(kvs[0]["version"])
            except (ValueError, KeyError, TypeError) as exc:
                raise CoordinatorInvalid(f"etcd answered key {key!r} with garbage: {exc}") from None
            out[key] = Stored(value, version)
        return out

    async def swap(self, expect: dict[str, int], writes: Sequence[Put | Delete]) -> bool:
        """Apply ``writes`` if every key still has the version read; False if someone was first."""
        compare = [
            {"key": _b64(key), "target": "VERSION", "result": "EQUAL", "version": str(version)}
            for key, version in expect.items()
        ]
        success = [
            {"request_put": {"key": _b64(w.key), "value": _b64(w.value)}}
            if isinstance(w, Put)
            else {"request_delete_range": {"key": _b64(w.key)}}
            for w in writes
        ]
        reply = await self.call("/v3/kv/txn", {"compare": compare, "success": success})
        return reply.get("succeeded") is True


class EtcdCoordinator:
    """The port over etcd (module docstring).  ``zone`` empty: the fleet-wide group only."""

    def __init__(
        self,
        gateway: EtcdGateway,
        *,
        host_id: str,
        group: str,
        slots: int,
        zone: str = "",
        zone_slots: int = 1,
        failure_budget: int = 0,
    ) -> None:
        if not HOLDER_ID_RE.match(host_id):
            raise CoordinatorError(f"host id {host_id!r} cannot be a holder")
        self._gateway = gateway
        self._host_id = host_id
        self._group = group
        self._groups = {group: slots} | ({zone: zone_slots} if zone else {})
        self._failure_budget = failure_budget
        self._halt_key = HALT_KEY.format(group=group)
        self._failed_key = FAILED_KEY.format(group=group)

    @property
    def host_id(self) -> str:
        return self._host_id

    @property
    def describe(self) -> str:
        return f"etcd {self._gateway.describe} groups {','.join(self._groups)}"

    def _semaphore_keys(self) -> dict[str, str]:
        return {SEMAPHORE_KEY.format(group=g): g for g in self._groups}

    async def _snapshot(self) -> tuple[dict[str, Stored], dict[str, Semaphore], str, list[str]]:
        keys = self._semaphore_keys()
        stored = await self._gateway.read([*keys, self._halt_key, self._failed_key])
        semaphores = {}
        for key, group in keys.items():
            value = stored[key].value
            semaphores[key] = (
                Semaphore(group, self._groups[group], ())
                if value is None
                else Semaphore.from_json(group, value)
            )
        halted = _halt_reason(stored[self._halt_key].value)
        failed = _failed_hosts(stored[self._failed_key].value)
        return stored, semaphores, halted, failed

    async def acquire(self) -> Acquired:
        for _ in range(CAS_ROUNDS):
            stored, semaphores, halted, _failed = await self._snapshot()
            if halted:
                raise RolloutHalted(f"the rollout of group {self._group!r} is halted: {halted}")
            if all(self._host_id in s.holders for s in semaphores.values()):
                return Acquired.HELD
            if any(s.full and self._host_id not in s.holders for s in semaphores.values()):
                return Acquired.FULL
            expect = {key: stored[key].version for key in semaphores} | {self._halt_key: 0}
            writes = [
                Put(key, s.with_holder(self._host_id).to_json()) for key, s in semaphores.items()
            ]
            if await self._gateway.swap(expect, writes):
                return Acquired.HELD
        raise CoordinatorUnavailable(f"lost {CAS_ROUNDS} compare-and-swap rounds in a row")

    async def release(self) -> None:
        await self._remove_holder(self._host_id)

    async def force_release(self, host_id: str) -> None:
        if not HOLDER_ID_RE.match(host_id):
            raise CoordinatorError(f"{host_id!r} cannot be a holder")
        await self._remove_holder(host_id, forget_failure=True)

    async def _remove_holder(self, host_id: str, *, forget_failure: bool = False) -> None:
        for _ in range(CAS_ROUNDS):
            stored, semaphores, _halted, failed = await self._snapshot()
            held = {k: s for k, s in semaphores.items() if host_id in s.holders}
            writes: list[Put | Delete] = [
                Put(k, s.without_holder(host_id).to_json()) for k, s in held.items()
            ]
            expect = {key: stored[key].version for key in held}
            if forget_failure and host_id in failed:
                writes.append(
                    Put(self._failed_key, _failed_json(h for h in failed if h != host_id))
                )
                expect[self._failed_key] = stored[self._failed_key].version
            if not writes or await self._gateway.swap(expect, writes):
                return
        raise CoordinatorUnavailable(f"lost {CAS_ROUNDS} compare-and-swap rounds in a row")

    async def report_failure(self, reason: str) -> bool:
        for _ in range(CAS_ROUNDS):
            stored, _semaphores, halted, failed = await self._snapshot()
            hosts = sorted({*failed, self._host_id})
            writes: list[Put | Delete] = [Put(self._failed_key, _failed_json(hosts))]
            now_halted = bool(halted) or len(hosts) > self._failure_budget
            if now_halted and not halted:
                why = (
                    f"{len(hosts)} host(s) failed (budget {self._failure_budget}); "
                    f"last {self._host_id}: {reason}"
                )
                writes.append(Put(self._halt_key, json.dumps({"reason": why})))
            expect = {self._failed_key: stored[self._failed_key].version}
            expect[self._halt_key] = stored[self._halt_key].version
            if await self._gateway.swap(expect, writes):
                return now_halted
        raise CoordinatorUnavailable(f"lost {CAS_ROUNDS} compare-and-swap rounds in a row")

    async def status(self) -> FleetStatus:
        _stored, semaphores, halted, failed = await self._snapshot()
        return FleetStatus(self._host_id, tuple(semaphores.values()), halted, tuple(failed))

    async def halt(self, reason: str) -> None:
        await self._gateway.swap({}, [Put(self._halt_key, json.dumps({"reason": reason}))])

    async def resume(self) -> None:
        await self._gateway.swap({}, [Delete(self._halt_key), Delete(self._failed_key)])

    async def set_max(self, total_slots: int, *, zone: bool = False) -> None:
        if total_slots < 1:
            raise CoordinatorError("a semaphore needs at least one slot")
        groups = list(self._groups)
        if zone and len(groups) < 2:
            raise CoordinatorError("this host has no zone configured")
        key = SEMAPHORE_KEY.format(group=groups[1] if zone else groups[0])
        for _ in range(CAS_ROUNDS):
            stored, semaphores, _halted, _failed = await self._snapshot()
            current = semaphores[key]
            changed = Semaphore(current.group, total_slots, current.holders)
            if await self._gateway.swap({key: stored[key].version}, [Put(key, changed.to_json())]):
                return
        raise CoordinatorUnavailable(f"lost {CAS_ROUNDS} compare-and-swap rounds in a row")


def _halt_reason(raw: bytes | None) -> str:
    if raw is None:
        return ""
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        value = None
    # A halt key that does not parse still halts: its presence is what counts.
    reason = value.get("reason") if isinstance(value, dict) else None
    return str(reason) if reason else "halted (no reason given)"


def _failed_hosts(raw: bytes | None) -> list[str]:
    if raw is None:
        return []
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise CoordinatorInvalid("the failed-hosts key is not JSON") from None
    hosts = value.get("hosts") if isinstance(value, dict) else None
    if not isinstance(hosts, list) or not all(
        isinstance(h, str) and HOLDER_ID_RE.match(h) for h in hosts
    ):
        raise CoordinatorInvalid(f"the failed-hosts key does not parse: {value!r}")
    return sorted(set(hosts))


def _failed_json(hosts: Any) -> str:
    return json.dumps({"hosts": sorted(set(hosts))}, separators=(",", ":"))
