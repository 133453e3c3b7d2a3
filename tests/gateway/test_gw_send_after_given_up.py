"""A Send or Pass after a lease receive given up on loses nothing.

kupd keeps the message it answered a named receive with until the lease's
next operation (Lease.delivered), for a client that gave up on the reply
after kupd wrote it (its gRPC library drops it): its next Receive names
that receive (``again_of``) and gets the message (test_gw_receive_reply_
dropped.py).  But when the lease's next operation was a Send, a Pass or an
exchange -- the same thread sending anyway after its receive timed out, or
another thread sharing the lease -- kupd dropped the kept message and the
Send succeeded: the kernel's message was gone and nobody was told.  (One
kupd had taken but not written, Lease.held, was refused NotYourTurn
already.)

Now Send and Pass carry ``again_of`` too (the clients send the name they
would ask again for): one over the kept DATA message it names is refused
NotYourTurn, nothing sent, and the message stays kept for the Receive that
asks again.  Real kupsim (echo), kupd and clients; the window in which kupd
has written the reply and the client gives up on it is held open by the
h2stall proxy.
"""

from __future__ import annotations

import asyncio
import re
import urllib.request
from collections.abc import Callable, Iterator

import pytest
from gateway_helpers import Kupd, StartKupd
from h2stall import StallProxy

from kupapi import kup_pb2
from kupclient import AsyncClient, Client, Kind
from kupclient.errors import ArgumentError
from kupd import errors
from kupd.testing import KupSim, with_metrics_port

#: far beyond the test: the lease must not idle out under it
IDLE_TIMEOUT = 600.0
#: a receive's timeout through the proxy: kupd answers at once (the message
#: is there), the proxy holds its status, the client's deadline (this +
#: KUPD_GRACE) passes (see test_gw_receive_reply_dropped.py's SHORT)
SHORT = 1.0
#: what the refusal says
REFUSED = r"has not received the message of its receive {}.*receive it first \(again_of\)"


@pytest.fixture
def kupd(sim: KupSim, start_kupd: StartKupd) -> Kupd:
    return with_metrics_port(
        lambda port: start_kupd(
            sim, "--lease-idle-timeout", str(IDLE_TIMEOUT), "--metrics-port", str(port)
        )
    )


def _sent_to_kernel(kupd: Kupd) -> float:
    """kupd_messages_total to the kernel, over echo's channels."""
    assert kupd.metrics_url is not None
    text = urllib.request.urlopen(kupd.metrics_url, timeout=10).read().decode()
    return sum(
        float(m.group(1))
        for m in re.finditer(r'^kupd_messages_total\{(?=[^}]*direction="to_kernel")[^}]*\} (\S+)$',
                             text, re.M)
    )


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


def _named_receive(client: Client, lease_id: str, receive_id: str) -> kup_pb2.ReceiveResponse:
    """A Receive named ``receive_id`` (raw): kupd writes its reply and keeps
    the message -- to kupd, one whose client then dropped it looks the same."""
    resp: kup_pb2.ReceiveResponse = client._unary(
        "Receive",
        kup_pb2.ReceiveRequest(
            lease_id=lease_id, mode=kup_pb2.RECEIVE_MODE_BLOCK, receive_id=receive_id
        ),
        30.0,
    )
    return resp


def _raw_ops(client: Client, lease_id: str) -> dict[str, Callable[[str], object]]:
    """Send, Pass and exchange (Send with wait_reply) carrying ``again_of``,
    through the client's error mapping."""
    return {
        "send": lambda again_of: client._unary(
            "Send", kup_pb2.SendRequest(lease_id=lease_id, data=b"x", again_of=again_of), 30.0
        ),
        "pass": lambda again_of: client._unary(
            "Pass", kup_pb2.PassRequest(lease_id=lease_id, again_of=again_of), 30.0
        ),
        "exchange": lambda again_of: client._unary(
            "Send",
            kup_pb2.SendRequest(
                lease_id=lease_id,
                data=b"x",
                wait_reply=True,
                reply_mode=kup_pb2.RECEIVE_MODE_BLOCK,
                receive_id="the-exchange",
                again_of=again_of,
            ),
            30.0,
        ),
    }


