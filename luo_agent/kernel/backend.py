"""The agent's view of the kernel: one phase-level backend per ABI generation (design.md §3 table).

| step     | rfc-v2                 | v3                      | session                      |
|----------|------------------------|-------------------------|------------------------------|
| preserve | FD_PRESERVE (kernel    | FD_PRESERVE (agent-made | CREATE_SESSION + PRESERVE_FD |
|          | makes the tokens)      | global tokens)          | per client session, + our own|
| prepare  | EVENT_PREPARE          | SET_EVENT(PREPARE)      | nothing: preserving is it    |
| freeze   | EVENT_FREEZE           | (inside reboot)         | barrier only                 |
| reboot   | reboot(KEXEC)          | reboot(KEXEC)           | reboot(KEXEC), sessions open |
| cancel   | EVENT_CANCEL +         | SET_EVENT(CANCEL) +     | close the outgoing sessions  |
|          | FD_UNPRESERVE          | FD_UNPRESERVE           |                              |
| finish   | EVENT_FINISH           | SET_EVENT(FINISH)       | FINISH + close each incoming |

The agent's own metadata (update id, (session, token) → kernel token, timings) travels in a memfd
preserved like any client file, so the new boot's agent learns the update from the kernel.  Backends
are synchronous (ioctls); the agent runs them on its kernel thread.

This module is the port (``KernelBackend``, what it is given and answers) and the metadata memfd
that every backend carries; the backends are in ``session_backend`` (6.19+) and
``global_list_backends`` (rfc-v2, v3).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Final, Protocol

from ..records import METADATA_CAPACITY, UpdateRecord, decode_metadata, encode_metadata
from .device import Abi, GlobalState
from .syscalls import Syscalls

AGENT_SESSION: Final = "luo-agent"  # the agent's own session on the session ABI
METADATA_TOKEN: Final = 0  # token of the metadata memfd in the agent's session / the v3 global list


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What the agent must know of an ABI generation, declared by its backend (design.md §2), so
    that nothing outside ``kernel/`` branches on the ABI's name."""

    # A kexec that fails after the freeze leaves only cancel (rfc-v2's FROZEN is not undone by
    # a retried reboot); elsewhere the kernel is still prepared and Execute may be retried.
    irreversible_freeze: bool
    # The update lives in session fds that PID 1's fd store can carry through an orderly kexec
    # (reboot_strategy=systemd); the state-machine ABIs keep it in the device fd instead.
    pid1_can_carry: bool
    # The kernel may publish its global state in /sys/kernel/liveupdate/state.
    sysfs_state: bool


@dataclass(frozen=True, slots=True)
class PreserveItem:
    session: str
    token: int
    fd: int


@dataclass(frozen=True, slots=True)
class BootState:
    """What the kernel says when the agent starts."""

    kernel_state: GlobalState | None  # None on the session ABI (no global state)
    # The update this boot continues: set after a live-update boot that carried our metadata.
    incoming: UpdateRecord | None = None
    # A state-machine kernel left PREPARED/FROZEN with nothing of ours (the agent crashed).
    stale_prepared: bool = False
    notes: tuple[str, ...] = ()


class FdCustody(Protocol):
    """Somewhere session fds outlive the agent's process (systemd's fd store): see
    ``luo_agent.systemd.fdstore``."""

    def inherited(self) -> dict[str, int]:
        """Incoming session fds handed back, by session name: kept by a previous instance of
        the agent in this boot, or carried through the kexec by PID 1 (the systemd strategy)."""
        ...

    def keep(self, name: str, fd: int) -> None:
        """Keep an incoming session (best effort: the agent holds it too)."""
        ...

    def drop(self, name: str) -> None:
        """The incoming session is finished: forget it, under whichever name it was kept."""
        ...

    def keep_outgoing(self, name: str, fd: int) -> None:
        """Keep an outgoing session through the kexec (the systemd strategy); raises OSError if
        the fd could not be handed over, since the update would then be lost."""
        ...

    def drop_outgoing(self, name: str) -> None:
        """Take back an outgoing session kept for a kexec that did not happen."""
        ...

    def sync(self) -> None:
        """Return once the keeper has processed every fd handed to it so far (sd_notify's
        ``BARRIER=1``); raises OSError if it does not answer."""
        ...


