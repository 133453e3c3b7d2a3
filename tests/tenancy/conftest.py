"""Fixtures for the multi-tenant tests: kupsim (echo + rot13) and a kupd
serving three tenants, an admin socket and an audit log."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from tenancy_helpers import DEVICES, TENANTS, StartTenants, TenantKupd, socket_dir

from kupd.testing import KupSim, kupsim


@pytest.fixture(scope="module")
def tsim() -> Iterator[KupSim]:
    with kupsim("echo", "rot13", check_exit=False, ready_timeout=60.0) as s:
        yield s


@pytest.fixture
def start_tenants(tsim: KupSim, tmp_path: Path) -> Iterator[StartTenants]:
    started: list[TenantKupd] = []

    def start(body: str) -> TenantKupd:
        k = TenantKupd(socket_dir(), tsim, body, tmp_path / f"kupd-{len(started)}.log")
        started.append(k)
        return k

    yield start
    for k in started:
        k.stop()
        shutil.rmtree(k.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def tk(tsim: KupSim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TenantKupd]:
    """One kupd with the three tenants, shared by a module's tests."""
    log = tmp_path_factory.mktemp("tk") / "kupd.log"
    k = TenantKupd(socket_dir(), tsim, DEVICES + TENANTS, log)
    yield k
    k.stop()
    shutil.rmtree(k.dir, ignore_errors=True)
