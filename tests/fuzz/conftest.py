"""Fixtures for the hostile-input tests: kupsim with the echo and hostile
modules, and a kupd (no tenants: one default socket) with an admin socket
so the tests can list every lease."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator

import pytest

from kupd.testing import REPO_ROOT, KupSim, kupsim

sys.path.insert(0, str(REPO_ROOT / "tests" / "tenancy"))

from tenancy_helpers import TenantKupd, socket_dir

# Calls of b"!hold" (echo never answers them) quarantine pool channels;
# kupd replaces such a channel after call_quarantine, so the final check
# (an ordinary Call within its 10 s deadline) sees a pool that recovered,
# whatever the examples did to it.
CONFIG = """
call_quarantine = 2.0

[[device]]
name = "echo"
call_channels = 4

[[device]]
name = "hostile"
call_channels = 0
"""


@pytest.fixture(scope="module")
def hsim() -> Iterator[KupSim]:
    with kupsim("echo", "hostile", check_exit=False, ready_timeout=60.0) as s:
        yield s


@pytest.fixture(scope="module")
def fk(hsim: KupSim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TenantKupd]:
    log = tmp_path_factory.mktemp("fuzz") / "kupd.log"
    k = TenantKupd(socket_dir(), hsim, CONFIG, log)
    yield k
    k.stop()
    shutil.rmtree(k.dir, ignore_errors=True)
