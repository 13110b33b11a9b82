"""Value types of an update as the agent records it, and their byte formats.

Three places hold them: the metadata memfd that travels through the kexec inside the kernel (so the
new boot's agent learns the update from the kernel, not from disk), ``current.json`` under the
runtime directory (so an agent restarted in the same boot finds what it was doing) and the history
file under the state directory (what happened, kept across reboots).
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any, Final, Self

from .errors import HandoverCorrupt

METADATA_MAGIC: Final = b"LUOAGNT1"
METADATA_VERSION: Final = 1
_HEADER: Final = struct.Struct("<8sII")  # magic, version, payload length
# The metadata memfd's size is frozen once preserved, so it is created at its final size.
METADATA_CAPACITY: Final = 1 << 20


@dataclass(frozen=True, slots=True)
class PreservedFd:
    session: str
    token: int
    owner: str = ""
    # The token the kernel knows the file by: equal to ``token`` on the session ABI, the
    # agent's or the kernel's global token on the state-machine ABIs.
    kernel_token: int = 0
    depends_on: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True, slots=True)
class PhaseTiming:
    phase: str
    started: float  # CLOCK_REALTIME seconds
    ended: float | None = None
    monotonic_start: float = 0.0
    monotonic_end: float | None = None

    @property
    def duration(self) -> float | None:
        if self.monotonic_end is not None:
            return self.monotonic_end - self.monotonic_start
        # A phase that ended in another boot (the monotonic clock restarts at a kexec): only the
        # wall clocks compare.
        return None if self.ended is None else self.ended - self.started


@dataclass(frozen=True, slots=True)
class UpdateRecord:
    id: str
    abi: str
    started_by: str = ""
    started_at: float = field(default_factory=time.time)
    phase: str = "idle"
    result: str = ""  # "", "success", "failed", "cancelled", "aborted"
    error_name: str = ""  # an ``ErrorCode`` ("" for none); the D-Bus adapter adds the bus's prefix
    message: str = ""
    timings: tuple[PhaseTiming, ...] = ()
    preserved: tuple[PreservedFd, ...] = ()
    kernel_cmdline: str = ""
    boot_count: int = 0  # how many live-update boots this update went through
    # Seconds from the freeze gate's job completing to the kexec reboot call: the agent's share of
    # the blackout (-1 until measured).
    blackout_critical: float = -1.0
    # The fleet slot this update took before its freeze ("<host id> @ <coordinator>"), carried
    # through the kexec, and when it was given back (0: not, or not yet; docs/fleet.md).
    fleet_slot: str = ""
    slot_released_at: float = 0.0

    def with_phase(
        self,
        phase: str,
        now: float | None = None,
        mono: float | None = None,
        *,
        new_boot: bool = False,
    ) -> Self:
        """Enters ``phase``, ending the open one; ``new_boot``: that one began before the kexec,
        on another monotonic clock.  Entering the phase the update is in already (the kexec path,
        the new boot's first announcement) is no new phase: one timing per phase entered."""
        if phase == self.phase and self.timings:
            return self
        now = time.time() if now is None else now
        mono = time.monotonic() if mono is None else mono
        timings = list(self.timings)
        if timings and timings[-1].ended is None:
            timings[-1] = replace(timings[-1], ended=now, monotonic_end=None if new_boot else mono)
        timings.append(PhaseTiming(phase, now, monotonic_start=mono))
        return replace(self, phase=phase, timings=tuple(timings))

    def ended(self, result: str, error_name: str = "", message: str = "") -> Self:
        now, mono = time.time(), time.monotonic()
        timings = list(self.timings)
        if timings and timings[-1].ended is None:
            timings[-1] = replace(timings[-1], ended=now, monotonic_end=mono)
        return replace(
            self, result=result, error_name=error_name, message=message, timings=tuple(timings)
        )

    def to_json(self) -> dict[str, Any]:
        # By hand rather than asdict(): asdict deep-copies every preserved entry, which made each
        # save cost milliseconds with hundreds of fds.  Same keys, same values.
        data = {name: getattr(self, name) for name in _FIELD_NAMES}
        data["timings"] = tuple(_timing_json(t) for t in self.timings)
        data["preserved"] = tuple(_preserved_json(self.preserved))
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UpdateRecord:
        try:
            timings = tuple(PhaseTiming(**t) for t in data.get("timings", ()))
            preserved = tuple(
                PreservedFd(
                    session=p["session"],
                    token=int(p["token"]),
                    owner=p.get("owner", ""),
                    kernel_token=int(p.get("kernel_token", 0)),
                    depends_on=tuple((str(s), int(t)) for s, t in p.get("depends_on", ())),
                )
                for p in data.get("preserved", ())
            )
            fields = {k: v for k, v in data.items() if k not in ("timings", "preserved")}
            if "error_name" in fields:
                fields["error_name"] = error_code(fields["error_name"])
            return cls(**fields, timings=timings, preserved=preserved)
        except (TypeError, KeyError, ValueError) as exc:
            raise ValueError(f"malformed update record: {exc}") from None


def error_code(stored: str) -> str:
    """The ``ErrorCode`` a record's ``error_name`` holds.  Records written before the agent stored
    codes (until 2026-12) hold the bus's name, ``org.luoagent.LiveUpdate1.Error.<code>``: a code
    has no dot, so the name's last component is the code."""
    return str(stored).rpartition(".")[2]


_FIELD_NAMES: Final = tuple(f.name for f in fields(UpdateRecord))
_SCALAR_FIELDS: Final = tuple(n for n in _FIELD_NAMES if n not in ("timings", "preserved"))


_TIMING_FIELDS: Final = tuple(f.name for f in fields(PhaseTiming))


def _timing_json(timing: PhaseTiming) -> dict[str, Any]:
    return {name: getattr(timing, name) for name in _TIMING_FIELDS}


def _preserved_json(preserved: tuple[PreservedFd, ...]) -> list[dict[str, Any]]:
    return [
        {
            "session": p.session,
            "token": p.token,
            "owner": p.owner,
            "kernel_token": p.kernel_token,
            "depends_on": p.depends_on,
        }
        for p in preserved
    ]


# The last preserved list encoded for the metadata memfd, by identity: it is fixed once prepare
# has run, and re-encoding it would make the pwrite before the kexec O(preserved fds).
_encoded_preserved: tuple[tuple[PreservedFd, ...], str] = ((), "[]")


def _encode_preserved(preserved: tuple[PreservedFd, ...]) -> str:
    global _encoded_preserved
    cached, text = _encoded_preserved
    if preserved is not cached:
        text = json.dumps(_preserved_json(preserved), separators=(",", ":"))
        _encoded_preserved = (preserved, text)  # one tuple store: safe across threads
    return text


def encode_metadata(record: UpdateRecord) -> bytes:
    head = {name: getattr(record, name) for name in _SCALAR_FIELDS}
    head["timings"] = [_timing_json(t) for t in record.timings]
    text = json.dumps(head, separators=(",", ":"))
    payload = f'{text[:-1]},"preserved":{_encode_preserved(record.preserved)}}}'.encode()
    if _HEADER.size + len(payload) > METADATA_CAPACITY:
        raise ValueError("update metadata does not fit the metadata memfd")
    return _HEADER.pack(METADATA_MAGIC, METADATA_VERSION, len(payload)) + payload


def decode_metadata(blob: bytes) -> UpdateRecord:
    if len(blob) < _HEADER.size:
        raise HandoverCorrupt("agent metadata is shorter than its header")
    magic, version, length = _HEADER.unpack_from(blob)
    if magic != METADATA_MAGIC:
        raise HandoverCorrupt("agent metadata has a wrong magic")
    if version != METADATA_VERSION:
        raise HandoverCorrupt(f"agent metadata version {version} is not supported")
    payload = blob[_HEADER.size : _HEADER.size + length]
    if len(payload) != length:
        raise HandoverCorrupt("agent metadata is truncated")
    try:
        return UpdateRecord.from_json(json.loads(payload))
    except ValueError as exc:
        raise HandoverCorrupt(f"agent metadata is unreadable: {exc}") from None
