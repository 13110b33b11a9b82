"""The global LUO state machine of G1-G3 (kernel-abi.md §5.3) and its global file set.

G1 and G3 differ in numbering (0-based vs 1-based), in their ioctl surface and open/close rules;
the transitions, the preservation rules and what a kexec carries are the same code here.
"""

from __future__ import annotations

import errno
import logging
from enum import StrEnum
from typing import Any, assert_never

from luo_agent.errors import HandoverCorrupt

from . import memfd
from .base import GenerationKernel, Host
from .dispatch import Errno
from .handover import BlobSink, CarriedFile, Image, parse_files

log = logging.getLogger("luo_emu.state")


class State(StrEnum):
    NORMAL = "normal"
    PREPARED = "prepared"
    FROZEN = "frozen"
    UPDATED = "updated"


class Event(StrEnum):
    PREPARE = "PREPARE"
    FREEZE = "FREEZE"
    CANCEL = "CANCEL"
    FINISH = "FINISH"


class StateMachineKernel(GenerationKernel):
    """Global state plus the outgoing (preserved now) and incoming (carried in) file sets."""

    # Per generation: the uapi number of each state.
    STATE_NUMBERS: dict[State, int]

    def __init__(self, host: Host, profile: str | None) -> None:
        super().__init__(host, profile)
        self.state = State.NORMAL
        self.outgoing: dict[int, memfd.PreservedFile] = {}
        self.incoming: dict[int, memfd.PreservedFile] = {}

    # --- transitions ----------------------------------------------------------------------------
    def transition(self, event: Event) -> None:
        """``luo_prepare``/``luo_freeze``/``luo_cancel``/``luo_finish``: wrong state -> EINVAL.

        A fault armed as ``EVENT_<name>`` fails the event's callbacks: the state stays."""
        allowed: tuple[State, ...]
        target: State
        match event:
            case Event.PREPARE:
                allowed, target = (State.NORMAL,), State.PREPARED
            case Event.FREEZE:
                allowed, target = (State.PREPARED,), State.FROZEN
            case Event.CANCEL:
                allowed, target = (State.PREPARED, State.FROZEN), State.NORMAL
            case Event.FINISH:
                allowed, target = (State.UPDATED,), State.NORMAL
            case _:
                assert_never(event)
        if self.state not in allowed:
            raise Errno(errno.EINVAL, f"{event} not allowed in state {self.state}")
        self.faults.check(f"EVENT_{event}")
        if event is Event.FINISH:
            self._discard_incoming()
        log.info("state %s -> %s (%s)", self.state, target, event)
        self.state = target
        self.host.state_changed()

    def _discard_incoming(self) -> None:
        for pf in self.incoming.values():
            if not pf.retrieved:
                log.info("finish: discarding unrestored token %#x", pf.token)
            pf.close()
        self.incoming.clear()

    # --- files ----------------------------------------------------------------------------------
    def check_preserve_state(self) -> None:
        if self.state not in (State.NORMAL, State.UPDATED):
            raise Errno(errno.EBUSY, f"cannot preserve in state {self.state}")

    def unpreserve(self, token: int, allowed: tuple[State, ...]) -> None:
        if self.state not in allowed:
            raise Errno(errno.EBUSY, f"cannot unpreserve in state {self.state}")
        pf = self.outgoing.pop(token, None)
        if pf is None:
            raise Errno(errno.ENOENT, f"token {token:#x} is not preserved")
        pf.close()

    def restore(self, token: int) -> memfd.PreservedFile:
        if self.state is not State.UPDATED:
            raise Errno(errno.EBUSY, f"cannot restore in state {self.state}")
        pf = self.incoming.get(token)
        if pf is None:
            raise Errno(errno.ENOENT, f"token {token:#x} was not carried")
        if pf.retrieved:
            raise Errno(errno.EINVAL, f"token {token:#x} was already restored")
        pf.retrieved = True
        return pf

    def drop_outgoing(self, why: str) -> None:
        for pf in self.outgoing.values():
            pf.close()
        if self.outgoing:
            log.info("%s: dropped %d preserved files", why, len(self.outgoing))
        self.outgoing.clear()

    # --- kexec ----------------------------------------------------------------------------------
    def carries_luo_data(self) -> bool:
        # PREPARED freezes implicitly inside reboot(); FROZEN (G1 only) just proceeds.
        return self.state in (State.PREPARED, State.FROZEN)

    def serialize(self, sink: BlobSink) -> Any:
        if not self.carries_luo_data():
            log.info("kexec in state %s: ordinary kexec, nothing carried", self.state)
            return None
        files = []
        for pf in self.outgoing.values():
            files.append(memfd.carry(pf, sink, seals=0).to_json())
        log.info("kexec in state %s: freezing and carrying %d files", self.state, len(files))
        return {"files": files, **self.extra_handover()}

    def extra_handover(self) -> dict[str, Any]:
        return {}

    def validate_handover(self, luo: Any, image: Image) -> object:
        if luo is None:
            return None
        if not isinstance(luo, dict):
            raise HandoverCorrupt("handover image rejected: luo section is not an object")
        files = parse_files(luo.get("files"), image, "files")
        tokens = [f.token for f in files]
        if len(set(tokens)) != len(tokens):
            raise HandoverCorrupt("handover image rejected: duplicate tokens")
        self.validate_extra(luo)
        return files

    def validate_extra(self, luo: dict[str, Any]) -> None:
        """Per-generation fields of the luo section."""

    def load_handover(self, parsed: object, image: Image) -> None:
        if parsed is None:
            return
        assert isinstance(parsed, list)
        created: list[memfd.PreservedFile] = []
        try:
            for cf in parsed:
                assert isinstance(cf, CarriedFile)
                fd = memfd.incoming_memfd(image, cf)
                created.append(memfd.PreservedFile(cf.token, fd, cf.size))
        except BaseException:
            for pf in created:
                pf.close()
            raise
        self.incoming = {pf.token: pf for pf in created}
        self.state = State.UPDATED
        log.info("live-update boot: state updated, %d files carried", len(created))

    def sysfs_state(self) -> str | None:
        return self.state.value

    def inspect(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "state_value": self.STATE_NUMBERS[self.state],
            "files": [pf.snapshot() for pf in self.outgoing.values()],
            "incoming_files": [pf.snapshot() for pf in self.incoming.values()],
        }

    def shutdown(self) -> None:
        for pf in [*self.outgoing.values(), *self.incoming.values()]:
            pf.close()
        self.outgoing.clear()
        self.incoming.clear()
