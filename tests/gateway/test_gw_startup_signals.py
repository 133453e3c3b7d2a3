"""kupd's start-up, seen from outside: a SIGHUP before the server is up
(``systemctl start kupd; systemctl reload kupd``, whose ExecReload falls
back to ``kill -HUP`` while the admin socket is missing) does not end kupd
and is applied once it is; a start that fails after some sockets were
bound (a second kupd on the same admin socket) stops their servers and
exits 1 with one clear line, no traceback or asyncio noise.  Real kupd and
kupsim processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kupd.testing import KupSim, kupd_env, start_kupd, wait_until

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
        os.kill(k.pid, signal.SIGUSR1)  # logrotate's: nothing to re-open yet, not fatal
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


def test_start_failure_after_binding_stops_the_servers_cleanly(
    sim: KupSim, tmp_path: Path
) -> None:
    d = tmp_path / "si"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    cfg = d / "k.toml"
    cfg.write_text(
        f'socket = "{d}/a.sock"\nadmin_socket = "{d}/admin.sock"\n'
        f'kupsim_dir = "{sim.rundir}"\npid_file = "-"\n[[device]]\nname = "echo"\n'
    )
    first = start_kupd(
        log=d / "first.log", config=cfg, health_socket=d / "a.sock", health_interval=None
    )
    try:
        # a second kupd on its own socket (its own lock) but the same admin socket
        res = subprocess.run(
            [sys.executable, "-m", "kupd.daemon", "--config", str(cfg),
             "--socket", str(d / "b.sock")],
            capture_output=True, text=True, timeout=60, env=kupd_env(sim),
        )  # fmt: skip
        out = res.stdout + res.stderr
        assert res.returncode == 1, out
        assert f"kupd: {d}/admin.sock" in res.stderr and "another process serves" in res.stderr
        for noise in ("Traceback", "Exception ignored", "never awaited", "Event loop is closed"):
            assert noise not in out, out
        # what it had bound is gone again; the first kupd still serves
        assert not (d / "b.sock").exists()
        assert (d / "admin.sock").exists()
        assert first.proc.poll() is None
        assert first.terminate() == 0, first.log()
    finally:
        first.kill()
