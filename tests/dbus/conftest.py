"""Fixtures of the D-Bus API tests (shared with tests/cli): see harness.py."""

from tests.dbus.harness import bus_address, client, host, private_bus

__all__ = ["bus_address", "client", "host", "private_bus"]
