"""What one tenant can learn of another through the API: nothing of its
activity.  ListDevices counts a tenant's own Calls only (the admin socket,
and kupctl devices --admin, count the whole pool) -- against a real kupd
with two tenants sharing one device's Call pool of ONE channel, so that
where a Call is (on the channel, queued) is set by the test, not by time."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from tenancy_helpers import (
    DEVICES,
    LOCKHOLD,
    TENANTS,
    StartTenants,
    TenantKupd,
    run_module,
    socket_dir,
)

from kupapi import kup_pb2, kup_pb2_grpc
from kupclient import Client, EventType, Kind, Message, WatchEvent, errors
from kupd.testing import Background, echo_lock_holds, in_background, kupsim, wait_until

BODY = """
[[device]]
name = "echo"
call_channels = 1

[[tenant]]
name = "ann"
socket = "@DIR@/ann.sock"
[[tenant.grant]]
device = "echo"

[[tenant]]
name = "ben"
socket = "@DIR@/ben.sock"
[[tenant.grant]]
device = "echo"
"""


#: the kupd, and the three Calls of busy_pool
BusyPool = tuple[TenantKupd, list[Background[Message]]]


def _calls(c: Client) -> tuple[int, int, str]:
    (d,) = c.devices("echo")
    return d.calls_in_flight, d.calls_queued, d.calls_tenant


def _let_go(k: TenantKupd) -> None:
    """A "!lockfree" on a Session's channel ends echo's lock holds."""
    with k.client("ben") as c, c.open("echo").channel() as ch:
        ch.receive(timeout=30)  # the kernel's opening hand-over
        assert ch.exchange(b"!lockfree", timeout=30).data.lower() == b"!lockfree"


@pytest.fixture
def busy_pool(start_tenants: StartTenants) -> Iterator[BusyPool]:
    """ann's Call holds the pool's one channel (echo keeps its reply owed);
    ann has a second Call queued behind it, ben one."""
    k = start_tenants(BODY)
    ann, ben = k.client("ann"), k.client("ben")
    whole = Client(k.admin_socket)
    calls: list[Background[Message]] = []
    try:
        wait_until(lambda: _calls(whole)[:2] == (0, 0), what="kupd up")
        holds = echo_lock_holds(k.sim)
        calls.append(in_background(lambda: ann.call("echo", LOCKHOLD, timeout=60)))
        wait_until(lambda: echo_lock_holds(k.sim) > holds, what="echo to hold ann's Call")
        calls.append(in_background(lambda: ann.call("echo", b"ann queued", timeout=60)))
        calls.append(in_background(lambda: ben.call("echo", b"ben queued", timeout=60)))
        wait_until(lambda: _calls(whole) == (3, 2, ""), what="two Calls queued")
        yield k, calls
    finally:
        _let_go(k)
        for c in calls:
            c.outcome(60)
        for x in (ann, ben, whole):
            x.close()


def test_list_devices_counts_a_tenants_own_calls(
    busy_pool: BusyPool,
) -> None:
    """calls_in_flight / calls_queued showed every tenant the whole pool --
    ben saw that ann had two Calls going.  Each now sees its own, and is
    told whose (calls_tenant); the admin socket sees the pool's."""
    k, _ = busy_pool
    with k.client("ann") as ann, k.client("ben") as ben, Client(k.admin_socket) as whole:
        assert _calls(ann) == (2, 1, "ann")
        assert _calls(ben) == (1, 1, "ben")
        assert _calls(whole) == (3, 2, "")


def test_kupctl_devices_says_whose_calls_and_admin_shows_the_pool(
    busy_pool: BusyPool,
) -> None:
    k, _ = busy_pool
    mine = run_module("kupclient.kupctl", "--socket", k.sock("ben"), "devices")
    assert mine.returncode == 0, mine
    assert "CALLS and QUEUED count tenant ben's Calls only" in mine.stdout, mine.stdout
    got = run_module("kupclient.kupctl", "--json", "devices", "--admin-socket", k.admin_socket)
    assert got.returncode == 0, got
    (d,) = json.loads(got.stdout)["devices"]
    assert (d["calls_in_flight"], d["calls_queued"], d["calls_tenant"]) == (3, 2, ""), d
    text = run_module(
        "kupclient.kupctl", "--socket", k.sock("ben"), "devices", "--admin",
        "--admin-socket", k.admin_socket,
    )
    assert text.returncode == 0 and "count tenant" not in text.stdout, text


