"""Who closes the fds that cross the bus.

A call's handler closes the fds it received (``close_fds``); ``server.guard_fds`` closes those no
handler takes.  An fd that ``Retrieve`` hands out stays open in the agent until dbus-fast has sent
the reply, and is closed when the update ends or the same token is retrieved again
(``HandedOutFds``).
"""

from __future__ import annotations

import contextlib
import os


def close_fds(*fds: int) -> None:
    # Once each: LoadKernel(0, 0) names one fd twice, and a second close could hit a reused number.
    for fd in dict.fromkeys(fds):
        with contextlib.suppress(OSError):
            os.close(fd)


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
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
