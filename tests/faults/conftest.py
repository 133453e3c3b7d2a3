"""Fixtures for the fault tests: real kupsim and kupd processes (the kupd
harness of tests/gateway is reused, not duplicated)."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kupd.testing import REPO_ROOT, KupSim

sys.path.insert(0, str(REPO_ROOT / "tests" / "gateway"))

from gateway_helpers import Kupd, StartKupd, child_env


@pytest.fixture
def start_kupd(tmp_path: Path) -> Iterator[StartKupd]:
    """start_kupd(sim, *args, socket=None, devices=("echo:4",)) -> Kupd; stopped afterwards."""
    started: list[Kupd] = []

    def start(
        sim: KupSim, *args: str, socket: str | None = None, devices: tuple[str, ...] = ("echo:4",)
    ) -> Kupd:
        sock = socket or str(tmp_path / "kupd.sock")
        log = tmp_path / f"kupd-{len(started)}.log"
        argv = [sys.executable, "-m", "kupd.daemon", "--socket", sock, "--health-interval", "0.2"]
        for d in devices:
            argv += ["--device", d]
        argv += ["--kupsim-dir", str(sim.rundir), *args]
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=child_env(sim),
            )
        k = Kupd(proc, sock, log)
        started.append(k)
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
