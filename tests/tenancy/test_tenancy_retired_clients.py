"""The clients of a tenant socket a reload retires (moves, or removes with
its tenant: kupd.tenants.SocketSet._retire) all get kupd's own status: what
was under way there ends with it, and an RPC that starts afterwards on a
connection the retired server still serves is refused with it -- never run
with the tenant the socket served, never cut by the connection closing
(gRPC's "Stream removed").  The retired server stops once what it serves
is over: its statuses go out before it tells its connections to go.
Meanwhile what it refuses with follows its tenant's socket (a later
reload moving it on, or removing the tenant), and a reload that gives the
tenant its socket back at that path makes the old server serve it again:
no client is told to connect to a path that no longer serves the tenant."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tenancy_helpers import StartTenants, TenantKupd, free_echo

from kupapi import kup_pb2, kup_pb2_grpc
from kupclient import Client, Message
from kupd import errors
from kupd.testing import REPO_ROOT, echo_lock_holds, in_background, wait_until

sys.path.insert(0, str(REPO_ROOT / "tests" / "gateway"))

from h2raw import DATA, GOAWAY, HEADERS, H2Conn

#: a Call on a pool channel would be given an hour: what keeps the retired
#: server up is the Call echo holds (below), never a deadline running out
HEAD = 'call_timeout = 3600\nlog_level = "debug"\n'

#: echo has one pool channel: a second Call of alice's queues behind the
#: first; bob stays whatever the reload does to alice
BODY = """
[[device]]
name = "echo"
call_channels = 1

[[tenant]]
name = "alice"
socket = "@DIR@/alice.sock"
[[tenant.grant]]
device = "echo"

[[tenant]]
name = "bob"
socket = "@DIR@/bob.sock"
[[tenant.grant]]
device = "echo"
"""
MOVED = BODY.replace("alice.sock", "alice2.sock")
REMOVED = BODY[: BODY.index('[[tenant]]\nname = "alice"')] + BODY[BODY.index(
    '[[tenant]]\nname = "bob"'
):]

#: echo keeps the channel of this Call locked, its reply owed, until a
#: "!lockfree" (or 60 s): a Call in flight on alice's socket for as long as
#: the test needs it
HOLD = b"!lockhold60000"


def _reload(k: TenantKupd, how: str) -> str:
    """Move or remove alice's socket; what its RPCs are told."""
    old = k.sock("alice")
    k.write_config(HEAD + (MOVED if how == "moved" else REMOVED))
    with k.admin() as adm:
        adm.reload()
    if how == "moved":
        return f"tenant alice: a reload moved its socket from {old} to {k.sock('alice2')}: " \
            "connect there"  # fmt: skip
    return f"tenant alice: a reload removed its socket {old}"


@contextlib.contextmanager
def _freeing_echo(k: TenantKupd) -> Iterator[None]:
    """Whatever happens in the block, echo holds nothing after it: the next
    test finds its channels free."""
    try:
        yield
    finally:
        free_echo(k)


def _hold_a_call(k: TenantKupd, a: Client) -> Any:
    """A Call of ``a``'s on echo's one pool channel, its reply held."""
    holds = echo_lock_holds(k.sim)
    running = in_background(lambda: a.call("echo", HOLD, timeout=600))
    wait_until(lambda: echo_lock_holds(k.sim) > holds, what="echo to hold the Call")
    return running