class NoCustody:
    """Nothing outlives the process (tests, an agent not run by systemd)."""

    def inherited(self) -> dict[str, int]:
        return {}

    def keep(self, name: str, fd: int) -> None:
        pass

    def drop(self, name: str) -> None:
        pass

    def keep_outgoing(self, name: str, fd: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "no fd store to keep outgoing sessions in")

    def drop_outgoing(self, name: str) -> None:
        pass

    def sync(self) -> None:
        pass


class KernelBackend(Protocol):
    abi: Abi
    capabilities: ClassVar[Capabilities]

    def start(self) -> BootState: ...

    def preserve(
        self, items: Sequence[PreserveItem], record: UpdateRecord
    ) -> dict[tuple[str, int], int]:
        """Preserve the agent's metadata memfd (made from ``record``) and ``items``; all or
        nothing.  Returns the kernel token of every item."""
        ...

    def prepare(self) -> None: ...

    def freeze(self) -> None: ...

    def update_metadata(self, record: UpdateRecord) -> None: ...

    def reboot(self) -> None: ...

    def entrust_outgoing(self) -> int:
        """Hand every outgoing handle to the custody so it survives the agent through a kexec
        by PID 1 (the systemd strategy), and return how many; only the session ABI can."""
        ...

    def reclaim_outgoing(self) -> None:
        """Undo ``entrust_outgoing`` (the kexec was not done); the update stays prepared."""
        ...

    def cancel(self) -> None: ...

    def adopt(self, record: UpdateRecord) -> None:
        """Take over the kernel tokens of an update found in ``current.json`` after a restart."""
        ...

    def take_over_carried(self, record: UpdateRecord) -> bool:
        """This is ``record``'s live-update boot, but the agent's own handover is gone (an agent
        of this boot took it and died before keeping it): take the carried files that
        ``record`` (the durable in-flight copy) names.  False when none is carried, and where
        the handover cannot be lost that way (the state-machine ABIs keep it in the kernel's
        global state)."""
        ...

    def retrieve(self, session: str, token: int) -> int: ...

    def finish(self) -> list[str]:
        """Finish every carried item; return the problems that were left for the next cycle."""
        ...

    def load_kernel(self, kernel_fd: int, initrd_fd: int, cmdline: str) -> None: ...

    def unload_kernel(self) -> None:
        """Take the kexec image out of the kernel (``KEXEC_FILE_UNLOAD``)."""
        ...

    def kexec_image_loaded(self) -> bool:
        """Whether a kexec image is loaded (by anyone), i.e. ``reboot(KEXEC)`` can jump."""
        ...

    def describe_state(self) -> str: ...

    def command_line(self) -> str:
        """The running kernel's command line (``/proc/cmdline`` of the real or emulated machine;
        "" if unreadable): the agent's ``luo_agent.update=`` marker says which update booted it."""
        ...

    def close(self) -> None: ...


def new_metadata_memfd(record: UpdateRecord) -> int:
    fd = os.memfd_create("luo-agent-metadata", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, METADATA_CAPACITY)
        write_metadata(fd, record)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_metadata(fd: int, record: UpdateRecord) -> None:
    blob = encode_metadata(record)
    os.pwrite(fd, blob, 0)


def read_metadata(fd: int) -> UpdateRecord:
    blob = os.pread(fd, METADATA_CAPACITY, 0)
    return decode_metadata(blob)


class MetadataMemfd:
    """Mixin of every backend: the agent's metadata memfd, rewritten in place until the kexec,
    and the running kernel's command line."""

    syscalls: Syscalls
    _meta_fd: int = -1

    def command_line(self) -> str:
        try:
            with open(self.syscalls.path("/proc/cmdline")) as f:
                return f.read().strip()
        except OSError:
            return ""

    def update_metadata(self, record: UpdateRecord) -> None:
        # The memfd stays writable after preservation; the kernel carries its bytes at the kexec.
        if self._meta_fd >= 0:
            write_metadata(self._meta_fd, record)

    def _drop_metadata(self) -> None:
        if self._meta_fd >= 0:
            os.close(self._meta_fd)
            self._meta_fd = -1
