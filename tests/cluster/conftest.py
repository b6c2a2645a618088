"""The Ray tier's one session fixture: a two-node Ray cluster in network namespaces, with Kiln's front on it."""

from __future__ import annotations

from typing import Iterator

import httpx
import pytest

from .ray_cluster import RayCluster, start_cluster, unavailable


@pytest.fixture(scope="session")
def ray_cluster(tiny_root) -> Iterator[RayCluster]:
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def front(ray_cluster: RayCluster) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=ray_cluster.url, timeout=300) as client:
        yield client