@pytest.mark.parametrize("how", ["moved", "removed"])
def test_what_waits_on_a_retired_socket_gets_kupds_status(
    start_tenants: StartTenants, how: str
) -> None:
    """On alice's socket: a Call echo holds, a Call queued behind it, a
    Watch, a Session waiting for an exchange's reply, and a blocking Receive of an
    Attach lease.  A reload moves her socket, or removes her: each waiting
    one ends with kupd's status -- the move's or removal's UNAVAILABLE, or,
    for what the removal's policy ended first (her leases, her queued
    Call), its PERMISSION_DENIED --, and so is the client's next RPC on
    that connection; the held Call runs on and gets its reply."""
    k = start_tenants(HEAD + BODY)
    with k.client("alice") as a, _freeing_echo(k):
        running = _hold_a_call(k, a)
        queued = in_background(lambda: a.call("echo", b"queued", timeout=600))
        wait_until(lambda: a.devices("echo")[0].calls_queued == 1, what="the Call queued")
        events = a.watch("echo", initial_state=True)
        assert next(events).initial  # the stream is open in kupd
        session = a.open("echo").channel(9)
        session.receive(timeout=10)
        holds = echo_lock_holds(k.sim)
        in_session = in_background(lambda: session.exchange(HOLD))
        wait_until(lambda: echo_lock_holds(k.sim) > holds, what="echo to hold the exchange")
        lease = a.attach("echo", 10)
        assert a.lease_receive(lease.lease_id, timeout=10).kind.name == "PASS"
        holds = echo_lock_holds(k.sim)
        a.lease_send(lease.lease_id, HOLD)
        wait_until(lambda: echo_lock_holds(k.sim) > holds, what="echo to hold the reply")
        receive = in_background(lambda: a.lease_receive(lease.lease_id))

        def watch_end() -> BaseException | None:
            try:
                for _ in events:
                    pass
            except errors.KupError as exc:
                return exc
            return None

        watched = in_background(watch_end)
        why = _reload(k, how)
        ended = {
            "watch": watched.outcome(30),
            "session": in_session.outcome(30),
            "receive": receive.outcome(30),
            "queued call": queued.outcome(30),
        }
        # the client's next RPC, on the connection the retired server still
        # serves (the held Call keeps it up), is told the same -- not run
        with pytest.raises(errors.Unavailable) as next_rpc:
            a.devices("echo")
        assert str(next_rpc.value).endswith(why), next_rpc.value
        free_echo(k)
        reply = running.outcome(30)
        session.close()
    assert isinstance(reply, Message) and reply.data.lower() == HOLD, reply
    if how == "moved":
        for what, exc in ended.items():
            assert isinstance(exc, errors.Unavailable), (what, exc)
            assert why in str(exc), (what, exc)
        assert "it was not sent" in str(ended["queued call"]), ended
        return
    assert isinstance(ended["watch"], errors.Unavailable), ended
    assert why in str(ended["watch"]), ended
    for what, op in (("session", "session"), ("receive", "lease"), ("queued call", "call")):
        exc = ended[what]
        assert isinstance(exc, errors.PermissionDenied), (what, exc)
        assert "tenant alice: rule " in str(exc), (what, exc)
        assert f"no longer allows {op} on device echo" in str(exc), (what, exc)


def _refused(why: str, rpc: Any, *args: Any) -> None:
    """``rpc`` fails with kupd's UNAVAILABLE ``why``, marked as kupd's own."""
    with pytest.raises(grpc.RpcError) as e:
        out = rpc(*args)
        if hasattr(out, "__next__"):  # a stream: its first response
            next(out)
    err: Any = e.value
    assert err.code() == grpc.StatusCode.UNAVAILABLE, (rpc, err)
    assert err.details() == why, (rpc, err)
    assert ("kup-error", "Unavailable") in tuple(err.trailing_metadata() or ()), (rpc, err)


@pytest.mark.parametrize("how", ["moved", "removed"])
def test_rpcs_that_start_on_a_retired_socket_are_refused(
    start_tenants: StartTenants, how: str
) -> None:
    """A channel to alice's socket, connected before a reload moves it (or
    removes her) -- its connection the retired server's, which a Call echo
    holds keeps up: every RPC made on it afterwards is refused at its start
    with the move's (or removal's) UNAVAILABLE -- the unary ones on an
    Attach lease too, which ran with her old socket's tenant before --,
    and nothing was done: the lease's message is still there."""
    k = start_tenants(HEAD + BODY)
    old = k.sock("alice")
    chan = grpc.insecure_channel("unix:" + old)
    try:
        kup = kup_pb2_grpc.KupStub(chan)
        health = health_pb2_grpc.HealthStub(chan)
        assert kup.ListDevices(kup_pb2.ListDevicesRequest(), timeout=30).devices
        lease = kup.Attach(kup_pb2.AttachRequest(device="echo", channel=10), timeout=30)
        with k.client("alice") as a, _freeing_echo(k):
            running = _hold_a_call(k, a)
            why = _reload(k, how)
            lid = lease.lease_id
            block = kup_pb2.RECEIVE_MODE_BLOCK
            for rpc, req in (
                (kup.ListDevices, kup_pb2.ListDevicesRequest()),
                (kup.Attach, kup_pb2.AttachRequest(device="echo", channel=11)),
                (kup.Receive, kup_pb2.ReceiveRequest(lease_id=lid, mode=block)),
                (kup.Send, kup_pb2.SendRequest(lease_id=lid, data=b"x")),
                (kup.Pass, kup_pb2.PassRequest(lease_id=lid)),
                (kup.Release, kup_pb2.ReleaseRequest(lease_id=lid)),
                (kup.Call, kup_pb2.CallRequest(device="echo", data=b"x")),
                (kup.Watch, kup_pb2.WatchRequest(initial_state=True)),
                (health.Check, health_pb2.HealthCheckRequest()),
                (health.Watch, health_pb2.HealthCheckRequest()),
            ):
                _refused(why, rpc, req, 30)
            attach = kup_pb2.SessionRequest(attach=kup_pb2.SessionAttach(device="echo"))
            _refused(why, kup.Session, iter([attach]), 30)
            free_echo(k)
            reply = running.outcome(30)
        assert isinstance(reply, Message) and reply.data.lower() == HOLD, reply
    finally:
        chan.close()
    if how == "moved":
        # the lease is untouched: its first message is still there
        with Client(k.sock("alice2")) as a2:
            assert a2.lease_receive(lid, timeout=10).kind.name == "PASS"
            a2.release(lid)
    refused = [r.get("rpc") for r in _records(k, "rpc failed") if r.get("error") == why]
    # each logged and counted as a failed RPC, as kupd's other refusals
    assert sorted(refused) == [
        "Attach", "Call", "Health.Check", "Health.Watch", "ListDevices", "Pass", "Receive",
        "Release", "Send", "Session", "Watch",
    ], refused  # fmt: skip