def test_kupctl_devices_admin_refuses_a_tenants_socket(busy_pool: BusyPool) -> None:
    """--admin-socket naming a tenant's socket (a slip: both are kupd's
    sockets) was shown as the admin view, with that tenant's Calls as the
    whole pool's.  kupctl refuses it, naming the socket and its tenant."""
    k, _ = busy_pool
    for fmt in ((), ("--json",)):
        res = run_module(
            "kupclient.kupctl", *fmt, "devices", "--admin-socket", k.sock("ben"),
        )
        assert res.returncode == 2, res
        assert res.stdout == "", res.stdout
        assert f"--admin-socket {k.sock('ben')} is tenant ben's socket" in res.stderr, res


def test_a_calls_deadline_counts_its_own_tenants_queue(busy_pool: BusyPool) -> None:
    """A Call that found no free pool channel was told how many Calls were
    queued on the device -- every tenant's.  It is told its tenant's (this
    one and ben's other queued Call), not ann's."""
    k, _ = busy_pool
    with k.client("ben") as ben, pytest.raises(errors.DeadlineExceeded) as ei:
        ben.call("echo", b"too late", timeout=0.3)
    assert str(ei.value).endswith("(1 channels; 2 of tenant ben's Calls queued)"), ei.value


def _released(w: Iterator[WatchEvent], n: int) -> list[tuple[int, str, str]]:
    """The next ``n`` LEASE_RELEASED events of ``w``: (channel, lease id, reason)."""
    out: list[tuple[int, str, str]] = []
    for ev in w:
        if ev.type == EventType.LEASE_RELEASED:
            out.append((ev.channel, ev.lease_id, ev.reason))
            if len(out) == n:
                break
    return out


def test_watch_tells_nothing_of_why_another_tenants_lease_ended(
    start_tenants: StartTenants,
) -> None:
    """alice (echo channels 8-15) watching carol's leases on her channels
    was told why each ended: that the admin revoked it, that carol's
    client let it go or dropped it.  She is told that it ended; why only
    when the device is why (drained, gone, shutting down) -- which its own
    events tell her anyway.  Her own leases, and carol's to carol, keep
    their reasons."""
    k = start_tenants(DEVICES + TENANTS)
    with (
        k.client("alice") as a,
        k.client("carol") as c,
        k.admin() as adm,
        a.watch("echo", initial_state=True) as aw,
        c.watch("echo", initial_state=True) as cw,
    ):
        # subscribed: the replay comes only once kupd registered the stream
        assert next(iter(aw)).initial and next(iter(cw)).initial
        revoked = c.attach("echo", 9)
        adm.revoke(revoked.lease_id, "the operator's own words")
        released = c.attach("echo", 10)
        c.release(released.lease_id)
        with a.open("echo").channel(11) as ch:
            ch.receive(timeout=30)
        drained = c.attach("echo", 12)
        adm.drain("echo")
        try:
            assert _released(iter(aw), 4) == [
                (9, "", ""),
                (10, "", ""),
                (11, ch.lease.lease_id, "stream ended"),
                (12, "", "drained"),
            ]
            assert _released(iter(cw), 4) == [
                (9, revoked.lease_id, "revoked"),
                (10, released.lease_id, "released"),
                (11, "", ""),
                (12, drained.lease_id, "drained"),
            ]
        finally:
            adm.drain("echo", undo=True)


def _first_health(sock: str, service: str) -> str:
    """The first status the health service's Watch of ``service`` sends."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    chan = grpc.insecure_channel("unix:" + sock)
    try:
        watch = health_pb2_grpc.HealthStub(chan).Watch(
            health_pb2.HealthCheckRequest(service=service), timeout=30
        )
        first = next(iter(watch))
        watch.cancel()
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(first.status))
    finally:
        chan.close()


def test_a_health_watch_of_kupd_covers_the_tenants_devices(tmp_path: Path) -> None:
    """A tenant's Check of kupd as a whole ("", kup.v1.Kup) covered only its
    devices, but its Watch streamed kupd's own status: NOT_SERVING told
    alice (echo only) that a device she may not know of was down.  Her
    Watch now follows her devices, as her Check does; carol's (both
    devices) and the admin's follow every device."""
    with kupsim("echo", ready_timeout=60.0) as a, kupsim("rot13", ready_timeout=60.0) as b:
        os.symlink(b.rundir / "rot13.sock", a.rundir / "rot13.sock")
        k = TenantKupd(socket_dir(), a, DEVICES + TENANTS, tmp_path / "kupd.log")
        try:
            assert _first_health(k.sock("alice"), "") == "SERVING"
            b.stop()  # rot13's host goes: rot13 is gone
            with k.client("carol") as c:
                wait_until(lambda: c.health("") == "NOT_SERVING", what="rot13 seen gone")
            for service in ("", "kup.v1.Kup"):
                assert _first_health(k.sock("alice"), service) == "SERVING", service
                assert _first_health(k.sock("carol"), service) == "NOT_SERVING", service
                assert _first_health(k.admin_socket, service) == "NOT_SERVING", service
            with k.client("alice") as al:
                assert al.health("") == "SERVING"  # her Check, as before
        finally:
            k.stop()
            shutil.rmtree(k.dir, ignore_errors=True)


