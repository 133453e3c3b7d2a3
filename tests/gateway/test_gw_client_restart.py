"""A client outlives a kupd restart: a Session kupd ended raises the error
that ended it again on every later operation, and once a new kupd serves
the socket the next call connects within about a second, however long
kupd was away.

gRPC's default reconnect backoff (1 s growing x1.6 up to 120 s) left a
Client -- and a new Client in the same process, gRPC sharing the
connection -- failing "connect failed ... No such file or directory" for 13 s
after a kupd that had been down 20 s served again.

How the test stays robust on a loaded machine: what is measured is the
time from the moment a serving kupd appears at the client's socket path to
the client's first successful call, and neither kupd's start-up nor the
phase of gRPC's backoff is in it:

* while kupd is away, a stand-in listener at the path accepts and closes
  each connection (gRPC sees a failed connect, as with no socket at all),
  so the test sees when the client tried;
* the new kupd starts meanwhile on another path and is serving before the
  outage ends;
* the outage ends right after a connect attempt seen past OUTAGE seconds:
  the new kupd's socket is renamed over the stand-in (kupd binds every
  socket that way itself, kupd.tenants.SocketSet), so kupd serves the path
  from one instant on.

The client's next attempt then comes one backoff later: at most
RECONNECT_MAX_MS plus gRPC's 20 % jitter with the fix, at least 8.4 s
(10.5 s less the jitter) without it after 15 s of failures.  BOUND lies
between the two with seconds of room on either side.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from gateway_helpers import StartKupd

from kupclient import AsyncClient, Client
from kupclient.errors import is_connection_failure
from kupd import errors
from kupd.testing import KupSim, wait_until

#: How long kupd is away, the client calling all along (every connect fails).
OUTAGE = 15.0
#: From kupd serving the path to the client's first successful call.
BOUND = 4.0


class StandIn:
    """A listener at ``path`` that closes every connection it accepts and
    notes when: each is a connect attempt of the client."""

    def __init__(self, path: str) -> None:
        self.attempts: list[float] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(64)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            self.attempts.append(time.monotonic())
            conn.close()

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(10)


def _fails(call: Callable[[], bytes]) -> None:
    with pytest.raises(errors.Unavailable):
        call()


def _restart_and_time(
    sim: KupSim,
    start_kupd: StartKupd,
    tmp_path: Path,
    call: Callable[[], bytes],
    before: Callable[[], object] = lambda: None,
) -> float:
    """Run the client (``call`` echoes b"x"; ``before`` runs first) through a
    kupd restart; the seconds from the new kupd serving its path to the first
    call it answers."""
    k = start_kupd(sim)
    path = k.socket
    assert call() == b"x"
    before()
    assert k.terminate() == 0
    stand_in = StandIn(path)
    try:
        new = start_kupd(sim, socket=str(tmp_path / "new.sock"))
        end = time.monotonic() + OUTAGE
        while time.monotonic() < end:
            _fails(call)
            time.sleep(0.2)
        seen = len(stand_in.attempts)
        while len(stand_in.attempts) == seen:  # the outage ends right after an attempt
            assert time.monotonic() < end + 60, f"no connect attempt: {stand_in.attempts}"
            _fails(call)
            time.sleep(0.01)
        os.rename(new.socket, path)  # kupd serves the client's path from now on
        served = time.monotonic()
    finally:
        stand_in.close()
    while True:
        try:
            assert call() == b"x"
            return time.monotonic() - served
        except errors.Unavailable:
            assert time.monotonic() - served < 60, "the client never reconnected"
            time.sleep(0.02)


def _recovered(took: float) -> None:
    assert took < BOUND, (
        f"the client's first call succeeded {took:.1f} s after kupd served again "
        f"(bound {BOUND} s): gRPC's reconnect backoff is not bounded"
    )


def test_a_sync_client_reconnects_soon_after_kupd_restarts(
    sim: KupSim, start_kupd: StartKupd, tmp_path: Path
) -> None:
    c = Client(str(tmp_path / "kupd.sock"))
    leases: list[str] = []
    try:
        took = _restart_and_time(
            sim,
            start_kupd,
            tmp_path,
            lambda: c.call("echo", b"x", timeout=5).data.lower(),
            lambda: leases.append(c.attach("echo").lease_id),
        )
        _recovered(took)
        # a lease lived in the old kupd's memory (as docs/gateway.md says)
        with pytest.raises(errors.NotFound, match="no lease"):
            c.lease_pass(leases[0])
        # a new Client of the same process shares gRPC's connection: it works too
        with Client(str(tmp_path / "kupd.sock")) as c2:
            assert c2.call("echo", b"y", timeout=5).data.lower() == b"y"
        wait_until(lambda: c.devices("echo")[0].reachable, what="devices through the client")
    finally:
        c.close()


def test_an_async_client_reconnects_soon_after_kupd_restarts(
    sim: KupSim, start_kupd: StartKupd, tmp_path: Path
) -> None:
    with asyncio.Runner() as runner:
        c = AsyncClient(str(tmp_path / "kupd.sock"))

        def call() -> bytes:
            return runner.run(c.call("echo", b"x", timeout=5)).data.lower()

        try:
            _recovered(_restart_and_time(sim, start_kupd, tmp_path, call))
        finally:
            runner.run(c.close())


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_a_session_kupd_ended_raises_that_error_again(
    sim: KupSim, start_kupd: StartKupd, how: str
) -> None:
    """Every operation after kupd ended a Session -- draining (SIGTERM:
    Shutdown) or dying (SIGKILL: Unavailable, a connection failure) --
    raises the error that ended it again: its class, saying the session
    already ended, sync and asyncio alike, and as kup.js does.  It was an
    InvalidArgument "channel N of DEV is closed: the session ended with
    ...", which an ``except Shutdown`` did not see."""
    k = start_kupd(sim)
    want = errors.Shutdown if how == "SIGTERM" else errors.Unavailable
    again = rf"^channel \d+ of echo is closed: the session already ended with {want.__name__}: "

    def check(first: BaseException, later: list[BaseException]) -> None:
        assert isinstance(first, want), repr(first)
        if want is errors.Shutdown:
            assert str(first).startswith("EKU_SHUTDOWN: "), first
        for exc in later:
            assert type(exc) is want, repr(exc)
            assert re.match(again, str(exc)), exc
            assert str(first) in str(exc)
            assert is_connection_failure(exc) == is_connection_failure(first)

    with k.client() as c, asyncio.Runner() as runner:
        ac = AsyncClient(k.socket)
        ch = c.open("echo").channel()
        ch.receive(timeout=10)

        async def opened() -> Any:
            ach = await (await ac.open("echo")).channel()
            await ach.receive(timeout=10)
            return ach

        ach = runner.run(opened())
        if how == "SIGTERM":
            assert k.terminate() == 0
        else:
            k.kill()

        # sync
        with pytest.raises(errors.KupError) as first:
            ch.exchange(b"x", timeout=10)
        later = []
        for op in (lambda: ch.send(b"y"), ch.pass_, lambda: ch.receive(0), "close", ch.pass_):
            if op == "close":
                ch.close()  # closing it changes nothing: the session was over
                continue
            assert callable(op)
            with pytest.raises(errors.KupError) as exc:
                op()
            later.append(exc.value)
        check(first.value, later)

        # asyncio: once gRPC has kupd's status (a write racing it may lose it)
        async def run() -> None:
            for _ in range(1000):
                if ach._call.done():
                    break
                await asyncio.sleep(0.01)
            with pytest.raises(errors.KupError) as first:
                await ach.exchange(b"x", timeout=10)
            later = []
            for i in range(3):
                if i == 2:
                    await ach.close()
                with pytest.raises(errors.KupError) as exc:
                    await ach.send(b"y")
                later.append(exc.value)
            check(first.value, later)
            await ac.close()

        runner.run(run())
