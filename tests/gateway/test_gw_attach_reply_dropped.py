"""An attach given up on after kupd wrote its reply leaves no lease behind.

kupd counts an Attach reply as delivered once it has written it (a cancel
that comes later does not take it back: kupd.wire).  A client whose attach
is interrupted (Ctrl-C), cancelled or past its deadline after that, but
before its gRPC library handed the reply over -- here: the reply is in,
kupd's status is not, so the unary call is not over -- cancels the call,
and gRPC drops the reply with it.  The lease was then known to no one and
held its channel until it idled out (lease_idle_timeout).  Now every
Attach of kupclient names itself with a random ``attach_id``, and a client
that gave up on it releases by that id (Release{attach_id}: kupd's side is
test_gw_release_attach_id.py) before the interrupt, the cancellation or
DeadlineExceeded propagates: the lease is gone at once.

The window is held open by a proxy (h2stall) between the client and kupd
that passes kupd's reply and holds its status until the client resets the
stream.  Real kupsim (echo), kupd and client processes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from attach_recorder import AttachRecorder
from gateway_helpers import Kupd, StartKupd, child_env
from h2stall import StallProxy

import kupclient._types
from kupclient import AsyncClient, Client
from kupd import errors
from kupd.testing import KupSim

#: far beyond the test: a lease left behind would stay for all of it
IDLE_TIMEOUT = 600.0


@pytest.fixture
def kupd(sim: KupSim, start_kupd: StartKupd) -> Kupd:
    return start_kupd(sim, "--lease-idle-timeout", str(IDLE_TIMEOUT))


@pytest.fixture
def proxy(kupd: Kupd) -> Iterator[StallProxy]:
    p = StallProxy(kupd.socket + ".stall", kupd.socket)
    yield p
    p.close()


def _state(client: Client, chan: int) -> str:
    return client.devices("echo")[0].channels[chan].state


SYNC_ATTACH = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
from kupclient import Client
c = Client(sys.argv[1])
try:
    c.attach("echo", int(sys.argv[2]))
    print("attached", flush=True)
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""

ASYNC_ATTACH = """
import signal, sys, asyncio
signal.signal(signal.SIGINT, signal.default_int_handler)
from kupclient import AsyncClient

async def main() -> None:
    async with AsyncClient(sys.argv[1]) as c:
        await c.attach("echo", int(sys.argv[2]))
        print("attached", flush=True)

try:
    asyncio.run(main())
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


@pytest.mark.parametrize("program", [SYNC_ATTACH, ASYNC_ATTACH], ids=["sync", "asyncio"])
def test_an_attach_interrupted_after_kupd_wrote_its_reply_leaves_no_lease(
    client: Client, proxy: StallProxy, program: str
) -> None:
    chan = 10 if program is SYNC_ATTACH else 11
    child = subprocess.Popen(
        [sys.executable, "-c", program, proxy.path, str(chan)],
        stdout=subprocess.PIPE,
        env=child_env(),
    )
    try:
        # kupd granted the lease, wrote the reply (it reached the client)
        # and its status (held by the proxy): for kupd, delivered
        assert proxy.status_held.wait(60.0), "kupd's reply and status did not come"
        assert _state(client, chan) == "lease"
        child.send_signal(signal.SIGINT)
        out, _ = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
    assert out.decode().split() == ["interrupted"], out
    assert proxy.reset_seen.is_set()  # the client cancelled the call
    # the client released the lease before the interrupt propagated: the
    # channel is free at once, not after lease_idle_timeout
    assert _state(client, chan) == "free"


def test_an_asyncio_attach_cancelled_after_kupd_wrote_its_reply_leaves_no_lease(
    client: Client, proxy: StallProxy
) -> None:
    chan = 12

    async def main() -> None:
        async with AsyncClient(proxy.path) as c:
            task = asyncio.ensure_future(c.attach("echo", chan))
            while not proxy.status_held.is_set():
                assert not task.done(), task
                await asyncio.sleep(0.02)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())
    assert _state(client, chan) == "free"


