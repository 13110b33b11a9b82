"""The systemd reboot strategy's hand-over to PID 1, and what Check() says about strategies.

systemd >= 261 carries a service's fd store through a kexec when the unit has
``FileDescriptorStorePreserve=yes``; the agent's outgoing session fds travel that way
(docs/architecture.md, "systemd 262 and /dev/liveupdate").  Three things can make PID 1 lose them
without telling anyone, so each is checked before the kexec is asked for:

* no kexec image: systemd-shutdown's ``reboot(KEXEC)`` fails and it falls back to an ordinary
  reboot, which carries nothing;
* a full fd store: ``FDSTORE=1`` is not acknowledged and PID 1 drops what does not fit;
* an unprocessed ``FDSTORE=1``: the barrier in ``entrust`` waits for PID 1 first.

Then ``kexec.target`` is started, as ``systemctl kexec`` does: an orderly shutdown, this agent
stopped on the way with its sessions left in the store.  Any refusal before PID 1 took the job
gives the sessions back to the agent (``reclaim``): the update stays prepared.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Final

from luo_agent.errors import LuoError
from luo_agent.kernel.backend import KernelBackend
from luo_agent.kernel.syscalls import KEXEC_LOADED_PATH

from .systemd.gate import Gate

# The first systemd whose PID 1 carries fd stores (with LUO session fds) through a kexec.
SYSTEMD_CARRIES_FD_STORES: Final = 261

NO_KEXEC_IMAGE: Final = (
    f"no kexec image is loaded ({KEXEC_LOADED_PATH} is not 1): PID 1 would fall back to an "
    "ordinary reboot and the update would be lost (LoadKernel again)"
)


class HandOverRefused(LuoError):
    """PID 1 could not be trusted with the outgoing sessions; the agent keeps them."""


def missing_kexec_image(kernel: KernelBackend | None) -> str:
    """Why PID 1 could not kexec right now ("" if an image is loaded)."""
    if kernel is None or kernel.kexec_image_loaded():
        return ""
    return NO_KEXEC_IMAGE


async def hand_over_to_pid1(
    gate: Gate,
    *,
    image_loaded: Callable[[], Awaitable[bool]],
    entrust: Callable[[], Awaitable[int]],
    reclaim: Callable[[], Awaitable[None]],
    announce: Callable[[], None],
) -> None:
    """Put the outgoing sessions into the agent's fd store and start ``kexec.target``.

    ``entrust`` pushes the session fds, waits for PID 1 to process them (``BARRIER=1``) and
    returns how many it pushed; ``reclaim`` takes them back; ``announce`` publishes "rebooting"
    before PID 1 starts stopping units (participants' ``ExecStop=`` may look).  Returns only if
    the kexec job ended ``done``; normally PID 1 stops the agent first, which cancels this wait but
    not the job."""
    if not await image_loaded():
        raise HandOverRefused(NO_KEXEC_IMAGE)
    before, _room = await gate.fd_store_fill()
    pushed = await entrust()
    try:
        after, room = await gate.fd_store_fill()
        if after < before + pushed:
            raise HandOverRefused(
                f"the fd store holds {after} fds after {pushed} outgoing sessions went in on top "
                f"of {before} (FileDescriptorStoreMax={room}): PID 1 dropped some, raise "
                "FileDescriptorStoreMax="
            )
        announce()
        await gate.kexec()
    except (LuoError, OSError):
        await reclaim()  # no kexec coming: the store must not carry them into a later one
        raise


def systemd_major(version: str) -> int | None:
    """The major number of a systemd ``Version`` property ("262.1-1", "v252"), or None."""
    number = re.match(r"\s*v?(\d+)", version)
    return int(number.group(1)) if number else None


def direct_strategy_warning(version: str, strategy: str, user_mode: bool) -> str:
    """A Check() warning for ``direct`` under a PID 1 that carries fd stores through its own
    kexecs: the agent's ``reboot(KEXEC)`` bypasses it, so other units lose what they keep.
    ``version`` is PID 1's (``""`` if unknown)."""
    major = systemd_major(version)
    if strategy != "direct" or user_mode or major is None or major < SYSTEMD_CARRIES_FD_STORES:
        return ""
    return (
        f"reboot_strategy=direct bypasses PID 1 (systemd {version}): other units' fd stores "
        "(FileDescriptorStorePreserve=yes, LUOSession=) are not carried through the kexec; "
        "reboot_strategy=systemd keeps them (session ABI)"
    )
