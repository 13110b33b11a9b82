"""The agent's configuration: a TOML file parsed once into a frozen ``Config``.

Defaults live on the dataclasses; errors name the file and the key.  No global config: the
composition root passes it into constructors.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, cast

from .errors import ConfigError, InvalidArgument
from .kernel.device import Abi

DEFAULT_CONFIG_PATH: Final = Path("/etc/luo-agent/config.toml")

BusKind = Literal["system", "session"]
AbiChoice = Abi | Literal["auto"]
ABI_CHOICES: Final[tuple[str, ...]] = ("auto", *Abi)
# How the kexec happens (design.md §5, docs/configuration.md):
# - "direct": after the freeze gate the agent issues reboot(KEXEC) itself (shortest blackout).
# - "systemd": the agent pushes its outgoing session fds into its fd store and starts kexec.target
#   (an orderly kexec); needs the session ABI and a system manager >= 261, which carries fd stores
#   through kexec.  Anything else is a Check() blocker and Execute is refused.
# - "auto": "systemd" when those requirements hold, else "direct".
# The default stays "direct": a systemd upgrade must not change the blackout behind the operator.
RebootStrategy = Literal["direct", "systemd", "auto"]


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds each gated step may wait for one piece of work (its gate job or its kernel work),
    keyed by the step's name (``phase.SPECS[...].step``)."""

    prepare: float = 300.0
    # Waiting for a fleet slot while every slot is taken (only with [fleet] enabled).
    coordinate: float = 1800.0
    freeze: float = 60.0
    cancel: float = 120.0
    restore: float = 300.0
    finish: float = 120.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not (number and math.isfinite(value) and value > 0):
                raise InvalidArgument(f"timeout {f.name} must be a positive number, got {value!r}")

    def seconds(self, step: str) -> float:
        value: float = getattr(self, step)
        return value


@dataclass(frozen=True, slots=True)
class KernelConfig:
    abi: AbiChoice = "auto"
    # When set, the agent drives the emulated kernel whose machine root is this directory.
    emulate_root: Path | None = None
    # Opening the exclusive device: EBUSY (systemd or another agent holds it) is retried this long.
    busy_retry_seconds: float = 30.0


@dataclass(frozen=True, slots=True)
class Limits:
    max_sessions: int = 64
    max_fds_per_session: int = 128
    max_fds_total: int = 1024


CoordinatorKind = Literal["etcd", "fleetlock"]


@dataclass(frozen=True, slots=True)
class FleetConfig:
    """``[fleet]``: take a slot from the fleet's coordinator before anything irreversible
    (docs/configuration.md, docs/fleet.md)."""

    enabled: bool = False
    coordinator: CoordinatorKind = "etcd"
    # etcd: the members' client URLs (http://, https://, unix://); fleetlock: the server's base URL.
    endpoints: tuple[str, ...] = ("http://127.0.0.1:2379",)
    group: str = "default"
    # etcd only: the slot count written when the group's semaphore does not exist yet.
    slots: int = 1
    zone: str = ""
    zone_slots: int = 1
    # Hosts whose update may fail while holding a slot before the rollout halts for everyone.
    failure_budget: int = 0
    # While every slot is taken, ask again this often (the coordinate step's timeout bounds it).
    retry_interval: float = 5.0
    # Releasing in the new boot is retried until the coordinator answers, backing off to this.
    release_retry_max: float = 60.0
    # A target whose job must end done in the new boot before the slot is released (the
    # participants' health checks hook in with RequiredBy=); empty: the finish gate is the check.
    health_target: str = ""
    machine_id_file: Path = Path("/etc/machine-id")
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str = ""
    password_file: Path | None = None


@dataclass(frozen=True, slots=True)
class Config:
    bus: BusKind = "system"
    systemd_user_mode: bool = False
    state_directory: Path = Path("/var/lib/luo-agent")
    runtime_directory: Path = Path("/run/luo-agent")
    reboot_strategy: RebootStrategy = "direct"
    # Start the finish phase on our own once the restore gate passed (otherwise wait for Finish()).
    auto_finish: bool = True
    timeouts: Timeouts = field(default_factory=Timeouts)
    kernel: KernelConfig = field(default_factory=KernelConfig)
    limits: Limits = field(default_factory=Limits)
    fleet: FleetConfig = field(default_factory=FleetConfig)


_CHOICES: Final[dict[str, tuple[str, ...]]] = {
    "bus": ("system", "session"),
    "reboot_strategy": ("direct", "systemd", "auto"),
    "kernel.abi": ABI_CHOICES,
    "fleet.coordinator": ("etcd", "fleetlock"),
}
# Keys whose default is None: absolute paths when set.
_OPTIONAL_PATHS: Final = frozenset(
    {
        "kernel.emulate_root",
        "fleet.ca_file",
        "fleet.cert_file",
        "fleet.key_file",
        "fleet.password_file",
    }
)
# Counts where 0 is meaningful.
_COUNTS_FROM_ZERO: Final = frozenset({"fleet.failure_budget"})


def _build(cls: type[Any], table: dict[str, Any], path: str, prefix: str) -> Any:
    kwargs: dict[str, Any] = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        f = fields.get(key.replace("-", "_"))
        if f is None:
            raise ConfigError(path, dotted, "unknown key")
        default = getattr(cls(), f.name)
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise ConfigError(path, dotted, "must be a table")
            kwargs[f.name] = _build(type(default), value, path, dotted + ".")
            continue
        kwargs[f.name] = _convert(value, default, path, dotted)
    return cls(**kwargs)


def _convert(value: Any, default: Any, path: str, key: str) -> Any:
    if key in _CHOICES and value not in _CHOICES[key]:
        raise ConfigError(path, key, f"must be one of {', '.join(_CHOICES[key])}")
    if key == "kernel.abi" and value != "auto":
        return Abi(value)
    if isinstance(default, bool) or (key == "systemd_user_mode"):
        if not isinstance(value, bool):
            raise ConfigError(path, key, "must be true or false")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ConfigError(path, key, "must be a positive number of seconds")
        return float(value)
    if isinstance(default, int):
        least = 0 if key in _COUNTS_FROM_ZERO else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            want = "a positive integer" if least else "an integer >= 0"
            raise ConfigError(path, key, f"must be {want}")
        return value
    if isinstance(default, tuple):
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise ConfigError(path, key, "must be a non-empty list of strings")
        return tuple(value)
    if isinstance(default, Path) or key in _OPTIONAL_PATHS:
        if not isinstance(value, str) or not value.startswith("/"):
            raise ConfigError(path, key, "must be an absolute path")
        return Path(value)
    if not isinstance(value, str):
        raise ConfigError(path, key, "must be a string")
    return value


def parse_config(text: str, path: str = "<config>") -> Config:
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "-", f"not valid TOML: {exc}") from None
    return cast(Config, _build(Config, table, path, ""))


def load_config(path: Path | None) -> Config:
    """``path=None`` reads the default file if it exists, else uses the built-in defaults."""
    if path is None:
        if not DEFAULT_CONFIG_PATH.exists():
            return Config()
        path = DEFAULT_CONFIG_PATH
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(str(path), "-", exc.strerror or str(exc)) from None
    return parse_config(text, str(path))
