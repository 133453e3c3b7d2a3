"""A unary Receive (or Send with wait_reply) whose caller goes away as kupd
takes the kernel's message does not lose the message.

kupd took the message off the channel and returned it as the RPC's reply;
when the caller had cancelled (Ctrl-C, a cancelled asyncio task, a deadline
shorter than the receive's own timeout) or gone by then, gRPC dropped the
reply, and the lease's next Receive waited for a message that would never
come.  Now the operation stays the lease's until its reply is written, and
one that cannot be written leaves the message on the lease: the next
Receive gets exactly that message, once.

The window is made to last with a bare HTTP/2 client (h2raw) that
advertises a stream window of 0: kupd takes the message and answers, but
can send the reply's headers only, never its data, until the test cancels
the RPC or drops the connection; and the race itself is run with a gRPC
client whose Receive is cancelled while kupd is stopped (SIGSTOP) and the
module's reply arrives.  Real kupsim (echo) and kupd throughout.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator

import grpc
import pytest
from gateway_helpers import Kupd, StartKupd
from h2raw import HEADERS, H2Conn

from kupapi import kup_pb2, kup_pb2_grpc
from kupclient import Client, Kind, Message
from kupd import errors
from kupd.testing import KupSim, all_stopped, wait_until

#: far beyond the test: the lease must not idle out under it
IDLE_TIMEOUT = 300.0


@pytest.fixture
def kupd(sim: KupSim, start_kupd: StartKupd) -> Kupd:
    return start_kupd(sim, "--lease-idle-timeout", str(IDLE_TIMEOUT), "--log-level", "debug")


@pytest.fixture
def lease_id(client: Client) -> Iterator[str]:
    """An Attach lease on echo, its greeting (a PASS) received."""
    lease = client.attach("echo")
    assert client.lease_receive(lease.lease_id, timeout=30).kind == Kind.PASS
    yield lease.lease_id
    try:
        client.release(lease.lease_id)
    except errors.NotFound:
        pass


def _undelivered(kupd: Kupd, lease_id: str) -> list[str]:
    """The outcomes kupd logged of replies it could not deliver on the lease."""
    out = []
    for line in kupd.log().splitlines():
        if not line.startswith("{"):
            continue
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if r.get("event") == "reply not delivered" and r.get("lease") == lease_id:
            out.append(str(r.get("outcome")))
    return out


def _stalled_rpc(kupd: Kupd, method: str, request: bytes, how: str) -> None:
    """Call ``method`` from a client that never reads its reply; once kupd
    has answered (the reply's headers came: it took the message), the
    client cancels the RPC or closes its connection."""
    stalled = H2Conn(kupd.socket, window=0)  # kupd may send headers, never data
    try:
        stream = stalled.grpc_request(method, request)
        stalled.wait_for(HEADERS, stream, timeout=60.0)
        if how == "cancels":
            stalled.cancel(stream)
    finally:
        stalled.close()


@pytest.mark.parametrize("how", ["cancels", "disconnects"])
def test_a_receive_whose_caller_went_away_leaves_the_message_for_the_next(
    kupd: Kupd, client: Client, lease_id: str, how: str
) -> None:
    client.lease_send(lease_id, b"the one message")
    req = kup_pb2.ReceiveRequest(lease_id=lease_id, mode=kup_pb2.RECEIVE_MODE_BLOCK)
    _stalled_rpc(kupd, "/kup.v1.Kup/Receive", req.SerializeToString(), how)
    # (the next operation waits for the lease until kupd knows whether the
    # reply went out: no wait for kupd to notice is needed here)
    # until it is received, a send would answer without reading it
    with pytest.raises(errors.NotYourTurn, match="receive it first"):
        client.lease_send(lease_id, b"over it")
    got = client.lease_receive(lease_id, timeout=30)
    assert (got.kind, got.data) == (Kind.DATA, b"the one message")
    assert _undelivered(kupd, lease_id) == ["held back for the next receive"]
    # exactly once: it is received (the turn is this side's), and the
    # lease goes on
    with pytest.raises(errors.NotYourTurn, match="already received"):
        client.lease_receive(lease_id, timeout=0)
    assert client.lease_exchange(lease_id, b"next", timeout=30).data == b"next"


def test_a_send_whose_caller_went_away_leaves_its_reply_for_the_next_receive(
    kupd: Kupd, client: Client, lease_id: str
) -> None:
    req = kup_pb2.SendRequest(
        lease_id=lease_id,
        data=b"request",
        wait_reply=True,
        reply_mode=kup_pb2.RECEIVE_MODE_BLOCK,
    )
    _stalled_rpc(kupd, "/kup.v1.Kup/Send", req.SerializeToString(), "cancels")
    # a non-blocking receive gets it as well, once kupd has seen the reply
    # not delivered: until then the lease is busy with that Send, and a
    # non-blocking receive finds nothing (NotReady) rather than waiting
    got: list[Message] = []

    def received() -> bool:
        try:
            got.append(client.lease_receive(lease_id, timeout=0))
        except errors.NotReady:
            return False
        return True

    wait_until(received, timeout=60.0, what="a non-blocking receive to get the reply")
    assert [(m.kind, m.data) for m in got] == [(Kind.DATA, b"request")]
    assert _undelivered(kupd, lease_id) == ["held back for the next receive"]
    with pytest.raises(errors.NotYourTurn, match="already received"):
        client.lease_receive(lease_id, timeout=0)


def test_a_delivered_reply_is_not_held_back(
    kupd: Kupd, client: Client, lease_id: str
) -> None:
    """Replies that reach their caller leave nothing behind: no duplicate."""
    for i in range(5):
        client.lease_send(lease_id, b"m%d" % i)
        assert client.lease_receive(lease_id, timeout=30).data == b"m%d" % i
        assert client.lease_exchange(lease_id, b"x%d" % i, timeout=30).data == b"x%d" % i
    with pytest.raises(errors.NotYourTurn, match="already received"):
        client.lease_receive(lease_id, timeout=0)
    assert _undelivered(kupd, lease_id) == []


def test_a_message_not_delivered_after_its_lease_ended_goes_with_it(
    kupd: Kupd, client: Client, lease_id: str
) -> None:
    """Released while the reply waited to be written: the message goes with
    the lease, and its channel is free again once the RPC is over."""
    chan = next(
        c.id
        for c in client.devices("echo")[0].channels
        if c.state == "lease" and c.lease_id == lease_id
    )
    client.lease_send(lease_id, b"late")
    stalled = H2Conn(kupd.socket, window=0)
    try:
        req = kup_pb2.ReceiveRequest(lease_id=lease_id, mode=kup_pb2.RECEIVE_MODE_BLOCK)
        stream = stalled.grpc_request("/kup.v1.Kup/Receive", req.SerializeToString())
        stalled.wait_for(HEADERS, stream, timeout=60.0)
        client.release(lease_id)
        stalled.cancel(stream)
    finally:
        stalled.close()
    wait_until(
        lambda: _undelivered(kupd, lease_id) != [],
        timeout=60.0,
        what="kupd to see that the reply was not delivered",
    )
    assert _undelivered(kupd, lease_id) == ["gone with the lease"]
    wait_until(
        lambda: client.devices("echo")[0].channels[chan].state == "free",
        timeout=60.0,
        what=f"channel {chan} to be free",
    )


#: echo answers this after holding the channel locked for 1.5 s: long
#: enough for the test to stop kupd while its Receive waits, short enough
#: to repeat
SLOW = b"!lockhold1500"
#: tries at most (each one ~2 s); the test ends at the first that shows the
#: race won by the message
TRIES = 40


def _holds_ended(sim: KupSim, chan: int) -> int:
    return sim.stderr().count(f"echo: chan {chan}: lock hold ended")


def _receives(kupd: Kupd) -> int:
    """Receive RPCs kupd has begun to serve (its debug line for each)."""
    return kupd.log().count('"event": "receive"')


def test_a_grpc_receive_cancelled_as_the_message_arrives_keeps_it(
    sim: KupSim, kupd: Kupd, client: Client, lease_id: str
) -> None:
    """A real gRPC client's Receive, cancelled while kupd is stopped and
    the module's reply has just arrived: when kupd runs again, both the
    cancel and the channel's wake-up are pending, and kupd may take the
    message for the RPC the client has already given up on -- and either
    find the reply cannot be written (the message stays the lease's), or
    write it before it reads the cancel (gRPC drops it on the client's
    side; the next Receive names the cancelled one, again_of, and kupd
    answers it with the same message: test_gw_receive_reply_dropped.py).
    Repeated until kupd is seen to have taken one it could not write;
    every time, the next Receive gets exactly the message."""
    chan = next(c.id for c in client.devices("echo")[0].channels if c.lease_id == lease_id)
    with grpc.insecure_channel(f"unix:{kupd.socket}") as gch:
        tries = _cancel_as_it_arrives(sim, kupd, client, lease_id, chan, gch)
    assert _undelivered(kupd, lease_id) == ["held back for the next receive"], (
        f"kupd did not take the message for a cancelled Receive in {TRIES} tries"
    )
    print(f"kupd took the message for a cancelled Receive at try {tries}")


def _cancel_as_it_arrives(
    sim: KupSim, kupd: Kupd, client: Client, lease_id: str, chan: int, gch: grpc.Channel
) -> int:
    """Receive, cancelled as the message arrives, until kupd logs that it
    took one for a cancelled Receive (or TRIES); the next Receive must get
    each message.  The number of tries."""
    stub = kup_pb2_grpc.KupStub(gch)
    for i in range(TRIES):
        ended = _holds_ended(sim, chan)
        receives = _receives(kupd)
        client.lease_send(lease_id, SLOW + b" %d" % i)
        # named: kupd may also have written the reply before it read the
        # cancel (gRPC then drops it), and the next receive asks for it
        req = kup_pb2.ReceiveRequest(
            lease_id=lease_id, mode=kup_pb2.RECEIVE_MODE_BLOCK, receive_id=f"r{i}"
        )
        fut = stub.Receive.future(req)
        wait_until(lambda n=receives: _receives(kupd) > n, what="kupd to take the Receive")
        os.kill(kupd.pid, signal.SIGSTOP)
        try:
            wait_until(lambda: all_stopped(kupd.pid), what="kupd to stop")
            # the module answers while kupd is stopped; then the cancel
            wait_until(lambda n=ended: _holds_ended(sim, chan) > n, what="echo to answer")
            fut.cancel()
        finally:
            os.kill(kupd.pid, signal.SIGCONT)
        again = kup_pb2.ReceiveRequest(
            lease_id=lease_id, mode=kup_pb2.RECEIVE_MODE_BLOCK, again_of=f"r{i}"
        )
        got = stub.Receive(again, timeout=30)
        assert got.message.data == SLOW + b" %d" % i, (i, got)
        if _undelivered(kupd, lease_id):
            return i + 1
    return TRIES
