"""liveupdatectl: the operator's client of org.luoagent.LiveUpdate1 (the public D-Bus API only).

Human output by default; ``--json`` prints JSON lines: live ``event`` documents while it waits, then
exactly one ``result`` or ``error`` document (``"schema": "liveupdatectl/1"``, described by
docs/cli-schema.json; docs/cli.md).  Exit codes are stable (``ExitCode``).

``program`` is one run (``main``: parse, connect, run the command, print any failure);
``arguments`` the command line; ``commands`` one coroutine per command; ``watch`` waits for an
update through the agent's signals; ``output`` prints the text and the JSON documents.

A client like any other: imports from the rest of luo_agent only ``client``, ``participant`` (the
kit, for ``keep``) and ``dbus.names`` (and the version); never ``agent``, ``daemon``, the rest of
``dbus/`` or the adapters, except ``fleet``: ``liveupdatectl fleet`` asks the fleet's coordinator
directly (``fleet/``, with the agent's ``[fleet]`` configuration and ``errors``), since it must
work for a dead host's slot.
"""

from .arguments import parser
from .commands import COMMANDS
from .output import SCHEMA, ExitCode
from .program import main, run

__all__ = ["COMMANDS", "SCHEMA", "ExitCode", "main", "parser", "run"]
