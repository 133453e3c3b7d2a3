"""An Attach whose caller goes away leaves no lease behind.

A lease granted to an Attach whose caller had gone -- its client
interrupted (Ctrl-C) while the attach waited for its channel, dead, past
its deadline -- used to stay held, its id known to no one, until it idled
out (lease_idle_timeout): the channel was lost to everybody meanwhile.
Now:

* kupd sees the Attach reply it could not deliver (kupd.wire serves
  Attach so that a reply not written is seen) and ends the lease at once,
  reason ``caller gone``; an attach cancelled before its channel came has
  no lease, and kupd logs it as ``attach abandoned``, reason ``caller
  gone``;
* the sync client cancels its Attach at once on an interrupt (it used to
  notice only at gRPC's next look for signals, up to 200 ms later, by
  which time kupd had often granted the lease and delivered the reply to
  a client that then dropped it), and releases a lease whose reply came in
  as it gave up; the asyncio client does the latter too.

Real processes throughout: kupsim with echo, kupd, client processes
interrupted with SIGINT, and a bare HTTP/2 client (h2raw) that never
reads its reply.  The channel is one echo's worker keeps locked after its
last user left ("!lockhold"), so that an attach of it waits in kupd
(Releasing, retried) until the test sends "!lockfree".
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from gateway_helpers import LOCKHOLD, Kupd, StartKupd, child_env, unlock, wait_locked
from h2raw import H2Conn

from kupapi import kup_pb2
from kupclient import AsyncClient, Client, Kind, Lease
from kupd import errors
from kupd.testing import KupSim, wait_until

#: Far beyond what the test waits for the channel: a lease left behind
#: would hold it for the whole test.
IDLE_TIMEOUT = 120.0

#: How long the channel may take to be free again (kupd ends the lease
#: "at once": this bound only absorbs a loaded machine).
FREE_WITHIN = 15.0

WAITS = "attach waits for the module to let go"


@pytest.fixture
def kupd(sim: KupSim, start_kupd: StartKupd) -> Kupd:
    return start_kupd(sim, "--lease-idle-timeout", str(IDLE_TIMEOUT))


def _records(kupd: Kupd) -> list[dict[str, object]]:
    out = []
    for line in kupd.log().splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def _waits(kupd: Kupd, chan: int) -> bool:
    return any(r.get("event") == WAITS and r.get("channel") == chan for r in _records(kupd))


def _leave_locked(sim: KupSim, client: Client, chan: int) -> None:
    """Use ``chan`` and leave it while echo's worker keeps it locked: an
    attach of it waits in kupd until unlock()."""
    with client.open("echo").channel(chan) as ch:
        assert ch.receive(timeout=10).kind == Kind.PASS
        ch.send(LOCKHOLD)
        wait_locked(sim, chan)


def _attach_at_once(client: Client, chan: int) -> Lease:
    """Attach ``chan`` as soon as it is free (Busy while another lease
    holds it, Releasing while its module has not let go), within
    FREE_WITHIN: not after an idle timeout."""
    deadline = time.monotonic() + FREE_WITHIN
    while True:
        try:
            return client.attach("echo", chan)
        except errors.Busy as exc:  # Releasing is a Busy
            if time.monotonic() > deadline:
                held = client.devices("echo")[0].channels[chan]
                what = f"channel {chan} not free after {FREE_WITHIN}s: {held}"
                raise AssertionError(what) from exc
            time.sleep(0.05)


def _why_gone(kupd: Kupd, chan: int, holder: str, since: int, mine: str = "") -> list[str]:
    """What kupd's log says, from its record ``since`` on, became of the
    attaches of ``chan`` by a ``holder`` ("lease" or "session") other than
    the lease ``mine``: an attach abandoned, or a lease released, each with
    its reason."""
    taken: set[object] = set()
    said: list[str] = []
    for r in _records(kupd)[since:]:
        if r.get("channel") != chan:
            continue
        if r.get("event") == "attach abandoned" and r.get("holder") == holder:
            said.append(f"abandoned: {r.get('reason')}")
        elif r.get("event") == "lease taken" and r.get("holder") == holder:
            if r.get("lease") != mine:
                taken.add(r.get("lease"))
        elif r.get("event") == "lease released" and r.get("lease") in taken:
            said.append(f"released: {r.get('reason')}")
    return said


def _interrupted(child: subprocess.Popen[bytes]) -> str:
    out, _ = child.communicate(timeout=60)
    lines = out.decode().split()
    assert "interrupted" in lines, (child.returncode, out)
    return out.decode()


SYNC_ATTACH = """
import signal
# Ctrl-C raises KeyboardInterrupt even when this process was started
# with SIGINT ignored (a job started in the background by a shell)
signal.signal(signal.SIGINT, signal.default_int_handler)
import sys
from kupclient import Client
c = Client(sys.argv[1])
print("attaching", flush=True)
try:
    c.attach("echo", int(sys.argv[2]))
    print("attached", flush=True)
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""

