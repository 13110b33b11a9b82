"""Who closes the fds that cross the bus.

A call's handler closes the fds it received (``close_fds``); ``server.guard_fds`` closes those no
handler takes.  An fd that ``Retrieve`` hands out stays open in the agent until dbus-fast has sent
the reply, and is closed when the update ends or the same token is retrieved again
(``HandedOutFds``).
"""

from __future__ import annotations

from ..fdkind import close_fds

__all__ = ["HandedOutFds", "close_fds"]


class HandedOutFds:
    """The agent's copies of the fds ``Retrieve`` answered with, by (session, token)."""

    def __init__(self) -> None:
        self._fds: dict[tuple[str, int], int] = {}

    def keep(self, session: str, token: int, fd: int) -> None:
        previous = self._fds.pop((session, token), None)
        if previous is not None:
            close_fds(previous)
        self._fds[(session, token)] = fd

    def close_all(self) -> None:
        close_fds(*self._fds.values())
        self._fds.clear()