#: The attach's timeout (its gRPC deadline) in the deadline tests: kupd
#: answers an attach of a free channel at once, so its reply is in (and its
#: status held) long before; the deadline then passes while the status is
#: held.  Below the client's ping timeout (KEEPALIVE_TIMEOUT_MS, 10 s):
#: gRPC pings as the reply comes in, the proxy holds kupd's answer too, and
#: the client drops a connection whose ping is not answered in time
#: (Unavailable).
SHORT_DEADLINE = 2.0


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_an_attach_past_its_deadline_after_kupd_wrote_its_reply_leaves_no_lease(
    client: Client, proxy: StallProxy, flavour: str
) -> None:
    """The caller's ``timeout`` given up on as the default deadline (30 s)
    is: the client releases by its attach_id before DeadlineExceeded
    propagates."""
    chan = 15 if flavour == "sync" else 16
    if flavour == "sync":
        with Client(proxy.path) as c, pytest.raises(errors.DeadlineExceeded):
            c.attach("echo", chan, timeout=SHORT_DEADLINE)
    else:

        async def main() -> None:
            async with AsyncClient(proxy.path) as c:
                with pytest.raises(errors.DeadlineExceeded):
                    await c.attach("echo", chan, timeout=SHORT_DEADLINE)

        asyncio.run(main())
    assert proxy.status_held.is_set(), "kupd did not answer the attach within its deadline"
    assert _state(client, chan) == "free"


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_an_attach_carries_its_timeout_or_the_default_30_s(
    tmp_path: Path, flavour: str
) -> None:
    """Without ``timeout`` an attach's deadline is still the documented
    30 s (kupclient._types.ATTACH_DEADLINE); with one, that one.  Seen by
    the server (attach_recorder: the deadline each Attach carried as it
    came in), not waited out."""
    recorder = AttachRecorder(str(tmp_path / "recorder.sock"))
    try:
        if flavour == "sync":
            with Client(recorder.path) as c:
                c.attach("echo", 3)
                c.attach("echo", 3, timeout=2.5)
        else:

            async def main() -> None:
                async with AsyncClient(recorder.path) as c:
                    await c.attach("echo", 3)
                    await c.attach("echo", 3, timeout=2.5)

            asyncio.run(main())
    finally:
        recorder.close()
    assert kupclient._types.ATTACH_DEADLINE == 30.0
    default, given = recorder.deadlines
    # (gRPC's grpc-timeout header rounds up a little; the rest is the
    # time the call took to arrive)
    assert default is not None and 20.0 < default <= 30.5, recorder.deadlines
    assert given is not None and 0.0 < given <= 3.0, recorder.deadlines


def test_an_asyncio_attach_cancelled_while_it_releases_past_its_deadline_is_cancelled(
    kupd: Kupd, client: Client, proxy: StallProxy
) -> None:
    """Past its deadline, the attach releases by its attach_id before
    DeadlineExceeded propagates; its task cancelled while that release
    waits (kupd stopped) gets CancelledError at once -- not DeadlineExceeded,
    the cancel lost -- and the release goes on without it."""
    chan = 17

    async def main() -> None:
        async with AsyncClient(proxy.path) as c:
            task = asyncio.ensure_future(c.attach("echo", chan, timeout=SHORT_DEADLINE))
            while not proxy.status_held.is_set():
                assert not task.done(), task
                await asyncio.sleep(0.02)
            os.kill(kupd.pid, signal.SIGSTOP)  # the release waits for kupd
            try:
                while not c._undoing:
                    assert not task.done(), task
                    await asyncio.sleep(0.02)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            finally:
                os.kill(kupd.pid, signal.SIGCONT)
            while c._undoing:  # the release, on its own
                await asyncio.sleep(0.02)

    asyncio.run(main())
    assert _state(client, chan) == "free"
