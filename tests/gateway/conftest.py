"""Fixtures for the gateway tests: a real kupsim (echo module) and a real
kupd subprocess serving it on a unix socket in a temporary directory."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest
from gateway_helpers import Kupd, StartKupd, child_env, echo_sim

from kupclient import Client
from kupd.testing import KupSim


@pytest.fixture
def start_kupd(tmp_path: Path) -> Iterator[StartKupd]:
    """start_kupd(sim, *args, socket=None, wait=True) -> Kupd; all stopped afterwards."""
    started: list[Kupd] = []

    def start(
        sim: KupSim | None,
        *args: str,
        socket: str | None = None,
        wait: bool = True,
        env: Mapping[str, str] | None = None,
        devices: Sequence[str] = ("echo:4",),
    ) -> Kupd:
        sock = socket or str(tmp_path / "kupd.sock")
        log = tmp_path / f"kupd-{len(started)}.log"
        argv = [sys.executable, "-m", "kupd.daemon", "--socket", sock, "--health-interval", "0.2"]
        for d in devices:
            argv += ["--device", d]
        if sim is not None:
            argv += ["--kupsim-dir", str(sim.rundir)]
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [*argv, *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else child_env(sim),
            )
        k = Kupd(proc, sock, log)
        started.append(k)
        if wait:
            k.wait_serving()
        return k

    yield start
    for k in started:
        if k.proc.poll() is None:
            k.proc.send_signal(signal.SIGTERM)
            try:
                k.proc.wait(30)
            except subprocess.TimeoutExpired:
                k.proc.kill()
                k.proc.wait()


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
