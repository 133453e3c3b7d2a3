"""Release{attach_id}: undoing an Attach its client gave up on.

An Attach may carry an ``attach_id`` its client chose; Release with that
attach_id (instead of a lease_id) ends the lease kupd granted to it, or,
when kupd has not granted it yet -- the Release went first, or the attach
waits for its channel -- makes the Attach take none.  The clients send it
when they gave up on an attach whose reply they may never see
(test_gw_attach_reply_dropped.py).  Real kupsim (echo) and kupd; the RPCs by
the generated stub, names chosen by the test.
"""

from __future__ import annotations

import contextlib
import json
import threading

import grpc
import pytest
from gateway_helpers import LOCKHOLD, Kupd, unlock, wait_locked

from kupapi import kup_pb2, kup_pb2_grpc
from kupclient import Client, Kind
from kupd import errors
from kupd.sessions import WITHDRAWN_FOR, WITHDRAWN_KEPT, Withdrawn
from kupd.testing import KupSim, wait_until


def _state(client: Client, chan: int) -> str:
    return client.devices("echo")[0].channels[chan].state


def test_a_release_by_attach_id_before_the_grant_makes_kupd_take_none(
    kupd: Kupd, client: Client
) -> None:
    """Release{attach_id} that reaches kupd before its Attach (it went by
    another connection, or the attach waited for its channel): the attach
    takes no lease, and says why."""
    with grpc.insecure_channel(f"unix:{kupd.socket}") as ch:
        stub = kup_pb2_grpc.KupStub(ch)
        stub.Release(kup_pb2.ReleaseRequest(attach_id="early-1"), timeout=30)
        with pytest.raises(grpc.RpcError) as err:
            stub.Attach(kup_pb2.AttachRequest(device="echo", channel=13, attach_id="early-1"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "attach early-1 was withdrawn" in (err.value.details() or "")
        assert _state(client, 13) == "free"
        # the name was used up by that attach: the next one with it attaches
        got = stub.Attach(kup_pb2.AttachRequest(device="echo", channel=13, attach_id="early-1"))
        assert got.channel == 13
        # ... and one live lease per name
        with pytest.raises(grpc.RpcError) as err:
            stub.Attach(kup_pb2.AttachRequest(device="echo", channel=14, attach_id="early-1"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"in use by lease {got.lease_id}" in (err.value.details() or "")
        # Release by the name ends it (OK again once it is gone)
        for _ in range(2):
            stub.Release(kup_pb2.ReleaseRequest(attach_id="early-1"), timeout=30)
        assert _state(client, 13) == "free"
    with pytest.raises(errors.NotFound, match=r"has ended \(caller gone\)"):
        client.lease_send(got.lease_id, b"x")


def test_a_release_by_attach_id_while_the_attach_waits_makes_it_take_none(
    sim: KupSim, kupd: Kupd, client: Client
) -> None:
    """The attach waits for a channel its module has not let go of; its
    Release{attach_id} comes meanwhile: when the channel comes, kupd ends
    the lease it just took (reason ``caller gone``) and the attach fails."""
    chan = 20
    with client.open("echo").channel(chan) as ch:
        assert ch.receive(timeout=30).kind == Kind.PASS
        ch.send(LOCKHOLD)  # echo keeps the channel locked after we leave
        wait_locked(sim, chan)
    with grpc.insecure_channel(f"unix:{kupd.socket}") as gch:
        stub = kup_pb2_grpc.KupStub(gch)
        req = kup_pb2.AttachRequest(device="echo", channel=chan, attach_id="waiting-1")
        fut = stub.Attach.future(req, timeout=60)
        wait_until(
            lambda: "attach waits for the module to let go" in kupd.log(),
            what=f"the attach of channel {chan} to wait in kupd",
        )
        stub.Release(kup_pb2.ReleaseRequest(attach_id="waiting-1"), timeout=30)
        unlock(client)
        with pytest.raises(grpc.RpcError) as err:
            fut.result(timeout=60)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "attach waiting-1 was withdrawn" in (err.value.details() or "")
    assert _state(client, chan) == "free"
    # kupd took the channel for it, and ended that lease at once
    ended = [
        r.get("reason")
        for r in map(json.loads, filter(lambda line: line.startswith("{"), kupd.log().splitlines()))
        if r.get("event") == "lease released" and r.get("channel") == chan
    ]
    assert ended[-1:] == ["caller gone"], ended


def test_an_attach_withdrawn_while_it_waits_is_not_pushed_out_by_other_names(
    sim: KupSim, kupd: Kupd, client: Client
) -> None:
    """An attach withdrawn while it waits in kupd is marked on the attach
    itself, not among the names withdrawn before their Attach came: a flood
    of Release{attach_id} with other names (another client of the same
    tenant -- on a kupd without tenants, any client), more than those
    names' quota, cannot make kupd forget it and grant a lease no one will
    use.  And a second attach with the name of one under way is refused at
    once."""
    chan = 21
    with client.open("echo").channel(chan) as ch:
        assert ch.receive(timeout=30).kind == Kind.PASS
        ch.send(LOCKHOLD)
        wait_locked(sim, chan)
    with grpc.insecure_channel(f"unix:{kupd.socket}") as gch:
        stub = kup_pb2_grpc.KupStub(gch)
        req = kup_pb2.AttachRequest(device="echo", channel=chan, attach_id="waiting-2")
        fut = stub.Attach.future(req, timeout=60)
        wait_until(
            lambda: "attach waits for the module to let go" in kupd.log(),
            what=f"the attach of channel {chan} to wait in kupd",
        )
        with pytest.raises(grpc.RpcError) as err:
            stub.Attach(kup_pb2.AttachRequest(device="echo", attach_id="waiting-2"), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "in use by an attach under way" in (err.value.details() or "")
        stub.Release(kup_pb2.ReleaseRequest(attach_id="waiting-2"), timeout=30)
        for i in range(WITHDRAWN_KEPT + 1):
            with contextlib.suppress(grpc.RpcError):  # the last one: the quota
                stub.Release(kup_pb2.ReleaseRequest(attach_id=f"flood-{i}"), timeout=30)
        unlock(client)
        with pytest.raises(grpc.RpcError) as err:
            fut.result(timeout=60)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "attach waiting-2 was withdrawn" in (err.value.details() or "")
    assert _state(client, chan) == "free"


def test_an_early_withdrawal_is_not_pushed_out_past_the_quota(kupd: Kupd, client: Client) -> None:
    """A name withdrawn before its Attach came (Release{attach_id} first),
    then WITHDRAWN_KEPT more names withdrawn the same way -- the one past
    the tenant's quota (with 256 kept: the 257th) is refused
    RESOURCE_EXHAUSTED, that name not withdrawn, instead of pushing the
    first out: the first one's late Attach still takes no lease (it took
    one nobody knew of, until its idle timeout)."""
    with grpc.insecure_channel(f"unix:{kupd.socket}") as ch:
        stub = kup_pb2_grpc.KupStub(ch)
        stub.Release(kup_pb2.ReleaseRequest(attach_id="early-first"), timeout=30)
        for i in range(WITHDRAWN_KEPT - 1):
            stub.Release(kup_pb2.ReleaseRequest(attach_id=f"early-{i}"), timeout=30)
        with pytest.raises(grpc.RpcError) as err:
            stub.Release(kup_pb2.ReleaseRequest(attach_id="early-past"), timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
        assert f"{WITHDRAWN_KEPT} attaches withdrawn before they reached kupd" in (
            err.value.details() or ""
        ), err.value
        assert "attach early-past is not withdrawn" in (err.value.details() or ""), err.value
        with pytest.raises(grpc.RpcError) as err:
            stub.Attach(kup_pb2.AttachRequest(device="echo", channel=15, attach_id="early-first"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND, err.value
        assert "attach early-first was withdrawn" in (err.value.details() or "")
        assert _state(client, 15) == "free"
        # the refused name was not withdrawn: its Attach takes a lease, and
        # the Release by its name (room again: early-first's came) ends it
        got = stub.Attach(kup_pb2.AttachRequest(device="echo", channel=15, attach_id="early-past"))
        assert got.channel == 15
        stub.Release(kup_pb2.ReleaseRequest(attach_id="early-past"), timeout=30)
        assert _state(client, 15) == "free"


def test_withdrawn_names_make_room_only_once_they_are_old() -> None:
    """The quota's names go by age: a full table refuses a new name until
    its oldest is WITHDRAWN_FOR old, then that one (only) makes room; a
    name taken by its Attach makes room at once."""
    w = Withdrawn()
    for i in range(WITHDRAWN_KEPT):
        w.add("t", f"n{i}", now=i / 1000)
    with pytest.raises(errors.ResourceExhausted, match=r"tenant t: .* attach late is not"):
        w.add("t", "late", now=WITHDRAWN_FOR - 0.5)
    w.add("t", "late", now=WITHDRAWN_FOR)  # n0 is that old now: it goes
    assert len(w) == WITHDRAWN_KEPT
    assert not w.take("n0")
    assert w.take("n1")  # its Attach came
    w.add("t", "again", now=WITHDRAWN_FOR)  # n1's room
    with pytest.raises(errors.ResourceExhausted):
        w.add("t", "more", now=WITHDRAWN_FOR)
    w.add("t", "n2", now=WITHDRAWN_FOR)  # one it has: withdrawn anew, no room needed
    assert len(w) == WITHDRAWN_KEPT
    assert w.take("late") and w.take("again") and w.take("n2")


@pytest.mark.parametrize(
    ("request_", "says"),
    [
        (kup_pb2.AttachRequest(device="echo", attach_id="a" * 65), "attach_id of 65 characters"),
        (kup_pb2.AttachRequest(device="echo", attach_id="a b"), "attach_id 'a b': only"),
        (kup_pb2.ReleaseRequest(attach_id="x/y"), "attach_id 'x/y': only"),
        (
            kup_pb2.ReleaseRequest(lease_id="0123456789abcdef", attach_id="x"),
            "lease_id and attach_id are both set",
        ),
        (kup_pb2.ReleaseRequest(), "release: lease_id or attach_id is required"),
    ],
    ids=["long", "space", "slash", "both", "neither"],
)
def test_bad_attach_ids_are_refused_by_name(kupd: Kupd, request_: object, says: str) -> None:
    with grpc.insecure_channel(f"unix:{kupd.socket}") as ch:
        stub = kup_pb2_grpc.KupStub(ch)
        method = stub.Attach if isinstance(request_, kup_pb2.AttachRequest) else stub.Release
        with pytest.raises(grpc.RpcError) as err:
            method(request_, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert says in (err.value.details() or "")


def test_attaches_given_up_in_a_loop_do_not_use_up_the_withdrawn_quota(
    sim: KupSim, kupd: Kupd, client: Client
) -> None:
    """A client that attaches with a short timeout in a loop while its
    channel is not free yet (the module still holds it): each attach waits
    in kupd, is past its deadline, and the client sends Release{attach_id}
    as it gives up.  kupd had seen that Attach, and ended it without a
    lease: the name is not one "withdrawn before its Attach reached kupd",
    and must not count against that quota -- past WITHDRAWN_KEPT such
    attaches, the tenant's Releases were refused RESOURCE_EXHAUSTED (the
    client ignores it), and one whose Attach really was still on its way
    then took a lease nobody knew of."""
    chan = 22
    with client.open("echo").channel(chan) as ch:
        assert ch.receive(timeout=30).kind == Kind.PASS
        ch.send(LOCKHOLD)  # echo keeps the channel locked after we leave
        wait_locked(sim, chan)
    given_up = [0]
    lock = threading.Lock()

    def loop() -> None:
        while True:
            with lock:
                if given_up[0] >= WITHDRAWN_KEPT + 64:
                    return
            with pytest.raises(errors.DeadlineExceeded):
                client.attach("echo", chan, timeout=0.2)
            with lock:
                given_up[0] += 1

    try:
        workers = [threading.Thread(target=loop) for _ in range(16)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=120)
        assert not any(w.is_alive() for w in workers)
        assert given_up[0] >= WITHDRAWN_KEPT + 64
        with grpc.insecure_channel(f"unix:{kupd.socket}") as gch:
            stub = kup_pb2_grpc.KupStub(gch)
            stub.Release(kup_pb2.ReleaseRequest(attach_id="still-on-its-way"), timeout=30)
            with pytest.raises(grpc.RpcError) as err:
                stub.Attach(
                    kup_pb2.AttachRequest(device="echo", channel=15, attach_id="still-on-its-way"),
                    timeout=30,
                )
            assert err.value.code() == grpc.StatusCode.NOT_FOUND, err.value
    finally:
        unlock(client)
    assert "RESOURCE_EXHAUSTED" not in kupd.log()
    wait_until(lambda: _state(client, chan) == "free", what=f"channel {chan} to be free")
