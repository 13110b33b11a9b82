"""What every tier of the suite shares: the kernel ABI generations a test runs on.

A fixture that takes ``abi`` runs once per generation; a module that parametrises a fixture
indirectly passes ``ABIS``.  Every list of generations in the tests is this one."""

from __future__ import annotations

import pytest

from luo_agent.kernel.device import Abi

# Every generation the agent drives, newest first (the order of the tests' ids).
ABIS = (Abi.SESSION, Abi.V3, Abi.RFC_V2)


@pytest.fixture(params=ABIS)
def abi(request: pytest.FixtureRequest) -> Abi:
    """One kernel ABI generation: each test that asks for it runs on every one."""
    return Abi(request.param)
