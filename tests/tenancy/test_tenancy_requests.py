"""Requests that never arrive whole are bounded per tenant.  gRPC holds an
RPC, and buffers its request, from its headers on -- before kupd sees
anything, so none of kupd's own limits counted them: a tenant that opened
thousands of RPCs and never finished their requests made kupd hold
gigabytes.  A tenant's socket now caps the RPCs open at once
(kupd.tenants.tenant_rpc_bound, above the tenant's own limits) and, when
the tenant has a max_message_bytes, refuses a request declared larger than
that (plus a little headroom) as its length arrives
(kupd.tenants.receive_limit).  Real kupd, kupsim and a hand-framed HTTP/2
client."""

from __future__ import annotations

import sys
import time
import tomllib

import grpc
import pytest
from tenancy_helpers import StartTenants

from kupapi import kup_pb2, kup_pb2_grpc
from kupclient import Client, errors
from kupd.config import parse_config, reloaded
from kupd.sessions import MAX_WAITING_OPS
from kupd.tenants import RECEIVE_HEADROOM, RPC_SLACK
from kupd.testing import REPO_ROOT, wait_until
from kupd.watch import WATCHES_PER_TENANT

sys.path.insert(0, str(REPO_ROOT / "tests" / "gateway"))

from h2raw import H2Conn

__all__: list[str] = []

BODY = """
[[device]]
name = "echo"
call_channels = 2

[[tenant]]
name = "small"
socket = "@DIR@/small.sock"
max_sessions = 1
max_calls_in_flight = 1
max_pool_channels = 1
max_message_bytes = 64
[[tenant.grant]]
device = "echo"

[[tenant]]
name = "other"
socket = "@DIR@/other.sock"
max_pool_channels = 1
[[tenant.grant]]
device = "echo"
"""

#: small's cap: its session with the operations that may wait on it, its
#: Call, its watch streams and the slack
SMALL_RPCS = 1 * (1 + MAX_WAITING_OPS) + 1 + WATCHES_PER_TENANT + RPC_SLACK

#: what the raw streams call: headers, and never a request
HELD = "/kup.v1.Kup/ListDevices"


def _at_cap(c: Client, streams: list[tuple[H2Conn, int]]) -> bool:
    """Whether ``c``'s next RPC is refused for the cap the held ``streams``
    take.  A held stream that kupd's server ended is opened again first:
    one that arrives while another RPC on the socket (the fixture's
    readiness check) still counts is refused at the cap, and gRPC's core
    cancels, at random, RPCs not yet taken beyond its pending bound
    (kupd.server.pending_bound) -- either left the cap one short for good
    on a loaded machine."""
    for j, (raw, stream) in enumerate(streams):
        if raw.ended(stream):
            streams[j] = (raw, raw.grpc_open(HELD))
    try:
        c.devices()
    except errors.ResourceExhausted as exc:
        assert "Concurrent RPC limit exceeded" in str(exc), exc
        return True
    return False


def test_rpcs_whose_requests_never_come_are_capped_per_tenant(
    start_tenants: StartTenants,
) -> None:
    k = start_tenants(BODY)
    raw = H2Conn(k.sock("small"))
    try:
        streams = [(raw, raw.grpc_open(HELD)) for _ in range(SMALL_RPCS)]
        with k.client("small") as c:
            # the raw streams reach kupd's server in order: once the cap is
            # taken, one more RPC is refused by gRPC
            wait_until(
                lambda: _at_cap(c, streams), timeout=60, what="small's socket to be at its RPC cap"
            )
        with k.client("other") as c:
            assert [d.name for d in c.devices()] == ["echo"]  # another socket: not capped
    finally:
        raw.close()
    with k.client("small") as c:

        def served() -> bool:
            try:
                return [d.name for d in c.devices()] == ["echo"]
            except errors.ResourceExhausted:
                return False

        wait_until(served, timeout=60, what="small's RPCs again once the raw connection is gone")


def test_a_request_over_the_receive_limit_is_refused_before_it_arrives(
    start_tenants: StartTenants,
) -> None:
    k = start_tenants(BODY)
    raw = H2Conn(k.sock("small"))
    try:
        # a Call declaring 4 MiB, of which a few bytes arrive: refused as
        # its length arrives, not held open waiting for the rest
        stream = raw.grpc_open("/kup.v1.Kup/Call")
        raw.grpc_send(stream, 4 * 1024 * 1024, b"\x0a\x04echo")
        deadline = time.monotonic() + 30
        while not raw.ended(stream):
            assert time.monotonic() < deadline, f"kupd waits for the rest: {raw.frames}"
            time.sleep(0.01)
    finally:
        raw.close()
    with grpc.insecure_channel("unix:" + k.sock("small")) as chan:
        stub = kup_pb2_grpc.KupStub(chan)
        # a little over max_message_bytes: kupd's own answer, naming the rule
        with pytest.raises(grpc.RpcError) as ei:
            stub.Call(kup_pb2.CallRequest(device="echo", data=b"x" * 65), timeout=30)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_message_bytes=64" in (ei.value.details() or "")
        # far over it: gRPC's, before kupd sees it
        with pytest.raises(grpc.RpcError) as ei:
            stub.Call(
                kup_pb2.CallRequest(device="echo", data=b"x" * (64 + RECEIVE_HEADROOM)),
                timeout=30,
            )
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in (ei.value.details() or "")
        # within it: served
        reply = stub.Call(kup_pb2.CallRequest(device="echo", data=b"y" * 64), timeout=30)
        assert reply.reply.data.lower() == b"y" * 64
    # kupclient: one size error whoever refuses it, TooBig
    with k.client("small") as c:
        with pytest.raises(errors.TooBig, match="larger than max"):
            c.call("echo", b"x" * (64 + RECEIVE_HEADROOM))


