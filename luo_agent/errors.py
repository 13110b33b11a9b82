"""The domain error tree.  Adapters translate into these; the D-Bus boundary and the CLI
translate out of them (names and exit codes live there, not here)."""

from __future__ import annotations

import errno as _errno
import os
from enum import StrEnum


class ErrorCode(StrEnum):
    """What an ended update's record says went wrong (``UpdateRecord.error_name``), in the
    domain's words; the D-Bus adapter alone names it ``org.luoagent.LiveUpdate1.Error.<code>``."""

    KERNEL_ERROR = "KernelError"
    PARTICIPANT_FAILED = "ParticipantFailed"
    TIMED_OUT = "TimedOut"
    COORDINATOR_ERROR = "CoordinatorError"
    ABORTED = "Aborted"
    CANCELLED = "Cancelled"
    FINISHED_WITH_LOSSES = "FinishedWithLosses"
    HANDOVER_LOST = "HandoverLost"


class LuoError(Exception):
    """Base of every error the agent reports on purpose."""


class ConfigError(LuoError):
    def __init__(self, path: str, key: str, reason: str) -> None:
        super().__init__(f"{path}: {key}: {reason}")
        self.path, self.key, self.reason = path, key, reason


class InvalidArgument(LuoError):
    """A caller's argument is malformed or out of range (checked before the kernel sees it)."""


class KernelError(LuoError):
    """An ioctl, open or syscall on the LUO device failed with ``errno``."""

    def __init__(self, op: str, errno: int, detail: str = "") -> None:
        name = _errno.errorcode.get(errno, str(errno))
        text = f"{op}: {name} ({os.strerror(errno)})"
        super().__init__(f"{text}: {detail}" if detail else text)
        self.op, self.errno, self.detail = op, errno, detail


class DeviceUnavailable(KernelError):
    """No usable /dev/liveupdate (ENOENT/ENODEV/EACCES/EIO on open)."""


class DeviceBusy(KernelError):
    """EBUSY: another process (systemd, another agent) holds the exclusive device."""


class Unsupported(KernelError):
    """The running kernel's ABI has no such operation (or refuses this file type)."""


class NoSuchSession(KernelError):
    """ENOENT for a session name."""


class NoSuchToken(KernelError):
    """ENOENT for a token."""


class AlreadyExists(KernelError):
    """EEXIST: a session name or token is taken."""


class WrongKernelState(KernelError):
    """The kernel refused a transition or an operation in its current state (EINVAL/EBUSY)."""


class PhaseError(LuoError):
    """An event that the phase engine does not accept in the current phase."""

    def __init__(self, phase: str, event: str) -> None:
        super().__init__(f"{event} is not possible in phase {phase}")
        self.phase, self.event = phase, event


class Busy(LuoError):
    """Another update is in progress."""


class UpdateEnded(LuoError):
    """A Prepare named an update that has ended: an id names one update for ever."""

    def __init__(self, update_id: str, result: str, error_name: str, message: str) -> None:
        self.update_id, self.result, self.error_name, self.message = (
            update_id,
            result,
            error_name,
            message,
        )
        super().__init__(self.text(error_name))

    def text(self, error: str) -> str:
        """The refusal, naming the update's error as ``error`` (its code, or a boundary's name
        for it)."""
        message = self.message
        why = f" ({error}: {message})" if error else f" ({message})" if message else ""
        return (
            f"update {self.update_id!r} has ended: {self.result or 'unknown'}{why}; an id names "
            "one update for ever, choose a new one"
        )


class GateError(LuoError):
    """A phase target's job did not end ``done``: which unit failed and why."""

    def __init__(self, target: str, job_result: str, unit: str = "", unit_result: str = "") -> None:
        who = f"; {unit} result {unit_result}" if unit else ""
        super().__init__(f"{target} job ended {job_result}{who}")
        self.target, self.job_result, self.unit, self.unit_result = (
            target,
            job_result,
            unit,
            unit_result,
        )


class NotAuthorized(LuoError):
    def __init__(self, action: str) -> None:
        super().__init__(f"not authorised for {action}")
        self.action = action


class HandoverCorrupt(LuoError):
    """The emulated kernel's handover image failed validation; nothing was loaded."""


class CoordinatorError(LuoError):
    """The fleet coordinator (etcd, a FleetLock server) did not give what the update needs."""


class CoordinatorUnavailable(CoordinatorError):
    """No endpoint of the coordinator answered, or it answered with an error of its own."""


class CoordinatorInvalid(CoordinatorError):
    """The coordinator answered something that cannot be true (garbage, a slot count of 0)."""


class RolloutHalted(CoordinatorError):
    """The fleet's rollout is halted (a failure budget ran out, or an operator said so)."""
