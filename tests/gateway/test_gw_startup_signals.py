"""kupd's start-up, seen from outside: a SIGHUP before the server is up
(``systemctl start kupd; systemctl reload kupd``, whose ExecReload falls
back to ``kill -HUP`` while the admin socket is missing) does not end kupd
and is applied once it is.  Real kupd and kupsim processes."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from kupd.testing import KupSim, start_kupd, wait_until

__all__: list[str] = []


def _catches_sighup(pid: int) -> bool:
    """Whether the process has a handler for SIGHUP (/proc's SigCgt mask)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) & (1 << (signal.SIGHUP - 1)))
    return False


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc (SigCgt)")
def test_sighup_before_the_server_is_up_is_applied_not_fatal(
    sim: KupSim, tmp_path: Path
) -> None:
    sock = tmp_path / "k.sock"
    k = start_kupd(
        "--pid-file", "-", log=tmp_path / "kupd.log", socket=sock, sim=sim,
        devices=["echo:2"], wait=False,
    )  # fmt: skip
    try:
        # as early as kupd can take it: as soon as it has a handler at all
        deadline = time.monotonic() + 30
        while not _catches_sighup(k.pid):
            assert k.proc.poll() is None, k.log()
            assert time.monotonic() < deadline, "kupd never handled SIGHUP"
            time.sleep(0.001)
        serving_before = sock.exists()
        os.kill(k.pid, signal.SIGHUP)
        # the handler must be there well before kupd serves: that is the
        # window a reload right after the start falls into
        assert not serving_before, "kupd had no SIGHUP handler until it was serving"
        k.wait_serving(30)
        wait_until(lambda: "config reloaded" in k.log(), what="the early SIGHUP's reload")
        assert k.proc.poll() is None
        assert k.log().count("config reloaded") == 1, k.log()
        assert "SIGHUP during start-up" in k.log()
        assert k.terminate() == 0, k.log()
    finally:
        k.kill()

