"""Every kup.v1 RPC's happy path and every error of the taxonomy, over a
real unix socket against a real kupd + kupsim (echo module)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import grpc
import pytest
from gateway_helpers import LOCKHOLD, Kupd, StartKupd, unlock, wait_locked
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kupapi import kup_pb2, kup_pb2_grpc
from kupclient import AsyncClient, CallReply, Client, Kind, Message
from kupclient.admin import AdminClient
from kupclient.errors import is_connection_failure
from kupd import errors
from kupd.service import _CODES, seed_first
from kupd.testing import KupSim, wait_until


def expected(chan: int, data: bytes) -> bytes:
    """The echo module answers unchanged on even channels, upper-cased on odd."""
    return data if chan % 2 == 0 else data.upper()


def raw_stub(kupd: Kupd) -> tuple[grpc.Channel, kup_pb2_grpc.KupStub]:
    ch = grpc.insecure_channel("unix:" + kupd.socket)
    return ch, kup_pb2_grpc.KupStub(ch)


# ---------------------------------------------------------------- happy paths


def test_list_devices_reports_geometry_and_channel_states(client: Client) -> None:
    (dev,) = client.devices()
    assert dev.name == "echo" and dev.reachable and not dev.shutting_down
    assert dev.abi_version == 1
    assert dev.channel_count == 128 and dev.announced == 128
    assert dev.max_message_bytes == dev.page_size * dev.pages_per_channel
    assert dev.call_channels == 4
    states = [c.state for c in dev.channels]
    assert states.count("calls") == 4 and states.count("free") == 124
    with client.open("echo").channel(7) as ch:
        lease = client.attach("echo", 9)
        by_id = {c.id: c for c in client.devices("echo")[0].channels}
        assert by_id[7].state == "session" and by_id[7].lease_id == ch.lease.lease_id
        assert by_id[9].state == "lease" and by_id[9].lease_id == lease.lease_id
        client.release(lease.lease_id)

    def both_free() -> bool:  # the host notices the detach asynchronously
        by_id = {c.id: c for c in client.devices("echo")[0].channels}
        return by_id[7].state == "free" and by_id[9].state == "free"

    wait_until(both_free, what="channels 7 and 9 free again")


def test_session_send_receive_pass(client: Client) -> None:
    with client.open("echo").channel() as ch:
        first = ch.receive()  # the kernel's opening hand-over
        assert first.kind == Kind.PASS and first.seq == 1
        ch.send(b"hello")
        reply = ch.receive(timeout=10)
        assert (reply.data, reply.kind, reply.seq) == (expected(ch.id, b"hello"), Kind.DATA, 2)
        ch.pass_()
        back = ch.receive()
        assert back.kind == Kind.PASS and back.seq == 3


def test_session_nonblocking_receive_is_not_ready_not_an_error(
    sim: KupSim, client: Client
) -> None:
    with client.open("echo").channel(12) as ch:
        ch.receive()
        ch.send(LOCKHOLD)  # the module holds the turn until unlock()
        wait_locked(sim, 12)
        assert ch.try_receive() is None
        with pytest.raises(errors.NotReady):
            ch.receive(0)
        unlock(client)
        assert ch.receive(timeout=10).data == LOCKHOLD


def test_session_specific_channel_and_reattach_after_close(client: Client) -> None:
    h = client.open("echo")
    with h.channel(11) as ch:
        assert ch.id == 11 and ch.max_msg == 4096
        ch.receive()
        ch.send(b"abc")
        assert ch.receive().data == b"ABC"
    # free again at once (kupd waits while kupsim renews it), a fresh conversation
    with h.channel(11) as ch:
        assert ch.receive().seq == 1


def test_lease_rpcs(client: Client) -> None:
    lease = client.attach("echo")
    assert lease.device == "echo" and lease.idle_timeout_ms > 0
    assert client.lease_receive(lease.lease_id).kind == Kind.PASS
    client.lease_send(lease.lease_id, b"via lease")
    assert client.lease_receive(lease.lease_id, timeout=10).data == expected(
        lease.channel, b"via lease"
    )
    client.lease_pass(lease.lease_id)
    assert client.lease_receive(lease.lease_id).kind == Kind.PASS
    client.release(lease.lease_id)
    with pytest.raises(errors.NotFound, match=lease.lease_id):
        client.lease_send(lease.lease_id, b"x")


def test_call(client: Client) -> None:
    for i in range(10):
        payload = f"{i}:1234".encode()
        reply = client.call("echo", payload, timeout=10)
        assert reply.data == payload and reply.kind == Kind.DATA


def test_health_and_reflection(kupd: Kupd, client: Client) -> None:
    assert client.health() == "SERVING"
    assert client.health("kup.v1.Kup") == "SERVING"
    assert client.health("kup.v1.Kup/echo") == "SERVING"
    ch = grpc.insecure_channel("unix:" + kupd.socket)
    try:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        (resp,) = list(stub.ServerReflectionInfo(iter([req]), timeout=10))
        names = {s.name for s in resp.list_services_response.service}
        assert {"kup.v1.Kup", "grpc.health.v1.Health"} <= names
        req = reflection_pb2.ServerReflectionRequest(file_containing_symbol="kup.v1.Kup")
        (resp,) = list(stub.ServerReflectionInfo(iter([req]), timeout=10))
        assert resp.file_descriptor_response.file_descriptor_proto
    finally:
        ch.close()


def test_async_client(kupd: Kupd) -> None:
    async def main() -> None:
        async with AsyncClient(kupd.socket) as c:
            assert await c.health() == "SERVING"
            assert (await c.devices())[0].name == "echo"
            h = await c.open("echo")
            ch = await h.channel()
            async with ch:
                assert (await ch.receive()).kind == Kind.PASS
                await ch.send(b"async")
                assert (await ch.receive(timeout=10)).data == expected(ch.id, b"async")
            assert (await c.call("echo", b"42", timeout=10)).data == b"42"
            lease = await c.attach("echo")
            await c.lease_receive(lease.lease_id)
            await c.lease_pass(lease.lease_id)
            assert (await c.lease_receive(lease.lease_id)).kind == Kind.PASS
            await c.release(lease.lease_id)
            async for ev in c.watch("echo", initial_state=True):
                assert ev.initial and ev.device == "echo"
                break

    asyncio.run(main())


# ---------------------------------------------------------------- errors


def test_unknown_device_is_not_found(client: Client) -> None:
    with pytest.raises(errors.NotFound, match="nosuch"):
        client.open("nosuch")
    with pytest.raises(errors.NotFound, match="nosuch"):
        client.call("nosuch", b"x")
    with pytest.raises(errors.NotFound, match="nosuch"):
        client.attach("nosuch")
    with pytest.raises(errors.NotFound, match="nosuch"):
        client.devices("nosuch")
    with pytest.raises(errors.NotFound, match="nosuch"):
        next(iter(client.watch("nosuch")))
    with pytest.raises(errors.NotFound, match="nosuch"):
        client.open("echo").client.open("nosuch").channel()


def test_unknown_channel_and_lease_are_not_found(client: Client) -> None:
    with pytest.raises(errors.NotFound, match="no channel 500"):
        client.open("echo").channel(500)
    with pytest.raises(errors.NotFound, match="no lease"):
        client.lease_receive("0123456789abcdef")


def test_grpc_status_codes_and_metadata(sim: KupSim, kupd: Kupd) -> None:
    ch, stub = raw_stub(kupd)
    try:
        with pytest.raises(grpc.RpcError) as ei:
            stub.Call(kup_pb2.CallRequest(device="nosuch", data=b"x"), timeout=10)
        assert ei.value.code() == grpc.StatusCode.NOT_FOUND
        assert "nosuch" in ei.value.details()
        assert ("kup-error", "NotFound") in tuple(ei.value.trailing_metadata())
        with pytest.raises(grpc.RpcError) as ei:
            stub.Call(kup_pb2.CallRequest(device="echo", data=b"x" * 5000), timeout=10)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "4096" in ei.value.details()  # names the limit
        a = stub.Attach(kup_pb2.AttachRequest(device="echo", channel=20), timeout=10)
        with pytest.raises(grpc.RpcError) as ei:
            stub.Attach(kup_pb2.AttachRequest(device="echo", channel=20), timeout=10)
        assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert a.lease_id in ei.value.details()
        stub.Receive(kup_pb2.ReceiveRequest(lease_id=a.lease_id), timeout=10)
        stub.Send(kup_pb2.SendRequest(lease_id=a.lease_id, data=LOCKHOLD), timeout=10)
        wait_locked(sim, 20)
        with pytest.raises(grpc.RpcError) as ei:  # the kernel holds the turn until the unlock
            stub.Send(kup_pb2.SendRequest(lease_id=a.lease_id, data=b"x"), timeout=10)
        assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        # the seed's name first (as the API says), once -- libkup's text has
        # it after the context
        details = ei.value.details()
        assert details.startswith("EKU_NOTTURN: ") and details.count("EKU_") == 1, details
        r = stub.Receive(
            kup_pb2.ReceiveRequest(lease_id=a.lease_id, mode=kup_pb2.RECEIVE_MODE_NONBLOCK),
            timeout=10,
        )
        assert r.not_ready and not r.HasField("message")
        with pytest.raises(grpc.RpcError) as ei:
            stub.Receive(
                kup_pb2.ReceiveRequest(
                    lease_id=a.lease_id, mode=kup_pb2.RECEIVE_MODE_DEADLINE, timeout_ms=20
                ),
                timeout=10,
            )
        assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        stub.Call(kup_pb2.CallRequest(device="echo", data=b"!lockfree"), timeout=30)  # unlock
        r = stub.Receive(kup_pb2.ReceiveRequest(lease_id=a.lease_id), timeout=30)
        assert r.message.data == LOCKHOLD  # even channel: unchanged
    finally:
        ch.close()


def test_session_errors_in_band_keep_the_session(sim: KupSim, client: Client) -> None:
    with client.open("echo").channel() as ch:
        ch.receive()
        with pytest.raises(errors.TooBig, match="4096"):
            ch.send(b"x" * (ch.max_msg + 1))
        ch.send(LOCKHOLD)
        wait_locked(sim, ch.id)
        with pytest.raises(errors.NotYourTurn) as early:
            ch.send(b"too early")  # the kernel holds the turn until unlock()
        # whose turn it is, said once (not again as "the turn is on the wrong side")
        assert str(early.value) == (
            f"EKU_NOTTURN: send of 9 bytes on channel {ch.id} of device echo: "
            "the kernel holds the turn; receive its message first"
        )
        with pytest.raises(errors.DeadlineExceeded):
            ch.receive(timeout=0.02)
        unlock(client)
        assert ch.receive(timeout=10).data == expected(ch.id, LOCKHOLD)
        # already consumed, holding the turn: would wait forever; the error
        # says whose turn it is (not "the other side's")
        with pytest.raises(errors.NotYourTurn, match=r"this side holds the turn .*send or pass"):
            ch.receive()
        ch.send(b"still alive")
        assert ch.receive(timeout=10).data == expected(ch.id, b"still alive")


def test_channel_held_elsewhere_is_failed_precondition(client: Client) -> None:
    h = client.open("echo")
    with h.channel(30), pytest.raises(errors.Busy, match="channel 30"):
        h.channel(30)
    with pytest.raises(errors.Busy, match="Call pool"):
        h.channel(0)


def test_call_deadline_quarantines_the_channel(client: Client) -> None:
    with pytest.raises(errors.DeadlineExceeded):
        client.call("echo", b"!delay", timeout=0.05)
    # The quarantined channel is never handed on mid-exchange: every later
    # reply is the answer to its own request, never the late "!delay".
    for i in range(20):
        payload = f"{i}".encode()
        assert client.call("echo", payload, timeout=10).data == payload
    wait_until(
        lambda: all(c.state != "quarantined" for c in client.devices("echo")[0].channels),
        what="quarantine lifted",
    )


def test_device_shutdown_is_unavailable_with_eku_shutdown(sim: KupSim, kupd: Kupd) -> None:
    with kupd.client() as c:
        ch = c.open("echo").channel()
        ch.receive()
        ch.send(b"!hold")  # never answered: the receive below can only end by the unload
        sim.signal(15)  # kupsim unloads the module: EKU_SHUTDOWN on every channel
        with pytest.raises((errors.Shutdown, errors.PeerGone)) as ei:
            ch.receive(timeout=10)
        ch.close()
        wait_until(lambda: c.health() == "NOT_SERVING", what="health NOT_SERVING")
        with pytest.raises((errors.Shutdown, errors.Unavailable)) as ei2:
            c.call("echo", b"x", timeout=5)
    assert isinstance(ei.value, errors.Shutdown), ei.value
    # "message starts with EKU_SHUTDOWN" (kup.proto), once: libkup says
    # "receive on channel N of device echo: EKU_SHUTDOWN: ..."
    msg = str(ei.value)
    assert msg.startswith("EKU_SHUTDOWN: ") and msg.count("EKU_SHUTDOWN") == 1, msg
    # the context stays: libkup's "... of device echo", or kupd's "device
    # echo is shutting down" when its device monitor saw the unload first
    # and ended the lease before libkup's receive returned
    assert "device echo" in msg, msg
    assert ei2.value is not None


def test_call_reply_that_never_comes_keeps_its_channel_quarantined(client: Client) -> None:
    with pytest.raises(errors.DeadlineExceeded):
        client.call("echo", b"!hold", timeout=0.1)  # the module never answers
    (dev,) = client.devices("echo")
    assert [c.state for c in dev.channels[:4]].count("quarantined") == 1
    for i in range(12):  # the other three pool channels carry on
        assert client.call("echo", f"{i}".encode(), timeout=10).data == f"{i}".encode()
    (dev,) = client.devices("echo")
    assert [c.state for c in dev.channels[:4]].count("quarantined") == 1


def test_quarantined_channels_whose_reply_never_comes_are_replaced(
    sim: KupSim, start_kupd: StartKupd
) -> None:
    """Four Calls the module never answers quarantine the whole 4-channel
    pool; after --call-quarantine each of those channels is closed (echo's
    worker sees its user leave) and a fresh one attached, so Calls work
    again instead of timing out for good."""
    # The four Calls and the look at the pool must all happen before the
    # first quarantined channel is replaced: a few seconds, not one, so a
    # loaded machine does not see a replacement before the pool is all
    # quarantined (the test then takes that long to see the replacements).
    k = start_kupd(sim, "--call-quarantine", "5.0")
    with k.client() as c:
        for _ in range(4):
            with pytest.raises(errors.DeadlineExceeded):
                c.call("echo", b"!hold", timeout=0.2)
        (dev,) = c.devices("echo")
        held = sorted(ch.id for ch in dev.channels if ch.state == "quarantined")
        assert len(held) == 4, dev.channels
        # a Call now waits for a replacement, and gets one
        # the replacement may be an odd channel, which upper-cases
        assert c.call("echo", b"after", timeout=20).data.lower() == b"after"

        def states() -> list[str]:
            return [ch.state for ch in c.devices("echo")[0].channels]

        wait_until(
            lambda: states().count("calls") == 4 and "quarantined" not in states(),
            what="a full pool of 4 channels again, none quarantined",
        )
        for i in range(8):  # the replacements carry Calls
            assert c.call("echo", b"%d" % i, timeout=10).data == b"%d" % i
    log = k.log()
    assert log.count("pool channel replaced: its reply did not come") == 4, log[-3000:]
    # echo's workers see their user leave a moment after kupd closed them
    # (kupsim's detach, then the worker's next 20 ms look): wait, bounded
    wait_until(
        lambda: sim.stderr().count("peer gone (-EPIPE)") >= 4,
        what="echo to log the 4 replaced channels' users gone",
    )


def test_a_call_refused_by_a_quarantined_pool_says_so(
    sim: KupSim, start_kupd: StartKupd
) -> None:
    """With every pool channel quarantined, a Call's DeadlineExceeded says
    that the pool is out of service for that reason and for how long at
    most -- not just "no pool channel became free"."""
    k = start_kupd(sim, "--call-quarantine", "120")
    with k.client() as c:
        for _ in range(4):
            with pytest.raises(errors.DeadlineExceeded):
                c.call("echo", b"!hold", timeout=0.2)
        with pytest.raises(errors.DeadlineExceeded) as ei:
            c.call("echo", b"next", timeout=0.3)
    assert re.search(
        r"no pool channel became free within 0\.300s \(4 channels, 4 of them quarantined: "
        r"a timed-out Call's reply is still owed .*call_quarantine=120s\); 1 calls queued\)",
        str(ei.value),
    ), ei.value


def test_session_must_start_with_attach(kupd: Kupd) -> None:
    ch, stub = raw_stub(kupd)
    try:
        reqs = iter([kup_pb2.SessionRequest(request_id=1, send=kup_pb2.SessionSend(data=b"x"))])
        with pytest.raises(grpc.RpcError) as ei:
            list(stub.Session(reqs, timeout=10))
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "attach" in ei.value.details()
    finally:
        ch.close()


@pytest.mark.parametrize(
    ("name", "message", "details"),
    [
        ("EKU_SHUTDOWN", "device echo is going away", "EKU_SHUTDOWN: device echo is going away"),
        (
            "EKU_SHUTDOWN",
            "receive on channel 72 of device echo: EKU_SHUTDOWN: the device is shutting down",
            "EKU_SHUTDOWN: receive on channel 72 of device echo: the device is shutting down",
        ),
        ("EKU_BUSY", "EKU_BUSY: channel 3 is held", "EKU_BUSY: channel 3 is held"),
        ("EKU_PEER", "send on channel 1: EKU_PEER", "EKU_PEER: send on channel 1"),
        ("", "no seed name", "no seed name"),
    ],
)
def test_error_details_start_with_the_seed_name_once(name: str, message: str, details: str) -> None:
    assert seed_first(name, message) == details


def test_gateway_md_error_table_is_the_mapping() -> None:
    """docs/gateway.md's Errors table gives every class kupd maps
    (kupd/service.py's one mapping) the gRPC code kupd answers it with."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "gateway.md").read_text()
    section = doc.split("\n### Errors\n", 1)[1].split("\n## ", 1)[0]
    documented: dict[str, str] = {}
    for row in re.findall(r"^\|(.*)\|$", section, re.M):
        cells = [c.strip() for c in row.split(" | ")]
        if len(cells) != 3 or not cells[2].startswith("`"):
            continue  # the header and its rule
        code = re.match(r"`([A-Z_]+)`", cells[2])
        assert code, row
        for name in re.findall(r"`([A-Za-z]+)`", cells[1]):
            documented[name] = code.group(1)
    mapped = {cls.__name__: code.name for cls, code in _CODES.items()}
    assert documented == mapped


def test_errors_carry_their_grpc_code(client: Client, tmp_path: Path) -> None:
    """Every KupError the client raises from a status has ``grpc_code`` (as
    Node's ``.code``) besides ``code`` (KUP_E_*), ``seed_name`` and
    ``message``; one the client made itself has None."""
    with pytest.raises(errors.NotFound) as nf:
        client.open("no-such-device")
    e = nf.value
    assert e.grpc_code == grpc.StatusCode.NOT_FOUND
    assert (e.code, e.seed_name) == (1009, "EKU_NOENT") and e.message == str(e)
    with client.open("echo").channel() as ch:
        ch.receive(timeout=10)
        with pytest.raises(errors.NotYourTurn) as nyt:  # in-band on the Session
            ch.receive(timeout=1)
        assert nyt.value.grpc_code == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(errors.TooBig) as big:  # refused by the client
            ch.send(b"x" * (ch.max_msg + 1))
        assert big.value.grpc_code is None
    with AdminClient(client.path) as adm, pytest.raises(errors.NotFound) as unimpl:
        adm.list_leases()  # gRPC's own UNIMPLEMENTED: no Admin service here
    assert unimpl.value.grpc_code == grpc.StatusCode.UNIMPLEMENTED
    with Client(str(tmp_path / "nobody.sock")) as nobody, pytest.raises(errors.Unavailable) as un:
        nobody.devices()
    assert un.value.grpc_code == grpc.StatusCode.UNAVAILABLE and is_connection_failure(un.value)


def test_call_says_which_pool_channel_answered(client: Client) -> None:
    """call() gives the pool channel (as Node's call does): a CallReply, a
    Message with ``channel``; echo upper-cases on odd channels."""
    pool = {x.id for x in client.devices("echo")[0].channels if x.state == "calls"}
    for _ in range(8):
        r = client.call("echo", b"abc", timeout=10)
        assert isinstance(r, Message) and isinstance(r, CallReply)
        assert r.channel in pool, (r, pool)
        assert r.data == (b"ABC" if r.channel % 2 else b"abc"), r
        # still equal to the Message it carries (call() returned one before)
        plain = Message(r.data, r.kind, r.seq)
        assert r == plain and plain == r and hash(r) == hash(plain)
        assert r != CallReply(r.data, r.kind, r.seq, r.channel + 1)
    h = client.open("echo")
    assert h.call(b"x", timeout=10).channel in pool

    async def main() -> None:
        async with AsyncClient(client.path) as ac:
            r = await ac.call("echo", b"abc", timeout=10)
            assert isinstance(r, CallReply) and r.channel in pool
            assert (await (await ac.open("echo")).call(b"x", timeout=10)).channel in pool

    asyncio.run(main())
