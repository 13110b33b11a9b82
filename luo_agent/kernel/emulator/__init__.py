"""The emulated LUO kernel: a kernel server process per emulated boot (``server``: device and
session sockets; ``control``: the control socket's ops; ``process``: logging, signals, the ready
pipe), the ``Syscalls`` implementation that talks to it (``EmulatedSyscalls``) and machine
control (``EmulatedMachine``).  Contract: ``docs/emulator.md``; behaviour: the LUO uAPI reference
(``kernel-abi.md`` in the design documents).

Emulator choices (where the kernel cannot be copied exactly):

* Logging: the server logs to ``root/.luo-emu/kernel.log`` (the machine's dmesg);
  ``LUO_EMU_DEBUG=1`` adds every failed ioctl.  Lines are written once the server has been idle
  for 2 ms, not before the reply that caused them (warnings and errors at once, and all of them
  before a control request is answered): a file write per line would slow every emulated call.
* G1 tokens: a counter from 1 per cold boot, never repeating within a boot; a live-update boot
  continues after the largest carried token.  EACCES for non-CAP_SYS_ADMIN callers is not
  emulated; LIVEUPDATE_IOCTL_SELFTESTS (a debugfs ioctl) is ENOTTY on the device.
* G1/G3: restoring the same token twice is EINVAL (6.19 RETRIEVE_FD is idempotent instead);
  G3 preserve checks state (EBUSY), then token (EEXIST), then fd (EBADF), then file type
  (ENOENT); G1 resolves the fd first (EBADF), as RFC v2's ioctl does, then state, then type.
  G3 close of the device drops only outgoing files; carried ones wait for FINISH.
* Session g6 profile: a copy of Linux 7.2 (docs/emulator.md, "The g6 profile is Linux 7.2").
* Session 6.19 profile: wrong-kind PRESERVE_FD/RETRIEVE_FD/FINISH are EINVAL after the size
  checks (kernel-abi.md §7.3 "fixed behaviour"); on g6 at the dispatcher's kind step.
* Frozen memfd size: the size at PRESERVE is carried (cut or zero-extended, logged if changed);
  7.2 refuses the resize (EPERM), which the emulator cannot.  File identity for double
  preservation is the inode.  g6 carries the seals recorded at PRESERVE; 6.19 none.
* Kexec holds a memfd of 1 MiB or more in place (a keeper process keeps its open file for the next
  boot, ``handover``) when a fresh memfd with the carried seals would look the same; the rest is
  copied through the handover image.
* Corrupt handover image: moved to ``handover.img.rejected``; rfc-v2/v3 "panic" (boot() raises
  HandoverCorrupt, the next boot is cold); session boots with every device open failing EIO.
* After a kexec or power-off, ioctls on old emulator fds raise EIO; opening the device and the
  control ops raise ENOENT.  ``poweroff()`` also discards a handover image not yet booted.
* One ioctl at a time per emulator fd: two processes issuing ioctls on the *same* session fd
  concurrently may read each other's replies.
"""

from __future__ import annotations

from .client import EmulatedSyscalls
from .machine import EmulatedMachine

__all__ = ["EmulatedMachine", "EmulatedSyscalls"]
