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

#: Test directories run last, in this order: their tests wait for work that
#: starts in the background when collection ends -- tests/cpp for clients/cpp's
#: build (tests/cpp/conftest.py), tests/vm for the VM runs (tests/vm/
#: conftest.py) -- and the later they come, the more of that work the rest of
#: the session's tests, which mostly wait on deadlines and restarts, have
#: run beside.  (tests/cpp's build, a minute or more, came right after
#: tests/cli and was waited for; the VM runs, the longest, go last.)
LAST = ("cpp", "vm")


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    """Move the tests of LAST's directories to the end (a stable sort: each
    module's tests keep their order)."""
    tests = Path(__file__).resolve().parent

    def rank(item: pytest.Item) -> int:
        try:
            top = item.path.resolve().relative_to(tests).parts[0]
        except ValueError:
            return 0
        return LAST.index(top) + 1 if top in LAST else 0

    items.sort(key=rank)


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
