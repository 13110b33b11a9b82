"""Benchmarks of luo_agent (issue 8): not part of the pass/fail test suite.  ``python -m bench``
or ``bench/run``; see bench/README.md."""
