"""What a reload's reply counts of the RPCs it ends by moving or removing a
socket (kupd.retirement): ``rpcs_ended`` of Admin.Reload, the ``config
reloaded`` log line, the audit line and kupctl's reload output -- against
real RPCs waiting in kupd on the socket, each seen to end."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tenancy_helpers import LOCKHOLD, StartTenants, TenantKupd, run_module

from kupclient import Client, Message
from kupd import errors
from kupd.testing import echo_lock_holds, in_background, wait_until

__all__: list[str] = []

#: the old socket's server is given an hour (what the reload does not end
#: is seen to hang); "receive" debug lines say when a Receive waits in kupd
SLOW = 'call_timeout = 3600\nlog_level = "debug"\n'

#: alice may hold several leases and sessions; echo's one pool channel lets
#: a Call run and the next one queue
ALICE = """
[[device]]
name = "echo"
call_channels = 1

[[tenant]]
name = "alice"
socket = "@DIR@/alice.sock"
max_sessions = 8
max_message_bytes = 4096  # with max_sessions: nothing to advise of
[[tenant.grant]]
device = "echo"
"""
MOVED = ALICE.replace("alice.sock", "alice2.sock")


def _log_records(k: TenantKupd, event: str) -> list[dict[str, Any]]:
    recs = [json.loads(x) for x in k.log().splitlines() if x.startswith("{")]
    return [r for r in recs if r.get("event") == event]


def _unattached_sessions(k: TenantKupd) -> float:
    with k.admin() as adm:
        text = adm.metrics("kupd_sessions_unattached")
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("kupd_sessions_unattached")
    )


def test_reload_counts_the_rpcs_it_ends_on_a_moved_socket(start_tenants: StartTenants) -> None:
    """On alice's socket: a Receive waiting for a message and one waiting
    for the lease's turn, a Send waiting for its reply, a Call queued behind
    one running on the only pool channel, a Watch, a Health Watch, a
    Session not attached yet -- and a Session attached.  A reload moves the
    socket: the reply counts each waiting RPC by name, the attached
    Session's lease in sessions_ended and the running Call not at all (it
    runs on); every RPC counted has ended with UNAVAILABLE; the log line
    and the audit line say the same."""
    from kupapi import kup_pb2, kup_pb2_grpc

    k = start_tenants(SLOW + ALICE)
    old, new = k.sock("alice"), k.sock("alice2")
    chan = grpc.insecure_channel("unix:" + old)
    never = threading.Event()

    def no_requests() -> Iterator[kup_pb2.SessionRequest]:
        never.wait()
        return
        yield

    try:
        with k.client("alice") as a:
            # two Receives: one waits for echo's held reply, one for its turn
            lease = a.attach("echo", 8)
            assert a.lease_receive(lease.lease_id, timeout=10).kind.name == "PASS"
            holds = echo_lock_holds(k.sim)
            a.lease_send(lease.lease_id, LOCKHOLD)
            wait_until(lambda: echo_lock_holds(k.sim) > holds, what="echo to hold the reply")
            before = len(_log_records(k, "receive"))
            receives = [in_background(lambda: a.lease_receive(lease.lease_id))]
            wait_until(
                lambda: len(_log_records(k, "receive")) == before + 1, what="a Receive waiting"
            )
            receives.append(in_background(lambda: a.lease_receive(lease.lease_id)))
            wait_until(
                lambda: len(_log_records(k, "receive")) == before + 2, what="the next waiting"
            )
            # a Send waiting for its reply
            lease2 = a.attach("echo", 9)
            assert a.lease_receive(lease2.lease_id, timeout=10).kind.name == "PASS"
            holds = echo_lock_holds(k.sim)
            send = in_background(lambda: a.lease_exchange(lease2.lease_id, LOCKHOLD))
            wait_until(lambda: echo_lock_holds(k.sim) > holds, what="echo to hold the reply")
            # a Call running (not ended: not counted) and one queued
            holds = echo_lock_holds(k.sim)
            running = in_background(lambda: a.call("echo", LOCKHOLD, timeout=60))
            wait_until(lambda: echo_lock_holds(k.sim) > holds, what="echo to hold the Call")
            queued = in_background(lambda: a.call("echo", b"queued", timeout=600))
            wait_until(lambda: a.devices("echo")[0].calls_queued == 1, what="the Call queued")
            # the streams
            session = a.open("echo").channel(10)
            session.receive(timeout=10)
            events = a.watch("echo", initial_state=True)
            assert next(events).initial
            health = health_pb2_grpc.HealthStub(chan).Watch(
                health_pb2.HealthCheckRequest(), timeout=60
            )
            assert next(health).status == health_pb2.HealthCheckResponse.SERVING
            stream = kup_pb2_grpc.KupStub(chan).Session(no_requests(), timeout=60)
            wait_until(lambda: _unattached_sessions(k) == 1, what="kupd counting the stream")

            k.write_config(SLOW + MOVED)
            with k.admin() as adm:
                r = adm.reload()
            assert r.rpcs_ended == {
                "Receive": 2,
                "Send": 1,
                "Call": 1,
                "Watch": 1,
                "Health.Watch": 1,
                "Session": 1,
            }, r
            assert r.sessions_ended == (session.lease.lease_id,)

            # each one counted has ended, saying where the socket went
            ended = [*(b.outcome(30) for b in receives), send.outcome(30), queued.outcome(30)]
            for exc in ended:
                assert isinstance(exc, errors.Unavailable), ended
                assert f"moved its socket from {old} to {new}" in str(exc), ended
            try:
                for _ in events:
                    pass
                raise AssertionError("the Watch went on")
            except errors.Unavailable as exc:
                assert f"moved its socket from {old} to {new}" in str(exc)
            for rpc in (health, stream):
                try:
                    next(rpc)
                    raise AssertionError("the stream went on")
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            # the running Call was not ended: it gets its reply
            with Client(new) as a2:
                with a2.open("echo").channel(12) as ch:
                    ch.receive(timeout=10)
                    assert ch.exchange(b"!lockfree", timeout=30).data == b"!lockfree"
                reply = running.outcome(30)
                assert isinstance(reply, Message) and reply.data.lower() == LOCKHOLD, reply
            session.close()
    finally:
        never.set()
        chan.close()
    (line,) = _log_records(k, "config reloaded")
    assert line["rpcs_ended"] == r.rpcs_ended, line
    (audit,) = [x for x in k.audit_lines() if x.get("action") == "reload"]
    assert audit["rpcs_ended"] == r.rpcs_ended, audit


def test_reload_counts_a_pass_waiting_for_the_lease(start_tenants: StartTenants) -> None:
    """A Pass queued behind a Receive that waits on the same lease (echo
    holds its reply) is counted in rpcs_ended as "Pass" when a reload
    moves the socket, and ends UNAVAILABLE saying where the socket went."""
    k = start_tenants(SLOW + ALICE)
    old, new = k.sock("alice"), k.sock("alice2")
    with k.client("alice") as a:
        lease = a.attach("echo", 8)
        assert a.lease_receive(lease.lease_id, timeout=10).kind.name == "PASS"
        holds = echo_lock_holds(k.sim)
        a.lease_send(lease.lease_id, LOCKHOLD)
        wait_until(lambda: echo_lock_holds(k.sim) > holds, what="echo to hold the reply")
        before = len(_log_records(k, "receive"))
        receive = in_background(lambda: a.lease_receive(lease.lease_id))
        wait_until(lambda: len(_log_records(k, "receive")) == before + 1, what="a Receive waiting")
        passes = len(_log_records(k, "pass"))
        pass_ = in_background(lambda: a.lease_pass(lease.lease_id))
        wait_until(lambda: len(_log_records(k, "pass")) == passes + 1, what="the Pass waiting")
        k.write_config(SLOW + MOVED)
        with k.admin() as adm:
            r = adm.reload()
        assert r.rpcs_ended == {"Receive": 1, "Pass": 1}, r
        for exc in (receive.outcome(30), pass_.outcome(30)):
            assert isinstance(exc, errors.Unavailable), exc
            assert f"moved its socket from {old} to {new}" in str(exc), exc
    with Client(new) as a2, a2.open("echo").channel(12) as ch:
        ch.receive(timeout=10)
        assert ch.exchange(b"!lockfree", timeout=30).data == b"!lockfree"


def test_kupctl_reload_shows_the_rpcs_ended(start_tenants: StartTenants) -> None:
    """kupctl's reload line names the RPCs a reload ended on a moved socket
    (here a Health Watch and a Watch), --json gives the map; a reload that
    ends none says nothing of them."""
    k = start_tenants(SLOW + ALICE)
    chan = grpc.insecure_channel("unix:" + k.sock("alice"))
    try:
        health = health_pb2_grpc.HealthStub(chan).Watch(
            health_pb2.HealthCheckRequest(), timeout=60
        )
        assert next(health).status == health_pb2.HealthCheckResponse.SERVING
        with k.client("alice") as a:
            events = a.watch("echo", initial_state=True)
            assert next(events).initial
            k.write_config(SLOW + MOVED)
            res = run_module("kupclient.kupctl", "reload", "--admin-socket", k.admin_socket)
            assert res.returncode == 0, res.stderr
            assert (
                "2 RPCs ended on moved or removed sockets (Health.Watch 1, Watch 1)"
                in res.stdout
            ), res.stdout
            events.cancel()
    finally:
        chan.close()
    k.write_config(SLOW + ALICE)  # back, with nothing waiting on alice2.sock
    res = run_module("kupclient.kupctl", "--json", "reload", "--admin-socket", k.admin_socket)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["rpcs_ended"] == {}, res.stdout
    res = run_module("kupclient.kupctl", "reload", "--admin-socket", k.admin_socket)
    assert res.returncode == 0 and "RPCs ended" not in res.stdout, res.stdout


def test_reload_that_removes_a_tenant_counts_its_streams_not_its_leases(
    start_tenants: StartTenants,
) -> None:
    """A reload removes bob, his socket with him.  His Watch and Health
    Watch there are counted in rpcs_ended; his Receive waiting on an
    Attach lease is not: the new policy ended that lease (sessions_ended),
    which is what ends the Receive -- counted once, there."""
    bob = ALICE.replace('name = "alice"', 'name = "bob"').replace("alice.sock", "bob.sock")
    bob = bob[bob.index("[[tenant]]"):]
    k = start_tenants(SLOW + ALICE + bob)
    chan = grpc.insecure_channel("unix:" + k.sock("bob"))
    try:
        health = health_pb2_grpc.HealthStub(chan).Watch(
            health_pb2.HealthCheckRequest(), timeout=60
        )
        assert next(health).status == health_pb2.HealthCheckResponse.SERVING
        with k.client("bob") as b:
            events = b.watch("echo", initial_state=True)
            assert next(events).initial
            lease = b.attach("echo", 8)
            assert b.lease_receive(lease.lease_id, timeout=10).kind.name == "PASS"
            holds = echo_lock_holds(k.sim)
            b.lease_send(lease.lease_id, LOCKHOLD)  # echo holds the reply: the Receive waits
            wait_until(lambda: echo_lock_holds(k.sim) > holds, what="echo to hold the reply")
            before = len(_log_records(k, "receive"))
            receive = in_background(lambda: b.lease_receive(lease.lease_id))
            wait_until(
                lambda: len(_log_records(k, "receive")) == before + 1, what="the Receive waiting"
            )
            k.write_config(SLOW + ALICE)
            with k.admin() as adm:
                r = adm.reload()
            assert r.rpcs_ended == {"Watch": 1, "Health.Watch": 1}, r
            assert r.sessions_ended == (lease.lease_id,), r
            ended = receive.outcome(30)
            assert isinstance(ended, errors.PermissionDenied), ended
            assert "the reloaded policy no longer allows" in str(ended), ended
            events.cancel()
        with k.client("alice") as a, a.open("echo").channel(12) as ch:
            ch.receive(timeout=10)
            assert ch.exchange(b"!lockfree", timeout=30).data == b"!lockfree"
    finally:
        chan.close()