def _records(k: TenantKupd, event: str) -> list[dict[str, Any]]:
    recs = [json.loads(x) for x in k.log().splitlines() if x.startswith("{")]
    return [r for r in recs if r.get("event") == event]


@pytest.mark.parametrize("how", ["moved", "removed"])
def test_a_retired_servers_statuses_go_out_before_it_tells_its_connection_to_go(
    start_tenants: StartTenants, how: str
) -> None:
    """A Watch on alice's socket over a bare HTTP/2 connection, the only
    RPC there.  A reload retires the socket: the Watch's status (its
    trailers) is on the connection before the retired server's GOAWAY --
    the server stopped in the same turn as it ended the Watch sent its
    GOAWAY first, and closed the connection as the status followed: a
    client writing meanwhile lost the status ("Stream removed (sendmsg:
    Broken pipe)").  Then the server, its RPCs over, closes the
    connection."""
    k = start_tenants(HEAD + BODY)
    raw = H2Conn(k.sock("alice"))
    try:
        stream = raw.grpc_request(
            "/kup.v1.Kup/Watch", kup_pb2.WatchRequest(initial_state=True).SerializeToString()
        )
        raw.wait_for(DATA, stream)  # the stream is open in kupd
        _reload(k, how)
        wait_until(lambda: raw.closed, timeout=60, what="the retired server to close")
    finally:
        raw.close()
    frames = list(raw.frames)
    kinds = [(f.type, f.stream, f.flags & 0x1) for f in frames]
    trailers = kinds.index((HEADERS, stream, 1))
    goaways = [i for i, f in enumerate(frames) if f.type == GOAWAY]
    assert goaways, kinds
    assert trailers < goaways[0], kinds


def test_a_socket_moved_and_back_serves_the_old_servers_connections(
    start_tenants: StartTenants,
) -> None:
    """A reload moves alice's socket, the next moves it back at once, while
    the first socket's retired server still serves a Call echo holds: its
    connection is still open, and gRPC hands it to every channel of this
    process to alice.sock -- a new client object's too.  Their RPCs are
    served there as alice's (the retired server is alice's socket's again,
    as a server a reload replaced: kupd.tenants.SocketSet._reinstate) --
    never refused with the first move's "connect there", which names a path
    that no longer serves her."""
    k = start_tenants(HEAD + BODY)
    stale = f"to {k.sock('alice2')}: connect there"
    with k.client("alice") as a, _freeing_echo(k):
        running = _hold_a_call(k, a)
        events = a.watch("echo", initial_state=True)
        assert next(events).initial  # the stream is open in kupd
        watched = in_background(lambda: list(events))
        _reload(k, "moved")
        moved = watched.outcome(30)
        assert isinstance(moved, errors.Unavailable) and str(moved).endswith(stale), moved
        k.write_config(HEAD + BODY)
        with k.admin() as adm:
            adm.reload()
        with Client(k.sock("alice")) as fresh:
            assert [d.name for d in fresh.devices("echo")] == ["echo"]
            # a Session (served by a handler built with the server: the
            # retirement it is given is the new one too)
            with fresh.open("echo").channel(12) as ch:
                ch.receive(timeout=10)
                assert ch.exchange(b"ping", timeout=30).data.lower() == b"ping"
        assert [d.name for d in a.devices("echo")] == ["echo"]
        free_echo(k)
        reply = running.outcome(30)
    assert isinstance(reply, Message) and reply.data.lower() == HOLD, reply
    back = _records(k, "retired socket server serves again")
    assert [r.get("socket") for r in back] == [k.sock("alice")], back