@pytest.mark.parametrize("op", ["send", "pass", "exchange"])
def test_an_operation_over_the_kept_message_it_names_is_refused(
    kupd: Kupd, client: Client, lease_id: str, op: str
) -> None:
    """Refused NotYourTurn as often as it comes, nothing sent (nor counted
    as sent); the message stays kept and the Receive that asks again gets
    it, once."""
    client.lease_send(lease_id, b"the kernel's message")
    assert _named_receive(client, lease_id, "given-up").message.data == b"the kernel's message"
    sent = _sent_to_kernel(kupd)
    assert sent >= 1
    do = _raw_ops(client, lease_id)[op]
    for _ in range(2):
        with pytest.raises(errors.NotYourTurn, match=REFUSED.format("given-up")):
            do("given-up")
    assert _sent_to_kernel(kupd) == sent
    again = client._unary(
        "Receive",
        kup_pb2.ReceiveRequest(
            lease_id=lease_id, mode=kup_pb2.RECEIVE_MODE_NONBLOCK, again_of="given-up"
        ),
        30.0,
    )
    assert (again.message.kind, again.message.data) == (
        kup_pb2.MESSAGE_KIND_DATA,
        b"the kernel's message",
    )
    # nothing was sent (echo would have answered it) and nothing left
    # locked: the turn is this side's, and the lease goes on
    with pytest.raises(errors.NotYourTurn, match="already received"):
        client.lease_receive(lease_id, timeout=0)
    assert client.lease_exchange(lease_id, b"next", timeout=30).data == b"next"


@pytest.mark.parametrize("op", ["send", "pass", "exchange"])
def test_again_of_naming_anything_else_lets_the_operation_run(
    client: Client, lease_id: str, op: str
) -> None:
    """A name that is not the kept message's -- an older receive, another
    client's -- changes nothing: the operation runs as before (over the
    kept message, which its client said it has)."""
    client.lease_send(lease_id, b"received")
    assert _named_receive(client, lease_id, "this-one").message.data == b"received"
    _raw_ops(client, lease_id)[op]("another-one")
    if op != "exchange":
        got = client.lease_receive(lease_id, timeout=30)
        assert (got.kind, got.data) == ((Kind.PASS, b"") if op == "pass" else (Kind.DATA, b"x"))


def test_a_kept_pass_is_not_in_the_way(client: Client, lease_id: str) -> None:
    """The kernel's PASS carries nothing: as one kupd held back (and as
    libkup drops an unread PASS), a kept one does not refuse a Send."""
    client.lease_pass(lease_id)
    assert _named_receive(client, lease_id, "a-pass").message.kind == kup_pb2.MESSAGE_KIND_PASS
    _raw_ops(client, lease_id)["send"]("a-pass")
    assert client.lease_receive(lease_id, timeout=30).data == b"x"


@pytest.mark.parametrize("op", ["send", "pass", "exchange"])
def test_a_bad_again_of_is_refused_naming_the_field(
    client: Client, lease_id: str, op: str
) -> None:
    """As a Receive's: INVALID_ARGUMENT naming again_of, nothing done (the
    kept message is still asked for by its name)."""
    client.lease_send(lease_id, b"kept")
    _named_receive(client, lease_id, "kept-one")
    do = _raw_ops(client, lease_id)[op]
    for bad, needle in (("x" * 65, "again_of of 65 characters"), ("no spaces", "again_of 'no")):
        with pytest.raises(errors.InvalidArgument, match=needle):
            do(bad)
    with pytest.raises(errors.NotYourTurn, match=REFUSED.format("kept-one")):
        do("kept-one")


# -- the Python clients: the name given up on goes with Send, Pass, exchange


@pytest.fixture
def proxy(kupd: Kupd) -> Iterator[StallProxy]:
    p = StallProxy(kupd.socket + ".stall", kupd.socket)
    yield p
    p.close()


def test_the_sync_client_sends_after_a_receive_past_its_deadline_without_loss(
    client: Client, proxy: StallProxy, lease_id: str
) -> None:
    """The program sends anyway after its receive timed out: lease_send,
    lease_pass and lease_exchange are NotYourTurn (the message lost
    before), the name stays, and lease_receive gets the message."""
    client.lease_send(lease_id, b"not lost")
    with Client(proxy.path) as c:
        with pytest.raises(errors.DeadlineExceeded):
            c.lease_receive(lease_id, timeout=SHORT)
        assert proxy.status_held.is_set(), "kupd did not answer within the deadline"
        name = c._again.pending(lease_id)
        with pytest.raises(errors.NotYourTurn, match=REFUSED.format(name)):
            c.lease_send(lease_id, b"sent anyway")
        with pytest.raises(errors.NotYourTurn, match=REFUSED.format(name)):
            c.lease_pass(lease_id)
        with pytest.raises(errors.NotYourTurn, match=REFUSED.format(name)):
            c.lease_exchange(lease_id, b"exchanged anyway", timeout=30)
        assert c._again.pending(lease_id) == name
        got = c.lease_receive(lease_id, timeout=30)
        assert (got.kind, got.data) == (Kind.DATA, b"not lost")
        assert c._again.pending(lease_id) == ""
        c.lease_send(lease_id, b"now")
        assert c.lease_receive(lease_id, timeout=30).data == b"now"