ASYNC_ATTACH = """
import signal
# Ctrl-C raises KeyboardInterrupt even when this process was started
# with SIGINT ignored (a job started in the background by a shell)
signal.signal(signal.SIGINT, signal.default_int_handler)
import asyncio, sys
from kupclient.aio import AsyncClient

async def main() -> None:
    async with AsyncClient(sys.argv[1]) as c:
        print("attaching", flush=True)
        await c.attach("echo", int(sys.argv[2]))
        print("attached", flush=True)

try:
    asyncio.run(main())
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""

SESSION_ATTACH = """
import signal
# Ctrl-C raises KeyboardInterrupt even when this process was started
# with SIGINT ignored (a job started in the background by a shell)
signal.signal(signal.SIGINT, signal.default_int_handler)
import sys
from kupclient import Client
c = Client(sys.argv[1])
print("attaching", flush=True)
try:
    c.open("echo").channel(int(sys.argv[2]))
    print("attached", flush=True)
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


@contextmanager
def _attaching(kupd: Kupd, program: str, chan: int) -> Iterator[subprocess.Popen[bytes]]:
    """A client process whose attach of ``chan`` waits in kupd."""
    child = subprocess.Popen(
        [sys.executable, "-c", program, kupd.socket, str(chan)],
        stdout=subprocess.PIPE,
        env=child_env(),
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == b"attaching"
        wait_until(lambda: _waits(kupd, chan), what=f"kupd to retry the attach of {chan}")
        yield child
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()


@pytest.mark.parametrize(
    ("program", "holder"),
    [(SYNC_ATTACH, "lease"), (ASYNC_ATTACH, "lease"), (SESSION_ATTACH, "session")],
    ids=["sync", "asyncio", "session"],
)
def test_an_attach_interrupted_while_it_waits_leaves_no_lease(
    sim: KupSim, kupd: Kupd, client: Client, program: str, holder: str
) -> None:
    chan = {"lease": 20, "session": 24}[holder] + (program is ASYNC_ATTACH)
    _leave_locked(sim, client, chan)
    since = len(_records(kupd))
    with _attaching(kupd, program, chan) as child:
        # Ctrl-C, and the channel comes at once: kupd grants it within a
        # few ms -- before the old sync client even saw the interrupt, so
        # that its lease stayed, reply dropped, until it idled out
        child.send_signal(signal.SIGINT)
        unlock(client)
        _interrupted(child)
    lease = _attach_at_once(client, chan)
    client.release(lease.lease_id)
    said = _why_gone(kupd, chan, holder, since, lease.lease_id)
    # whichever came first: the cancel (no lease; or one kupd ended, its
    # reply not delivered), or the reply (the client released the lease,
    # or, for a Session, cancelled the stream)
    assert said, "kupd's log says nothing of the interrupted attach"
    ok = {"abandoned: caller gone", "released: caller gone"}
    ok |= {"released: released"} if holder == "lease" else {"released: stream cancelled"}
    assert set(said) <= ok, said


@pytest.mark.parametrize("how", ["cancels", "disconnects"])
def test_an_attach_reply_that_cannot_be_delivered_ends_its_lease(
    sim: KupSim, kupd: Kupd, client: Client, how: str
) -> None:
    """A caller that is gone by the time kupd answers -- here one that
    never reads its reply, then cancels the RPC or closes its connection
    (as a client interrupted or killed does): the reply cannot go out, and
    kupd ends the lease at once."""
    chan = 40 if how == "cancels" else 42
    stalled = H2Conn(kupd.socket, window=0)  # kupd may send headers, never data
    try:
        req = kup_pb2.AttachRequest(device="echo", channel=chan)
        stream = stalled.grpc_request("/kup.v1.Kup/Attach", req.SerializeToString())
        # granted; the reply waits for a window that never opens
        wait_until(lambda: _taken(kupd, chan), what=f"kupd to grant channel {chan}")
        time.sleep(0.2)  # (the lease stays while the caller is there)
        assert _why_gone(kupd, chan, "lease", 0) == []
        if how == "cancels":
            stalled.cancel(stream)
            wait_until(
                lambda: _why_gone(kupd, chan, "lease", 0) != [], what="kupd to end the lease"
            )
    finally:
        stalled.close()
    lease = _attach_at_once(client, chan)
    client.release(lease.lease_id)
    assert _why_gone(kupd, chan, "lease", 0, lease.lease_id) == ["released: caller gone"]


#: A client whose interrupt comes as the reply does: its SIGINT handler
#: waits (for the test's go, on stdin, once kupd granted the lease) and
#: then until the reply is in -- the Attach's future (kupclient._start's
#: unary, the frame the signal interrupted) is done -- before it
#: raises KeyboardInterrupt.
SYNC_ATTACH_LATE = """
import signal, sys, time
from kupclient import Client, _start

def interrupt(signum, frame):
    print("interrupting", flush=True)
    sys.stdin.readline()
    while frame is not None and frame.f_code is not _start.unary.__code__:
        frame = frame.f_back
    if frame is None:
        print("no kupclient._start.unary frame", flush=True)
        sys.exit(3)
    fut, deadline = frame.f_locals["fut"], time.monotonic() + 60
    while not fut.done() and time.monotonic() < deadline:
        time.sleep(0.01)
    print("reply in" if fut.done() else "no reply", flush=True)
    raise KeyboardInterrupt

signal.signal(signal.SIGINT, interrupt)
c = Client(sys.argv[1])
print("attaching", flush=True)
try:
    c.attach("echo", int(sys.argv[2]))
    print("attached", flush=True)
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


def test_a_sync_attach_interrupted_as_its_reply_comes_releases_the_lease(
    sim: KupSim, kupd: Kupd, client: Client
) -> None:
    chan = 44
    _leave_locked(sim, client, chan)
    since = len(_records(kupd))
    child = subprocess.Popen(
        [sys.executable, "-c", SYNC_ATTACH_LATE, kupd.socket, str(chan)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=child_env(),
    )
    try:
        assert child.stdin is not None and child.stdout is not None
        assert child.stdout.readline().strip() == b"attaching"
        wait_until(lambda: _waits(kupd, chan), what=f"kupd to retry the attach of {chan}")
        child.send_signal(signal.SIGINT)
        assert child.stdout.readline().strip() == b"interrupting"
        unlock(client)  # the channel comes: kupd grants it and replies
        wait_until(lambda: _taken(kupd, chan, since), what=f"kupd to grant channel {chan}")
        child.stdin.write(b"go\n")  # the child waits for the reply to be in
        child.stdin.flush()
        assert "reply in" in _interrupted(child).split("\n")
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
    lease = _attach_at_once(client, chan)
    client.release(lease.lease_id)
    # kupd delivered the reply: the client released the lease itself
    assert _why_gone(kupd, chan, "lease", since, lease.lease_id) == ["released: released"]


def _taken(kupd: Kupd, chan: int, since: int = 0) -> bool:
    """Whether kupd granted an Attach lease on ``chan`` (from its log
    record ``since`` on)."""
    return any(
        r.get("event") == "lease taken" and r.get("channel") == chan and r.get("holder") == "lease"
        for r in _records(kupd)[since:]
    )


def test_a_session_whose_attached_reply_cannot_be_delivered_ends_its_lease(
    sim: KupSim, kupd: Kupd, client: Client
) -> None:
    """The same for a Session stream: its lease ends with the stream, even
    when the stream is cancelled while its ``attached`` reply waits to be
    written."""
    chan = 46
    stalled = H2Conn(kupd.socket, window=0)
    try:
        first = kup_pb2.SessionRequest(
            request_id=1, attach=kup_pb2.SessionAttach(device="echo", channel=chan)
        ).SerializeToString()
        stream = stalled.grpc_open("/kup.v1.Kup/Session")
        stalled.grpc_send(stream, len(first), first)  # the stream stays open
        wait_until(
            lambda: any(
                r.get("event") == "lease taken" and r.get("channel") == chan
                for r in _records(kupd)
            ),
            what=f"kupd to grant channel {chan}",
        )
        time.sleep(0.2)
        assert _why_gone(kupd, chan, "session", 0) == []
        stalled.cancel(stream)
        lease = _attach_at_once(client, chan)
        client.release(lease.lease_id)
    finally:
        stalled.close()
    assert _why_gone(kupd, chan, "session", 0) == ["released: stream cancelled"]


def test_an_asyncio_attach_cancelled_as_its_reply_comes_releases_the_lease(
    kupd: Kupd, client: Client
) -> None:
    """The task of an asyncio attach is cancelled when its RPC has just
    succeeded, before it resumed: the reply is in, the task will never see
    it.  The client releases the lease.  (The moment is made exact with a
    task factory: gRPC runs each RPC in a task of its own, and a callback
    added to that task when it is made runs before the caller's task
    resumes.)"""
    chan = 48

    async def main() -> None:
        loop = asyncio.get_running_loop()
        caller: list[asyncio.Task[Lease]] = []

        def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
            task = asyncio.Task(coro, loop=loop, **kw)
            if caller and getattr(coro, "__qualname__", "").endswith("Call._invoke"):
                task.add_done_callback(lambda _: caller[0].cancel())
            return task

        async with AsyncClient(kupd.socket) as c:
            await c.devices()  # the channel is up before the factory is in place
            loop.set_task_factory(factory)
            caller.append(asyncio.ensure_future(c.attach("echo", chan)))
            with pytest.raises(asyncio.CancelledError):
                await caller[0]
            loop.set_task_factory(None)
            until = time.monotonic() + FREE_WITHIN
            while (await c.devices("echo"))[0].channels[chan].state != "free":
                assert time.monotonic() < until, f"channel {chan} still held"
                await asyncio.sleep(0.05)

    asyncio.run(main())
    assert _taken(kupd, chan)  # kupd did grant it
    assert _why_gone(kupd, chan, "lease", 0) == ["released: released"]
