"""End-to-end fixtures: one shared plain `kiln serve` process (e2e_helpers runs servers)."""

from __future__ import annotations

from typing import Iterator

import pytest

from .e2e_helpers import KilnServer, start_server


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KilnServer]:
    """One plain server (no models at start) shared by the CLI and client tests; each test uses its own uids."""
    kiln = start_server(tmp_path_factory.mktemp("server") / "serve.log")
    yield kiln
    kiln.stop()
