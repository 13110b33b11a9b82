"""The D-Bus API (org.luoagent.LiveUpdate1, ``docs/dbus-api.md``) over the ``Agent``.

``server`` connects, guards the fds every message carries and exports the ``manager``: the
Manager interface, one thin method per request (check the arguments, authorise, delegate to the
Agent), and the agent's listener that turns its changes into PropertiesChanged and the
PhaseChanged/Finished signals.  ``update_objects`` are the per-update objects.  ``arguments``
checks what callers send, ``values`` builds what the API answers, ``fds`` says who closes each fd,
``auth`` identifies and authorises callers (polkit), ``errors`` maps domain errors to the error
names once, ``bus`` is the connection and ``names`` the bus names, paths and interfaces.

Imports from the rest of luo_agent only ``agent``, ``phase``, ``records``, ``errors``, ``config``,
``fdkind.close_fds`` and the version: the adapters (``kernel/``, ``systemd/``, ``persist``, ...)
are reached only through the Agent; never ``daemon``, ``cli``, ``client`` or the tools.
"""
