"""The VM participant (``docs/vm-participant.md``): one QEMU guest whose RAM lives in a memfd
that survives a live update, its device state saved into a second memfd and loaded by a new QEMU
after the kexec.

``qmp`` (a QEMU monitor client), ``qemu`` (the VMM driver), ``guest`` (a tiny guest built from
source for tests, demos and benchmarks) and ``participant`` (the service and its hooks).  A client
of the public D-Bus API only, beside the daemon like ``examples/``: imports ``luo_agent.client``
and ``persist.write_atomic``, never the agent's internals.
"""
