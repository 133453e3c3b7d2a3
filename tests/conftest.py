"""Shared pytest fixtures for every test area (keep them small and generic).

Area-specific fixtures belong in that area's own conftest.py.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

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


@pytest.fixture(scope="session")
def cli_gateway() -> ModuleType:
    """tests/cli/cli_gateway.py (kupsim + kupd run as the installed console
    script), for the other clients' tests (tests/node, tests/cpp).  Loaded
    by path under a name of its own: tests/cli is on sys.path only once
    pytest has collected it."""
    name = "kup_cli_gateway"
    if name in sys.modules:
        return sys.modules[name]
    path = REPO_ROOT / "tests" / "cli" / "cli_gateway.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
