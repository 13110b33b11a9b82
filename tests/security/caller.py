"""Run the calls given as JSON on stdin against the bus at argv[1]; print the results as JSON.
Started under ``setpriv`` to call as an unprivileged uid."""

from __future__ import annotations

import asyncio
import json
import sys

from tests.security.wire import perform_all


def main() -> None:
    calls = json.load(sys.stdin)
    results = asyncio.run(perform_all(sys.argv[1], calls))
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
