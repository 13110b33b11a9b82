"""Examples of the agent's clients: ``participant`` is a service hooked into the phase targets
that hands its state to the agent and takes it back after the kexec.

A client of the public D-Bus API only: imports ``luo_agent.client``, ``participant`` (the kit) and
``persist.write_atomic``,
never the agent's internals (``agent``, ``phase``, ``kernel``, ``systemd``, ``dbus``).
"""
