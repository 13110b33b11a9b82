"""The CLI runs against the real agent on the private bus of tests/dbus/harness.py."""

from tests.dbus.harness import bus_address, client, host, private_bus

__all__ = ["bus_address", "client", "host", "private_bus"]
