"""The preserved-fd registry: which client handed which fd in, under which (session, token).

Pure bookkeeping, no kernel calls: the Agent preserves in ``preservation_order()``.  The
registry *owns* the fds it holds (the D-Bus layer hands it a dup of the client's fd): ``remove``
and ``close_all`` close them.  Whether an fd is something the kernel can preserve is decided by a
caller-provided ``check_fd`` (e.g. ``fdkind.check_preservable``), so this module stays free of
fstat/statfs logic.

(session, token) is the key on every backend (``design.md`` §4); on the state-machine kernels the
Agent maps it onto the kernel's global token list.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Final, NamedTuple, Self

from .errors import AlreadyExists, InvalidArgument

# The session holding the agent's own metadata memfd (design.md §4).
AGENT_SESSION_NAME: Final = "luo-agent"
# PID 1 gathers its fd store into a session of this name (kernel-abi.md, systemd PR #41683).
SYSTEMD_SESSION_NAME: Final = "systemd"
RESERVED_SESSION_NAMES: Final = frozenset({SYSTEMD_SESSION_NAME, AGENT_SESSION_NAME})
# LIVEUPDATE_SESSION_NAME_LENGTH is 64 in 6.19, including the terminating NUL.
SESSION_NAME_MAX_BYTES: Final = 63
TOKEN_MAX: Final = 2**64 - 1
# The 6.19 session holds two pages of file entries: 128 files (kernel-abi.md §7.3).
DEFAULT_MAX_PER_SESSION: Final = 128
DEFAULT_MAX_TOTAL: Final = 1024


class Key(NamedTuple):
    session: str
    token: int

    def __str__(self) -> str:
        return f"{self.session!r}/{self.token}"


@dataclass(frozen=True, slots=True)
class Entry:
    session: str
    token: int
    fd: int
    owner: str  # the caller's id (bus name or uid), for audit and for "remove what I own"
    depends_on: tuple[Key, ...] = ()

    @property
    def key(self) -> Key:
        return Key(self.session, self.token)


def validate_session_name(name: str) -> None:
    """InvalidArgument unless ``name`` can name a client session (1..63 bytes UTF-8, no NUL,
    not reserved)."""
    if not isinstance(name, str):
        raise InvalidArgument(f"session name must be a string, got {type(name).__name__}")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidArgument(f"session name {name!r} is not valid UTF-8") from None
    if not 1 <= size <= SESSION_NAME_MAX_BYTES:
        raise InvalidArgument(
            f"session name must be 1..{SESSION_NAME_MAX_BYTES} bytes of UTF-8, got {size}"
        )
    if "\0" in name:
        raise InvalidArgument(f"session name {name!r} contains NUL")
    if name in RESERVED_SESSION_NAMES:
        raise InvalidArgument(f"session name {name!r} is reserved")


def validate_token(token: int) -> None:
    # bool is an int subclass; a True token is a caller bug, not token 1.
    if not isinstance(token, int) or isinstance(token, bool):
        raise InvalidArgument(f"token must be an integer, got {type(token).__name__}")
    if not 0 <= token <= TOKEN_MAX:
        raise InvalidArgument(f"token {token} is outside 0..2**64-1")


class FdRegistry:
    """Entries by (session, token), in registration order.  Not thread-safe: the Agent's event
    task is its only user."""

    def __init__(
        self,
        *,
        check_fd: Callable[[int], None],
        max_per_session: int = DEFAULT_MAX_PER_SESSION,
        max_total: int = DEFAULT_MAX_TOTAL,
    ) -> None:
        if max_per_session < 1 or max_total < 1:
            raise InvalidArgument("registry limits must be at least 1")
        self._check_fd = check_fd
        self._max_per_session = max_per_session
        self._max_total = max_total
        self._entries: dict[Key, Entry] = {}  # insertion order = registration order
        self._fds: set[int] = set()

    # ------------------------------------------------------------------------------ queries

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(list(self._entries.values()))

    def get(self, session: str, token: int) -> Entry:
        try:
            return self._entries[Key(session, token)]
        except KeyError:
            raise InvalidArgument(f"no fd registered as {Key(session, token)}") from None

    def sessions(self) -> list[str]:
        """Session names in the order their first fd was registered."""
        return list(dict.fromkeys(key.session for key in self._entries))

    def dependents(self, session: str, token: int) -> list[Entry]:
        """Entries that declare (session, token) as a dependency."""
        key = Key(session, token)
        return [e for e in self._entries.values() if key in e.depends_on]

    def preservation_order(self) -> list[Entry]:
        """Every entry, dependencies before dependents: registration order, since ``add``
        takes only dependencies already registered and ``remove`` refuses a needed entry."""
        return list(self._entries.values())

    # ---------------------------------------------------------------------------- mutations

    def add(
        self,
        session: str,
        token: int,
        fd: int,
        owner: str,
        depends_on: Iterable[tuple[str, int]] = (),
    ) -> Entry:
        """Register ``fd`` (which the registry then owns) as (session, token).

        On any error nothing changes and the caller still owns ``fd``.  Raises InvalidArgument
        (bad name/token/fd, reserved name, unknown dependency, cycle, limits) or AlreadyExists.
        """
        validate_session_name(session)
        validate_token(token)
        key = Key(session, token)
        if key in self._entries:
            raise AlreadyExists("register", errno.EEXIST, f"{key} is already registered")
        if not isinstance(fd, int) or isinstance(fd, bool) or fd < 0:
            raise InvalidArgument(f"not a file descriptor: {fd!r}")
        if fd in self._fds:
            # Two entries owning one fd number would close it twice.
            raise InvalidArgument(f"fd {fd} is already held by the registry")
        deps = self._validated_dependencies(key, depends_on)
        if len(self._entries) >= self._max_total:
            raise InvalidArgument(f"the registry is full ({self._max_total} fds)")
        in_session = sum(1 for k in self._entries if k.session == session)
        if in_session >= self._max_per_session:
            raise InvalidArgument(f"session {session!r} is full ({self._max_per_session} fds)")
        self._check_fd(fd)
        entry = Entry(session, token, fd, owner, deps)
        self._entries[key] = entry
        self._fds.add(fd)
        return entry

    def remove(self, session: str, token: int, *, close_fd: bool = True) -> Entry:
        """Forget an entry and close its fd (``close_fd=False`` hands the fd to the caller).

        Refused while another entry depends on it.
        """
        entry = self.get(session, token)
        if dependents := self.dependents(session, token):
            names = ", ".join(str(e.key) for e in dependents)
            raise InvalidArgument(f"{entry.key} is still needed by {names}")
        del self._entries[entry.key]
        self._fds.discard(entry.fd)
        if close_fd:
            os.close(entry.fd)
        return entry

    def close_all(self) -> None:
        """Close every owned fd and forget every entry.  All fds are closed even if one close
        fails; the first failure is raised afterwards."""
        entries, self._entries, self._fds = list(self._entries.values()), {}, set()
        errors: list[OSError] = []
        for entry in entries:
            try:
                os.close(entry.fd)
            except OSError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close_all()

    # ------------------------------------------------------------------------------ helpers

    def _validated_dependencies(
        self, key: Key, depends_on: Iterable[tuple[str, int]]
    ) -> tuple[Key, ...]:
        deps: list[Key] = []
        for item in depends_on:
            if not (isinstance(item, tuple) and len(item) == 2):
                raise InvalidArgument(f"a dependency must be (session, token), got {item!r}")
            dep = Key(*item)
            if dep == key:
                raise InvalidArgument(f"dependency cycle: {key} -> {key}")
            if dep not in self._entries:
                raise InvalidArgument(f"{key} depends on {dep}, which is not registered")
            if dep not in deps:  # a repeated dependency is harmless; keep the first
                deps.append(dep)
        return tuple(deps)
