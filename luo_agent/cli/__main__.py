"""``python -m luo_agent.cli``: liveupdatectl run from the source tree (the tests, the demo)."""

import sys

from .program import main

if __name__ == "__main__":
    sys.exit(main())
