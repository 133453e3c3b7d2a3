"""Helpers for the gateway tests (also used by tests/faults and tests/load):
the ``start_kupd`` fixture over kupd.testing, and bounded waits."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from kupd import testing
from kupd.testing import REPO_ROOT, Kupd, KupSim, echo_lock_holds, kupd_env, kupsim, wait_until

CLIENTS = str(REPO_ROOT / "clients" / "python")
if CLIENTS not in sys.path:
    sys.path.insert(0, CLIENTS)

from kupclient import Client, Watch  # noqa: E402
from kupd import errors  # noqa: E402

#: Bounded waits (generous: the machine is shared).
START_TIMEOUT = 60.0

T = TypeVar("T")


def child_env(sim: KupSim | None = None) -> dict[str, str]:
    """The environment kupd / kupctl children get (see kupd.testing.kupd_env)."""
    return kupd_env(sim)


@pytest.fixture
def start_kupd(tmp_path: Path) -> Iterator[StartKupd]:
    """start_kupd(sim, *args, socket=None, wait=True, env=None, devices=("echo:4",))
    -> Kupd on ``tmp_path``; every kupd started is stopped afterwards.  Shared
    by the gateway, fault and load tests (their conftests import it)."""
    started: list[Kupd] = []

    def start(
        sim: KupSim | None,
        *args: str,
        socket: str | None = None,
        wait: bool = True,
        env: Mapping[str, str] | None = None,
        devices: Sequence[str] = ("echo:4",),
    ) -> Kupd:
        k = testing.start_kupd(
            *args,
            socket=socket or str(tmp_path / "kupd.sock"),
            log=tmp_path / f"kupd-{len(started)}.log",
            sim=sim,
            devices=devices,
            env=env,
            wait=False,
        )
        started.append(k)  # stopped below even if it never serves
        if wait:
            k.wait_serving(START_TIMEOUT)
        return k

    yield start
    for k in started:
        k.stop()


StartKupd = Callable[..., Kupd]


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


#: A client process that takes channel argv[2] of echo on socket argv[1],
#: says "holding" and keeps its session until killed.
HOLDER = """
import sys
from kupclient import Client
c = Client(sys.argv[1])
ch = c.open("echo").channel(int(sys.argv[2]))
ch.receive()
print("holding", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def holding_client(socket: str, channel: int) -> Iterator[subprocess.Popen[bytes]]:
    """A separate client process holding ``channel`` of echo (see HOLDER);
    yielded once it holds it, killed and reaped afterwards."""
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, socket, str(channel)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=child_env(),
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == b"holding"
        yield child
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()


#: echo keeps the channel locked -- the kernel holding the turn -- until a
#: "!lockfree" arrives on another channel (the bound, 60 s, is never reached
#: when the test releases it): a window that lasts until the test closes it,
#: where echo's "!delay" (300 ms) is a window a loaded machine can miss.
LOCKHOLD = b"!lockhold60000"


def wait_locked(sim: KupSim, chan: int) -> None:
    """Until echo's worker on ``chan`` holds the channel locked: only then
    can a "!lockfree" end the hold (one sent earlier would not be seen).
    One hold per channel per kupsim (it looks for the first log line)."""
    wait_until(lambda: echo_lock_holds(sim, chan) > 0, what=f"echo to hold channel {chan} locked")


def unlock(c: Client) -> None:
    """End every lock hold: "!lockfree" through the Call pool (other channels)."""
    assert c.call("echo", b"!lockfree", timeout=30).data.lower() == b"!lockfree"


def call_in_flight(c: Client, data: bytes, timeout: float) -> Callable[[float], object]:
    """Start ``c.call("echo", data, timeout=timeout)`` in a thread and wait
    until kupd counts it in flight.  Returns ``finish(bound)``: joins the
    thread (asserting it ended within ``bound`` seconds) and gives the reply
    or the KupError the call raised."""
    result: list[object] = []

    def run() -> None:
        try:
            result.append(c.call("echo", data, timeout=timeout))
        except errors.KupError as exc:
            result.append(exc)

    t = threading.Thread(target=run)
    t.start()
    wait_until(lambda: c.devices("echo")[0].calls_in_flight == 1, what="call in flight")

    def finish(bound: float) -> object:
        t.join(bound)
        assert not t.is_alive(), f"the call was still running after {bound}s"
        assert len(result) == 1, result
        return result[0]

    return finish
