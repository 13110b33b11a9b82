from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .etcd_server import Cluster, make_cluster


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One etcd member on loopback, shared by a module's tests (each test uses its own group)."""
    cluster = make_cluster(tmp_path_factory.mktemp("etcd"), 1)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def etcd3(tmp_path: Path) -> Iterator[Cluster]:
    """Three members on loopback ports: for losing the leader."""
    cluster = make_cluster(tmp_path, 3)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def group() -> str:
    return f"g-{uuid.uuid4().hex[:12]}"
