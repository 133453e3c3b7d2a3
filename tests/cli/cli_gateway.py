"""A real kupsim (echo module) + a real kupd for the kupctl and Node tests.

kupd runs as the installed ``kupd`` console script (``.venv/bin/kupd``) on
a unix socket in a temporary directory, optionally with its Prometheus
metrics on a free loopback port.  Everything is stopped on the way out and
kupd's clean SIGTERM exit (status 0) is checked.  tests/node/ loads this file
by path, so it depends on nothing but the repository.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from kupclient import Client
from kupd import errors
from kupd.testing import REPO_ROOT, KupSim, kupsim

__all__ = ["Gateway", "Kupctl", "console_script", "gateway"]

#: The kupctl fixture: kupctl(*args, input=None, env=None) -> CompletedProcess.
Kupctl = Callable[..., "subprocess.CompletedProcess[str]"]

#: Bounded waits (generous: the machine is shared).
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


def console_script(name: str) -> Path:
    """The installed console script ``name`` of this virtualenv.

    Raises AssertionError with the fix when it is not installed.
    """
    for bindir in (Path(sys.executable).parent, REPO_ROOT / ".venv" / "bin"):
        path = bindir / name
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise AssertionError(
        f"console script {name!r} is not installed in the virtualenv "
        "(run `make setup`, which does `pip install -e .`)"
    )


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Gateway:
    """A running kupsim + kupd pair."""

    sim: KupSim
    proc: subprocess.Popen[bytes]
    socket: str
    log_path: Path
    metrics_url: str  # "" when metrics are off

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def client(self) -> Client:
        return Client(self.socket)

    def env(self) -> dict[str, str]:
        """An environment for kupctl: KUPD_SOCKET points at this kupd."""
        env = dict(os.environ)
        env["KUPD_SOCKET"] = self.socket
        env.pop("KUPD_METRICS", None)
        return env


def _wait_serving(gw: Gateway, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if gw.proc.poll() is not None:
            raise AssertionError(f"kupd exited with {gw.proc.returncode}:\n{gw.log()}")
        if os.path.exists(gw.socket):
            try:
                with gw.client() as c:
                    if c.health() == "SERVING":
                        return
            except errors.KupError as exc:
                last = exc
        time.sleep(0.05)
    raise AssertionError(f"kupd not SERVING within {timeout}s ({last}):\n{gw.log()}")


@contextlib.contextmanager
def gateway(devices: Sequence[str] = ("echo:2",), *, metrics: bool = False) -> Iterator[Gateway]:
    """kupsim with echo and kupd serving ``devices`` (NAME[:CALL_CHANNELS])."""
    kupd_exe = console_script("kupd")
    with (
        tempfile.TemporaryDirectory(prefix="kupd-cli-") as tmp,
        kupsim("echo", check_exit=False) as sim,
    ):
        sock = os.path.join(tmp, "kupd.sock")
        log_path = Path(tmp) / "kupd.log"
        argv = [str(kupd_exe), "--socket", sock, "--kupsim-dir", str(sim.rundir)]
        argv += ["--pid-file", "-", "--health-interval", "0.2"]
        for d in devices:
            argv += ["--device", d]
        metrics_url = ""
        if metrics:
            port = free_loopback_port()
            argv += ["--metrics-port", str(port)]
            metrics_url = f"http://127.0.0.1:{port}/metrics"
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=sim.env(),
            )
        gw = Gateway(sim, proc, sock, log_path, metrics_url)
        try:
            _wait_serving(gw, START_TIMEOUT)
            yield gw
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                raise AssertionError(
                    f"kupd ignored SIGTERM for {STOP_TIMEOUT}s:\n{gw.log()}"
                ) from None
            assert rc == 0, f"kupd exited with {rc} after SIGTERM:\n{gw.log()}"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