def test_a_reload_applies_a_kept_sockets_receive_limit_and_rpc_cap() -> None:
    """kupd.config.reloaded, by itself: max_message_bytes and the limits the
    RPC cap is a margin above apply either way (the socket gets a new
    server: test_tenancy_reload_swap.py)."""
    running = parse_config(tomllib.loads(BODY.replace("@DIR@", "/run/t")))

    def reload(old: str, new: str) -> tuple[int, list[str]]:
        cfg, _, needs = reloaded(running, parse_config(tomllib.loads(
            BODY.replace(old, new).replace("@DIR@", "/run/t")
        )))  # fmt: skip
        (small,) = [t for t in cfg.tenants if t.name == "small"]
        return small.max_message_bytes, needs

    assert reload("max_message_bytes = 64", "max_message_bytes = 32") == (32, [])
    assert reload("max_message_bytes = 64", "max_message_bytes = 128") == (128, [])
    assert reload("max_message_bytes = 64", "max_message_bytes = 0") == (0, [])
    # a limit where there was none
    cfg, _, needs = reloaded(running, parse_config(tomllib.loads(
        BODY.replace('name = "other"\n', 'name = "other"\nmax_message_bytes = 32\n')
        .replace("@DIR@", "/run/t")
    )))  # fmt: skip
    assert [t.max_message_bytes for t in cfg.tenants if t.name == "other"] == [32]
    assert needs == []
    # the RPC cap is a margin over max_sessions: a raise applies
    cfg, _, needs = reloaded(running, parse_config(tomllib.loads(
        BODY.replace("max_sessions = 1", "max_sessions = 8").replace("@DIR@", "/run/t")
    )))  # fmt: skip
    assert [t.max_sessions for t in cfg.tenants if t.name == "small"] == [8]
    assert needs == []


#: the plain socket (no [[tenant]] tables), with small limits of kupd's own
PLAIN = """
max_sessions = 1
max_queued_calls = 1

[[device]]
name = "echo"
call_channels = 2
"""
#: its cap, as a tenant's without limits of its own: kupd's max_sessions,
#: with the operations that may wait on each; on each device, the Calls
#: kupd queues and those on its pool channels; watch streams; the slack
PLAIN_RPCS = 1 * (1 + MAX_WAITING_OPS) + (1 + 2) + WATCHES_PER_TENANT + RPC_SLACK


def test_the_plain_socket_caps_its_rpcs_as_a_tenants_socket_does(
    start_tenants: StartTenants,
) -> None:
    """It had no cap: any local user its mode lets in could tie up kupd's
    memory with RPCs that never send their request."""
    k = start_tenants(PLAIN)
    path = k.sock("kupd")
    # gRPC lets one connection open max_sessions + 1024 streams at once
    per_conn = 1 + 1024
    raws = [H2Conn(path), H2Conn(path)]
    try:
        streams = [(raws[i // per_conn], raws[i // per_conn].grpc_open(HELD))
                   for i in range(PLAIN_RPCS)]  # fmt: skip
        with k.client("kupd") as c:
            wait_until(
                lambda: _at_cap(c, streams),
                timeout=60,
                what="the plain socket to be at its RPC cap",
            )
    finally:
        for raw in raws:
            raw.close()
    with k.client("kupd") as c:

        def served() -> bool:
            try:
                return [d.name for d in c.devices()] == ["echo"]
            except errors.ResourceExhausted:
                return False

        wait_until(served, timeout=60, what="RPCs again once the raw connections are gone")


def test_a_cap_counts_the_calls_of_every_device_its_tenant_may_use() -> None:
    """Without max_calls_in_flight, a tenant's Calls are bounded per device
    (max_queued_calls queued, one on each pool channel): the cap counts
    each device it may use, so that kupd's own limits still refuse first."""
    from kupd.policy import DEFAULT
    from kupd.tenants import tenant_rpc_bound

    devices = [{"name": "echo", "call_channels": 2}, {"name": "rot13", "call_channels": 3}]
    base = {"max_sessions": 1, "max_queued_calls": 10, "device": devices}
    one = {"name": "t", "socket": "/run/t.sock", "grant": [{"device": "rot13"}]}
    cfg = parse_config({**base, "tenant": [one]})
    fixed = 1 + MAX_WAITING_OPS + WATCHES_PER_TENANT + RPC_SLACK
    assert tenant_rpc_bound(cfg, cfg.tenants[0]) == fixed + 10 + 3
    plain = parse_config(base)
    assert tenant_rpc_bound(plain, DEFAULT) == fixed + (10 + 2) + (10 + 3)