def test_events_a_watch_may_not_see_do_not_fill_its_queue(start_tenants: StartTenants) -> None:
    """Every event went into every Watch's queue (bounded: a Watch that
    falls 1024 events behind ends RESOURCE_EXHAUSTED), and was dropped only
    when the stream came to it: a tenant reading its Watch slowly had it
    ended by other tenants' activity on devices it may not know of -- and
    so learned of it.  Only the events a Watch may see are queued now.

    alice's Watch is read by a client that reads ahead nothing (gRPC's
    lookahead), so kupd's writes to it wait from its first event on and
    every later event stays in kupd's queue for it, until she reads."""
    k = start_tenants(DEVICES + TENANTS)
    slow = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1)]
    chans = [
        grpc.insecure_channel("unix:" + k.sock("alice"), options=slow),
        grpc.insecure_channel("unix:" + k.sock("alice")),
        grpc.insecure_channel("unix:" + k.sock("carol")),
    ]
    try:
        watch = kup_pb2_grpc.KupStub(chans[0]).Watch(
            kup_pb2.WatchRequest(initial_state=True), timeout=120
        )
        assert next(watch).initial  # subscribed
        alice, carol = (kup_pb2_grpc.KupStub(c) for c in chans[1:])

        def churn(stub: kup_pb2_grpc.KupStub, device: str, n: int) -> None:
            for _ in range(n):
                lease = stub.Attach(kup_pb2.AttachRequest(device=device), timeout=30)
                stub.Release(kup_pb2.ReleaseRequest(lease_id=lease.lease_id), timeout=30)

        churn(alice, "echo", 200)  # 400 events of hers, queued
        churn(carol, "rot13", 600)  # 1200 she may not see: not queued
        churn(alice, "echo", 1)
        seen = 0
        for ev in watch:
            if not ev.initial:
                assert ev.device == "echo", ev
                seen += 1
                if seen == 402:
                    break
        watch.cancel()
    finally:
        for c in chans:
            c.close()


def test_kupds_shared_limits_tell_a_tenant_its_own_share(start_tenants: StartTenants) -> None:
    """kupd's max_sessions and a device's max_queued_calls are shared by
    every tenant, and a refusal said how the others used them ("3 held",
    "1 calls already queued").  A tenant is told that the shared limit is
    reached, and how much of it is its own."""
    k = start_tenants("max_sessions = 3\nmax_queued_calls = 1\n" + BODY)
    with k.client("ann") as ann, k.client("ben") as ben:
        leases = [ann.attach("echo") for _ in range(3)]
        for refused in (lambda: ben.attach("echo"), lambda: ben.open("echo").channel()):
            with pytest.raises(errors.ResourceExhausted) as ei:
                refused()
            why = str(ei.value)
            assert "limit max_sessions=3 is reached" in why, why
            assert "0 of them tenant ben's" in why and "held" not in why, why
        for lease in leases:
            ann.release(lease.lease_id)
        holds = echo_lock_holds(k.sim)
        held = in_background(lambda: ann.call("echo", LOCKHOLD, timeout=60))
        try:
            wait_until(lambda: echo_lock_holds(k.sim) > holds, what="echo to hold ann's Call")
            queued = in_background(lambda: ann.call("echo", b"queued", timeout=60))
            with Client(k.admin_socket) as whole:
                wait_until(lambda: _calls(whole)[1] == 1, what="ann's Call queued")
            with pytest.raises(errors.ResourceExhausted) as ei:
                ben.call("echo", b"no room")
            why = str(ei.value)
            assert "limit max_queued_calls=1" in why and "0 of tenant ben's" in why, why
            assert "1 calls" not in why, why
        finally:
            _let_go(k)
        for c in (held, queued):
            assert isinstance(c.outcome(60), Message)


def test_health_follows_a_reload_on_a_kept_socket(start_tenants: StartTenants) -> None:
    """A socket a reload keeps keeps the Tenant its server was built with;
    health answered by those old grants: carol, her rot13 grant taken
    away, was still told rot13's health (and kupd probed it for her), and
    alice, granted rot13 by the reload, was told it did not exist."""
    k = start_tenants(DEVICES + TENANTS)
    with k.client("carol") as c, k.client("alice") as a:
        assert c.health("kup.v1.Kup/rot13") == "SERVING"
        with pytest.raises(errors.NotFound):
            a.health("kup.v1.Kup/rot13")
        swapped = TENANTS.replace(
            '[[tenant.grant]]\ndevice = "rot13"\n', ""
        ).replace(
            'channels = "8-15"\n', 'channels = "8-15"\n[[tenant.grant]]\ndevice = "rot13"\n'
        )
        assert swapped.count('device = "rot13"') == 1
        k.write_config(DEVICES + swapped)
        with k.admin() as adm:
            adm.reload()
        assert [d.name for d in c.devices()] == ["echo"]
        with pytest.raises(errors.NotFound):
            c.health("kup.v1.Kup/rot13")
        assert a.health("kup.v1.Kup/rot13") == "SERVING"


