"""Fixtures for the gateway tests: a real kupsim (echo module) and a real
kupd subprocess serving it on a unix socket in a temporary directory."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from gateway_helpers import Kupd, StartKupd, echo_sim, start_kupd

from kupclient import Client
from kupd.testing import KupSim

__all__ = ["client", "kupd", "sim", "start_kupd"]


@pytest.fixture
def sim() -> Iterator[KupSim]:
    """kupsim with the echo module (128 channels of one page)."""
    with echo_sim() as s:
        yield s


@pytest.fixture
def kupd(sim: KupSim, start_kupd: StartKupd) -> Kupd:
    """kupd serving the echo device with a 4-channel Call pool."""
    return start_kupd(sim)


@pytest.fixture
def client(kupd: Kupd) -> Iterator[Client]:
    with kupd.client() as c:
        yield c
