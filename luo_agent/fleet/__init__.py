"""Fleet coordination: at most N hosts in blackout at once, through the fleet's own coordinator."""

from __future__ import annotations

import re
from typing import Final

from ..config import FleetConfig
from ..errors import ConfigError
from .port import Acquired, Coordinator, FleetStatus, Semaphore

__all__ = ["Acquired", "Coordinator", "FleetStatus", "Semaphore", "make_coordinator"]

GROUP_RE: Final = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def make_coordinator(config: FleetConfig, source: str = "[fleet]") -> Coordinator:
    """The configured coordinator (``ConfigError`` naming the key if the configuration is wrong)."""
    # The adapters load here, not with the package: every agent start imports fleet.port.
    from .etcd import EtcdCoordinator, EtcdGateway
    from .fleetlock import FleetLockCoordinator
    from .http import tls_context
    from .identity import host_id_from_machine_id

    for key, name in (("fleet.group", config.group), ("fleet.zone", config.zone)):
        if name and not GROUP_RE.match(name):
            raise ConfigError(source, key, f"{name!r}: letters, digits, '_', '.', '-' (1-64)")
    if config.zone == config.group:
        raise ConfigError(source, "fleet.zone", "must differ from fleet.group")
    host_id = host_id_from_machine_id(config.machine_id_file)
    secure = any(url.startswith("https://") for url in config.endpoints)
    tls = tls_context(config.ca_file, config.cert_file, config.key_file) if secure else None
    if config.coordinator == "fleetlock":
        if len(config.endpoints) != 1:
            raise ConfigError(source, "fleet.endpoints", "FleetLock takes one base URL")
        if config.zone or config.username:
            raise ConfigError(source, "fleet.zone", "zones and etcd users are for etcd only")
        return FleetLockCoordinator(
            config.endpoints[0], host_id=host_id, group=config.group, tls=tls
        )
    if config.username and config.password_file is None:
        raise ConfigError(source, "fleet.password_file", "needed with fleet.username")
    gateway = EtcdGateway(
        config.endpoints,
        tls=tls,
        username=config.username,
        password_file=config.password_file,
    )
    return EtcdCoordinator(
        gateway,
        host_id=host_id,
        group=config.group,
        slots=config.slots,
        zone=config.zone,
        zone_slots=config.zone_slots,
        failure_budget=config.failure_budget,
    )
