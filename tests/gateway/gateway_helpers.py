"""Helpers for the gateway tests: a kupd subprocess and bounded waits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from kupd.testing import REPO_ROOT, KupSim, kupsim

CLIENTS = str(REPO_ROOT / "clients" / "python")
if CLIENTS not in sys.path:
    sys.path.insert(0, CLIENTS)

from kupclient import Client, Watch  # noqa: E402
from kupd import errors  # noqa: E402

#: Bounded waits (generous: the machine is shared).
START_TIMEOUT = 30.0


def child_env(sim: KupSim | None = None) -> dict[str, str]:
    env = dict(os.environ if sim is None else sim.env())
    parts = [str(REPO_ROOT), CLIENTS, env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in parts if p)
    return env


class Kupd:
    """A kupd subprocess."""

    def __init__(self, proc: subprocess.Popen[bytes], socket: str, log: Path) -> None:
        self.proc = proc
        self.socket = socket
        self.log_path = log

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def client(self, **kw: str) -> Client:
        return Client(self.socket, **kw)

    def wait_up(self, timeout: float = START_TIMEOUT) -> str:
        """Until kupd answers health checks (whatever the status); the status."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"kupd exited with {self.proc.returncode}:\n{self.log()}")
            if os.path.exists(self.socket):
                try:
                    with self.client() as c:
                        return c.health()
                except errors.KupError:
                    pass
            time.sleep(0.05)
        raise AssertionError(f"kupd not answering within {timeout}s:\n{self.log()}")

    def wait_serving(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"kupd exited with {self.proc.returncode}:\n{self.log()}")
            if os.path.exists(self.socket):
                try:
                    with self.client() as c:
                        if c.health() == "SERVING":
                            return
                except errors.KupError as exc:
                    last = exc
            time.sleep(0.05)
        raise AssertionError(f"kupd not SERVING within {timeout}s ({last}):\n{self.log()}")

    def threads(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
        raise AssertionError("no Threads: line")

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"kupd ignored SIGTERM for {timeout}s:\n{self.log()}") from None


StartKupd = Callable[..., Kupd]


def wait_until(cond: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.02)


def live_watch(c: Client, device: str = "echo") -> Watch:
    """A Watch that is known to be subscribed: with initial_state, the first
    (initial) event only arrives once kupd has registered the stream, so no
    later event can be missed.  For a device without leases there is
    exactly one initial event."""
    w = c.watch(device, initial_state=True)
    first = next(w)
    assert first.initial and first.device == device, first
    return w


def echo_sim(**kw: Any) -> AbstractContextManager[KupSim]:
    """kupsim with the echo module; generous start-up bound (shared machine)."""
    return kupsim("echo", check_exit=False, ready_timeout=60.0, **kw)
