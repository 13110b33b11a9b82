"""The systemd adapter: phase gates, sd_notify and the fd store.

``gate`` is the port (``Gate``, job results, participants' states); ``pystemd_gate`` implements
it over pystemd, with the connection on its own thread (``pystemd_thread``) and the calls made
there (``pystemd_calls``, the only module of the project that imports pystemd).
``notify`` speaks sd_notify(3) over a plain socket; ``fdstore`` keeps session fds in the
manager's fd store.

Imports from the rest of luo_agent only ``errors``; never ``agent``, ``phase``, ``dbus``,
``kernel``, ``daemon`` or the tools.
"""