def test_an_attach_id_is_its_tenants_own(start_tenants: StartTenants) -> None:
    """Two tenants naming their attaches alike neither conflict nor reach
    each other's lease: ben's Release{attach_id} of the name ann used ends
    only ben's own, and answers OK as for a name never used."""
    k = start_tenants(BODY)
    with (
        grpc.insecure_channel("unix:" + k.sock("ann")) as ann_ch,
        grpc.insecure_channel("unix:" + k.sock("ben")) as ben_ch,
        k.client("ann") as ann,
    ):
        ann_stub, ben_stub = kup_pb2_grpc.KupStub(ann_ch), kup_pb2_grpc.KupStub(ben_ch)
        same = kup_pb2.AttachRequest(device="echo", attach_id="same-name")
        mine = ann_stub.Attach(same, timeout=30)
        theirs = ben_stub.Attach(same, timeout=30)  # no "in use": another tenant's
        for _ in range(2):  # ends ben's; then none of ben's has the name
            ben_stub.Release(kup_pb2.ReleaseRequest(attach_id="same-name"), timeout=30)
        with pytest.raises(grpc.RpcError) as err:
            ben_stub.Pass(kup_pb2.PassRequest(lease_id=theirs.lease_id), timeout=30)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        # ann's lease lives on
        assert ann.lease_receive(mine.lease_id, timeout=30).kind == Kind.PASS
        ann.release(mine.lease_id)


def test_release_by_attach_id_needs_the_lease_operation(start_tenants: StartTenants) -> None:
    """bob may only Call: his Release{attach_id} is refused as his Attach
    is (PERMISSION_DENIED naming the operation, audited), not answered OK
    after filling a table of withdrawn names he has no attach to use."""
    k = start_tenants(DEVICES + TENANTS)
    with grpc.insecure_channel("unix:" + k.sock("bob")) as ch:
        stub = kup_pb2_grpc.KupStub(ch)
        for req in (
            kup_pb2.AttachRequest(device="echo", attach_id="bobs"),
            kup_pb2.ReleaseRequest(attach_id="bobs"),
        ):
            method = stub.Attach if isinstance(req, kup_pb2.AttachRequest) else stub.Release
            with pytest.raises(grpc.RpcError) as err:
                method(req, timeout=30)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, req
            assert "operation 'lease' is not allowed" in (err.value.details() or ""), req
    wait_until(
        lambda: sum(
            1 for a in k.audit_lines() if a.get("tenant") == "bob" and a.get("op") == "lease"
        )
        >= 2,
        timeout=30,
        what="bob's two refusals in the audit log",
    )


def test_another_tenants_again_of_neither_gets_nor_spoils_a_kept_message(
    start_tenants: StartTenants,
) -> None:
    """kupd keeps the message a named receive of ann's was answered with
    (Lease.delivered).  ben naming that receive in again_of on ann's lease
    id -- from his own socket -- is told there is no such lease, and the
    message stays ann's to ask for again."""
    k = start_tenants(BODY)
    with (
        grpc.insecure_channel("unix:" + k.sock("ann")) as ann_ch,
        grpc.insecure_channel("unix:" + k.sock("ben")) as ben_ch,
    ):
        ann_stub, ben_stub = kup_pb2_grpc.KupStub(ann_ch), kup_pb2_grpc.KupStub(ben_ch)
        lease = ann_stub.Attach(kup_pb2.AttachRequest(device="echo"), timeout=30)
        block = kup_pb2.RECEIVE_MODE_BLOCK
        first = ann_stub.Receive(
            kup_pb2.ReceiveRequest(lease_id=lease.lease_id, mode=block, receive_id="r1"),
            timeout=30,
        )
        assert first.message.kind == kup_pb2.MESSAGE_KIND_PASS
        with pytest.raises(grpc.RpcError) as err:
            ben_stub.Receive(
                kup_pb2.ReceiveRequest(lease_id=lease.lease_id, mode=block, again_of="r1"),
                timeout=30,
            )
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        again = ann_stub.Receive(
            kup_pb2.ReceiveRequest(lease_id=lease.lease_id, mode=block, again_of="r1"),
            timeout=30,
        )
        assert again.message == first.message
        ann_stub.Release(kup_pb2.ReleaseRequest(lease_id=lease.lease_id), timeout=30)
