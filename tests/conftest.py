"""Shared pytest fixtures for every test area (keep them small and generic).

Area-specific fixtures belong in that area's own conftest.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kupd.testing import REPO_ROOT, KupSim, kupsim


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The source tree's root directory."""
    return REPO_ROOT


@pytest.fixture
def echo_sim() -> Iterator[KupSim]:
    """A real kupsim process with the echo module loaded, in a private
    temporary RUNDIR; stopped (and its exit status checked) afterwards."""
    with kupsim("echo") as sim:
        yield sim
