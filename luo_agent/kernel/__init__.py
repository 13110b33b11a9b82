"""The kernel adapter: everything said to ``/dev/liveupdate`` and the kexec syscalls.

``backend`` is the port the agent uses (``KernelBackend``, one per ABI generation:
``session_backend``, ``global_list_backends``); ``device``, ``rfc_v2``, ``v3`` and ``session`` are
the devices and their ioctls; ``errnomap`` turns errnos into domain errors once; ``detect``
finds the ABI; ``syscalls`` is the seam (real syscalls or ``emulator/``); ``uapi/`` mirrors the
C headers.  Everything here is synchronous: the agent calls it on its kernel thread.

Imports from the rest of luo_agent only ``errors``, ``records`` and ``persist.write_atomic``;
never ``agent``, ``phase``, ``dbus``, ``systemd``, ``daemon`` or the tools.
"""