def test_a_socket_made_again_with_another_mode_does_not_serve_the_old_connections(
    start_tenants: StartTenants,
) -> None:
    """A reload removes alice, the next adds her back at once at the same
    path but with another mode, while the removed socket's retired server
    still serves a Call echo holds.  The old server's connections were let
    in by the old mode: they are not served again as alice's (what starts
    there is refused as removed) -- the new socket serves new connections,
    once the old server has stopped and this process connects afresh."""
    k = start_tenants(HEAD + BODY)
    old = k.sock("alice")
    remade = BODY.replace(
        'socket = "@DIR@/alice.sock"\n', 'socket = "@DIR@/alice.sock"\nmode = "0660"\n'
    )
    assert remade != BODY
    with k.client("alice") as a, _freeing_echo(k):
        running = _hold_a_call(k, a)
        _reload(k, "removed")
        k.write_config(HEAD + remade)
        with k.admin() as adm:
            adm.reload()
        with Client(old) as fresh, pytest.raises(errors.Unavailable) as refused:
            fresh.devices("echo")
        assert f"tenant alice: a reload removed its socket {old}" in str(refused.value), (
            refused.value
        )
        free_echo(k)
        reply = running.outcome(30)
    assert isinstance(reply, Message) and reply.data.lower() == HOLD, reply
    assert not _records(k, "retired socket server serves again")
    changed = "retired socket server not served again: the socket's owner, group or mode changed"
    assert _records(k, changed)
    wait_until(
        lambda: bool(_records(k, "retired socket server stopped")),
        what="the retired server to stop",
    )
    with Client(old) as later:
        assert [d.name for d in later.devices("echo")] == ["echo"]


@pytest.mark.parametrize("then", ["moved on", "removed"])
def test_a_retired_servers_refusal_follows_its_tenants_socket(
    start_tenants: StartTenants, then: str
) -> None:
    """A reload moves alice's socket to alice2.sock; while the retired
    server of alice.sock still runs a Call echo holds, the next reload
    moves her socket on to alice3.sock (or removes her).  What starts on
    the old connection is refused saying where her socket is now -- never
    the first move's alice2.sock, which serves nobody since."""
    k = start_tenants(HEAD + BODY)
    old = k.sock("alice")
    with k.client("alice") as a, _freeing_echo(k):
        running = _hold_a_call(k, a)
        _reload(k, "moved")
        if then == "moved on":
            k.write_config(HEAD + BODY.replace("alice.sock", "alice3.sock"))
            why = f"tenant alice: a reload moved its socket from {old} to {k.sock('alice3')}: " \
                "connect there"  # fmt: skip
        else:
            k.write_config(HEAD + REMOVED)
            why = f"tenant alice: a reload removed its socket {old}"
        with k.admin() as adm:
            adm.reload()
        with pytest.raises(errors.Unavailable) as refused:
            a.devices("echo")
        assert str(refused.value).endswith(why), refused.value
        free_echo(k)
        reply = running.outcome(30)
    assert isinstance(reply, Message) and reply.data.lower() == HOLD, reply


def test_a_socket_moved_back_and_away_again_retires_the_old_server_again(
    start_tenants: StartTenants,
) -> None:
    """Moved, moved back (its retired server serving alice's connections
    again), moved away again: the old server is retired with the new
    server of alice.sock -- what starts on its connection is refused with
    the last move's status -- and stops once its Call is over."""
    k = start_tenants(HEAD + BODY)
    with k.client("alice") as a, _freeing_echo(k):
        running = _hold_a_call(k, a)
        _reload(k, "moved")
        k.write_config(HEAD + BODY)
        with k.admin() as adm:
            adm.reload()
        assert [d.name for d in a.devices("echo")] == ["echo"]  # served again
        why = _reload(k, "moved")
        with pytest.raises(errors.Unavailable) as refused:
            a.devices("echo")
        assert str(refused.value).endswith(why), refused.value
        free_echo(k)
        reply = running.outcome(30)
    assert isinstance(reply, Message) and reply.data.lower() == HOLD, reply

    def stopped() -> list[str]:
        recs = _records(k, "retired socket server stopped")
        return [r["socket"] for r in recs if r.get("socket") == k.sock("alice")]

    # the new server of alice.sock, and the old one once its Call is over
    wait_until(lambda: len(stopped()) == 2, timeout=60, what="alice.sock's servers to stop")
