"""kupd and systemd's notify protocol (kupd/notify.py), seen from outside:
a real kupd and kupsim, and a datagram socket standing in for systemd's
$NOTIFY_SOCKET.  READY=1 comes only once kupd serves; a reload is framed by
RELOADING=1 and READY=1, refused or not; SIGTERM's drain says STOPPING=1;
WatchdogSec's pings come while the loop runs; an address kupd cannot use
does not stop it from serving."""

from __future__ import annotations

import os
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kupclient import Client
from kupd.testing import Kupd, KupSim, kupd_env, start_kupd, wait_until

__all__: list[str] = []


class Manager:
    """The service manager's end of $NOTIFY_SOCKET: every datagram, parsed."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + address[1:].encode() if address.startswith("@") else address)
        self.heard: list[dict[str, str]] = []

    def next(self, key: str, timeout: float = 30.0) -> dict[str, str]:
        """The next message carrying ``key`` (those before it are kept)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {key} from kupd; heard {self.heard}")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            msg = dict(line.split("=", 1) for line in data.decode().split("\n"))
            self.heard.append(msg)
            if key in msg:
                return msg

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[Manager]:
    m = Manager(str(tmp_path / "notify"))
    yield m
    m.close()


def _kupd_with(sim: KupSim, tmp_path: Path, **env: str) -> Kupd:
    """kupd serving echo on tmp_path/k.sock, ``env`` added to its environment."""
    return start_kupd(
        "--pid-file", "-", log=tmp_path / "kupd.log", socket=tmp_path / "k.sock", sim=sim,
        devices=["echo"], env=kupd_env(sim) | env,
    )  # fmt: skip


def _serving(sock: Path) -> bool:
    with Client(str(sock)) as c:
        return c.health() == "SERVING"


def test_ready_only_once_serving_then_reload_and_stop(
    sim: KupSim, tmp_path: Path, manager: Manager
) -> None:
    sock = tmp_path / "k.sock"
    cfg = tmp_path / "k.toml"
    cfg.write_text(f'socket = "{sock}"\npid_file = "-"\n[[device]]\nname = "echo"\n')
    env = kupd_env(sim) | {"NOTIFY_SOCKET": manager.address}
    k = start_kupd(config=cfg, log=tmp_path / "kupd.log", sim=sim, env=env, wait=False)
    try:
        ready = manager.next("READY")
        # READY=1 is what systemd orders After=kupd.service units on: the
        # socket must already answer, with the device's health known
        assert _serving(sock), k.log()
        assert ready["READY"] == "1"
        assert ready["MAINPID"] == str(k.pid)
        assert ready["STATUS"] == f"serving 1 device on {sock}"

        os.kill(k.pid, signal.SIGHUP)
        reloading = manager.next("RELOADING")
        assert reloading["RELOADING"] == "1"
        # Type=notify-reload wants the reload's CLOCK_MONOTONIC time
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert 0 < now - int(reloading["MONOTONIC_USEC"]) < 60_000_000
        assert manager.next("READY")["STATUS"] == f"serving 1 device on {sock}"

        # a refused reload: kupd serves on with the old config, and says so
        cfg.write_text(
            f'socket = "{sock}"\npid_file = "-"\nlog_level = "loud"\n[[device]]\nname = "echo"\n'
        )
        os.kill(k.pid, signal.SIGHUP)
        manager.next("RELOADING")
        refused = manager.next("READY")
        assert "last reload refused" in refused["STATUS"], refused
        assert "log_level" in refused["STATUS"], refused
        assert "\n" not in refused["STATUS"]
        assert _serving(sock)

        os.kill(k.pid, signal.SIGTERM)
        stopping = manager.next("STOPPING")
        assert stopping["STATUS"].startswith("draining"), stopping
        assert k.proc.wait(30) == 0, k.log()
    finally:
        k.kill()


def test_no_ready_when_the_start_fails(sim: KupSim, tmp_path: Path, manager: Manager) -> None:
    """A start that fails (here: an audit log that cannot be opened) never
    says READY: systemd reports the start as failed, not as started and
    then failed."""
    cfg = tmp_path / "k.toml"
    cfg.write_text(
        f'socket = "{tmp_path}/k.sock"\npid_file = "-"\naudit_log = "{tmp_path}/no/audit.log"\n'
        '[[device]]\nname = "echo"\n'
    )
    env = kupd_env(sim) | {"NOTIFY_SOCKET": manager.address}
    k = start_kupd(config=cfg, log=tmp_path / "kupd.log", sim=sim, env=env, wait=False)
    try:
        assert k.proc.wait(30) == 2, k.log()
        assert "audit_log" in k.log(), k.log()
        manager.sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            manager.sock.recv(4096)
    finally:
        k.kill()


def test_watchdog_pings_at_half_the_period_on_an_abstract_socket(
    sim: KupSim, tmp_path: Path
) -> None:
    manager = Manager(f"@kupd-test-{uuid.uuid4().hex}")
    k = _kupd_with(sim, tmp_path, NOTIFY_SOCKET=manager.address, WATCHDOG_USEC="400000")
    try:
        manager.next("READY")
        for _ in range(3):
            manager.next("WATCHDOG")
        assert k.terminate() == 0, k.log()
    finally:
        k.kill()
        manager.close()


def test_watchdog_for_another_pid_is_not_kupds(
    sim: KupSim, tmp_path: Path, manager: Manager
) -> None:
    """WATCHDOG_PID names the process systemd watches; a kupd started by
    that process (a wrapper script) must not ping in its name."""
    k = _kupd_with(
        sim, tmp_path, NOTIFY_SOCKET=manager.address, WATCHDOG_USEC="200000", WATCHDOG_PID="1"
    )
    try:
        manager.next("READY")
        # ten periods' worth of chances to ping
        with pytest.raises(AssertionError, match="no WATCHDOG"):
            manager.next("WATCHDOG", timeout=1.0)
        assert k.terminate() == 0, k.log()
    finally:
        k.kill()


def test_an_address_kupd_cannot_use_is_logged_and_ignored(sim: KupSim, tmp_path: Path) -> None:
    for address in ("vsock:2:1234", str(tmp_path / "nobody-listens")):
        k = _kupd_with(sim, tmp_path, NOTIFY_SOCKET=address)
        try:
            assert _serving(tmp_path / "k.sock")
            log = k.log
            wait_until(lambda: "NOTIFY_SOCKET" in log(), what="the notify warning")  # noqa: B023
            assert address in k.log()
            assert k.terminate() == 0, k.log()
        finally:
            k.kill()
