"""luo_agent: drives Linux live updates through the kernel's Live Update Orchestrator.

Layers, from the top; a module imports only from layers below its own (``docs/architecture.md``):

* ``daemon`` — the composition root, the only module that chooses concrete classes.
* ``dbus/`` — the D-Bus API over the ``Agent``.
* ``agent/`` — the one owner of the phase and its rooms; ``phase`` (the pure engine),
  ``registry`` (handed-in fds), ``kexec_handover`` (the systemd reboot strategy).
* adapters, one per outside system: ``kernel/`` (``/dev/liveupdate``), ``systemd/`` (gates,
  sd_notify, the fd store), ``persist`` (files), ``sysfs``, ``log``, ``fleet/`` (the fleet's
  coordinator: etcd, FleetLock).
* shared vocabulary: ``errors``, ``records``, ``config``, ``fdkind``.

Beside the daemon, never imported by it: ``cli`` and ``client`` (``liveupdatectl``),
``participant`` (the participant kit), ``examples/`` (a participant), ``vmm/`` (the VM
participant) and the test rigs ``sandbox``, ``sandbox_cgroups``, ``testbed`` and ``demo``.
Nothing below ``agent`` imports ``agent``, ``dbus`` or ``daemon``; ``kernel/`` and ``systemd/`` do
not import each other
(``tests/unit/test_layers.py``).
"""

__version__ = "0.1.0"