def test_another_asyncio_task_sends_after_a_receive_was_cancelled_without_loss(
    client: Client, proxy: StallProxy, lease_id: str
) -> None:
    """One task's receive is cancelled after kupd wrote its reply; another
    task sharing the lease sends: NotYourTurn (the message lost before),
    and the next receive gets it."""
    client.lease_send(lease_id, b"not lost either")

    async def main() -> None:
        async with AsyncClient(proxy.path) as c:
            task = asyncio.ensure_future(c.lease_receive(lease_id, timeout=30))
            while not proxy.status_held.is_set():
                assert not task.done(), task
                await asyncio.sleep(0.02)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await asyncio.to_thread(proxy.reset_seen.wait, 60)
            name = c._again.pending(lease_id)
            for other in (
                c.lease_send(lease_id, b"sent anyway"),
                c.lease_pass(lease_id),
                c.lease_exchange(lease_id, b"exchanged anyway", timeout=30),
            ):
                with pytest.raises(errors.NotYourTurn, match=REFUSED.format(name)):
                    await asyncio.ensure_future(other)
            assert c._again.pending(lease_id) == name
            got = await c.lease_receive(lease_id, timeout=30)
            assert (got.kind, got.data) == (Kind.DATA, b"not lost either")
            await c.lease_send(lease_id, b"now")
            assert (await c.lease_receive(lease_id, timeout=30)).data == b"now"

    asyncio.run(main())


# -- a program that keeps the names itself (a new client for each operation)


def test_a_send_or_pass_given_the_name_itself_is_refused_over_its_message(
    kupd: Kupd, client: Client, lease_id: str
) -> None:
    """A program whose receives outlive the client (a new process each, as
    kupctl) names its receives itself (lease_receive's receive_id and
    again_of) -- but lease_send and lease_pass took no name: a fresh client
    sending after such a receive given up on ran over the message kupd had
    kept for it, and it was gone.  Now they take ``again_of`` too (sync and
    asyncio): NotYourTurn, nothing sent, and the message stays for the
    receive that asks again; a bad name is refused before it is sent."""
    client.lease_send(lease_id, b"kept for the named one")
    assert _named_receive(client, lease_id, "named-1").message.data == b"kept for the named one"
    with Client(kupd.socket) as fresh:
        with pytest.raises(errors.NotYourTurn, match=REFUSED.format("named-1")):
            fresh.lease_send(lease_id, b"sent anyway", again_of="named-1")
        with pytest.raises(errors.NotYourTurn, match=REFUSED.format("named-1")):
            fresh.lease_pass(lease_id, again_of="named-1")
        with pytest.raises(ArgumentError, match="again_of"):
            fresh.lease_send(lease_id, b"x", again_of="no spaces")

    async def refused() -> None:
        async with AsyncClient(kupd.socket) as c:
            with pytest.raises(errors.NotYourTurn, match=REFUSED.format("named-1")):
                await c.lease_send(lease_id, b"sent anyway", again_of="named-1")
            with pytest.raises(errors.NotYourTurn, match=REFUSED.format("named-1")):
                await c.lease_pass(lease_id, again_of="named-1")
            with pytest.raises(ArgumentError, match="again_of"):
                await c.lease_pass(lease_id, again_of="x" * 65)

    asyncio.run(refused())
    with Client(kupd.socket) as fresh:
        got = fresh.lease_receive(lease_id, timeout=0, again_of="named-1")
        assert (got.kind, got.data) == (Kind.DATA, b"kept for the named one")
        # a name that is not the kept one's lets it run
        fresh.lease_send(lease_id, b"then", again_of="named-1-other")
        assert fresh.lease_receive(lease_id, timeout=30).data == b"then"


def test_a_receive_not_naming_the_kept_message_leaves_it_kept(
    kupd: Kupd, client: Client, lease_id: str
) -> None:
    """A Receive that does not name the kept message -- ``kupctl recv L``
    run again (the shell's history) instead of the command it printed,
    another client sharing the lease -- is refused NotYourTurn "already
    received", nothing done: as for a Send, the message now stays kept
    (before, the refusal dropped it, and the receive that then named it got
    "already received" too: the message was gone), and the error says
    which receive it is kept for."""
    client.lease_send(lease_id, b"still there")
    assert _named_receive(client, lease_id, "written-1").message.data == b"still there"
    refused = "already received.*for receive written-1, kept for a receive that names it"
    with Client(kupd.socket) as other:
        for timeout in (0.0, 30.0, 0.0):
            with pytest.raises(errors.NotYourTurn, match=refused):
                other.lease_receive(lease_id, timeout=timeout)
        got = other.lease_receive(lease_id, timeout=0, again_of="written-1")
        assert (got.kind, got.data) == (Kind.DATA, b"still there")
    # kept for that name still (that receive carried it): refused so again
    with pytest.raises(errors.NotYourTurn, match=refused):
        client._unary(
            "Receive",
            kup_pb2.ReceiveRequest(lease_id=lease_id, mode=kup_pb2.RECEIVE_MODE_NONBLOCK),
            30.0,
        )
    # a send not naming it runs over it (its client said it has it)
    assert client.lease_exchange(lease_id, b"on", timeout=30).data == b"on"
