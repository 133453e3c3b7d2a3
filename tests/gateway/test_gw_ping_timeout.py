"""A live client that answers kupd's pings late keeps its connection while
its requests flow; one that is quiet and answers late is dropped as hung,
and told why (a stopped one is dropped as before: test_gw_limits.py's
test_hung_client_is_detected_by_keepalive, with these settings).

kupd drops hung clients fast (``keepalive_timeout``, 2 s by default): gRPC
times every ping kupd sends by ``grpc.http2.ping_timeout_ms``, the only
setting that makes grpcio's server drop a client that stops answering
(``keepalive_timeout_ms`` alone did not: a SIGSTOPped client went after
gRPC's default minute).  gRPC's flow control also pings, to measure the
connection (its BDP probe), several times a second while data arrives: a
client busy sending, slow to answer one of those, lost its whole
connection with GOAWAY ENHANCE_YOUR_CALM "ping_timeout" -- grpc-js reports
it as RESOURCE_EXHAUSTED "Bandwidth exhausted or memory limit exceeded".
kupd turns the probe off (kupd.server.server_options) and announces a
fixed stream window in its place; what that window lets a hostile client
make kupd hold is pinned in tests/tenancy/test_tenancy_hostile_wire.py.

Real kupd and kupsim; the client's ping answers are delayed by a proxy
(h2slowping) past kupd's 1 s keepalive timeout."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from gateway_helpers import Kupd, StartKupd, echo_sim
from h2slowping import SlowPingProxy

from kupclient import Channel, Client, Kind
from kupd import errors
from kupd.testing import KupSim, wait_until

__all__: list[str] = []

#: past kupd's keepalive timeout below (1 s), far below gRPC's default (60 s)
ACK_DELAY = 2.5


@pytest.fixture
def big_sim() -> Iterator[KupSim]:
    """echo with 256 KiB channels: room for the 64 KiB exchanges below.
    Its workers start 300 ms late (start_delay_ms): echo hands a fresh
    session the turn (its greeting PASS) from a thread of its own, which a
    loaded machine may start late -- made certain here, so that no test
    races it."""
    env = dict(
        os.environ,
        KUP_PARAM_ECHO_CHANNELS="64",
        KUP_PARAM_ECHO_PAGES="64",
        KUP_PARAM_ECHO_START_DELAY_MS="300",
    )
    with echo_sim(env=env) as sim:
        yield sim


@pytest.fixture
def kupd(big_sim: KupSim, start_kupd: StartKupd) -> Kupd:
    return start_kupd(big_sim, "--keepalive-time", "1", "--keepalive-timeout", "1")


@pytest.fixture
def proxy(kupd: Kupd) -> Iterator[SlowPingProxy]:
    p = SlowPingProxy(kupd.socket + ".slowping", kupd.socket, ACK_DELAY)
    yield p
    p.close()


def test_a_busy_client_slow_to_answer_pings_keeps_its_connection(
    kupd: Kupd, proxy: SlowPingProxy
) -> None:
    """A Session pumping 64 KiB exchanges for a few seconds through a proxy
    that answers every ping 2.5 s late: every exchange comes back, and kupd
    never sends a GOAWAY."""
    payload = bytes(range(256)) * 256
    with Client(proxy.path) as c, c.open("echo").channel(44) as ch:
        # echo's greeting first: an exchange sent before it is NotYourTurn
        assert ch.receive(timeout=30).kind == Kind.PASS
        for i in range(3000):
            data = i.to_bytes(4, "big") + payload
            assert ch.exchange(data, timeout=30).data == data
    assert proxy.goaways == [], f"kupd closed the connection: {proxy.goaways}"


def test_a_quiet_client_slow_to_answer_is_dropped_and_told_why(
    kupd: Kupd, proxy: SlowPingProxy
) -> None:
    """A client holding a Session and sending nothing, whose ping answers
    come 2.5 s late, is dropped as hung (kupd cannot tell it from a stopped
    one); its next operation fails Unavailable saying what happened, not
    gRPC's bare "ping timeout"."""
    with Client(proxy.path) as c:
        ch = c.open("echo").channel(46)
        wait_until(lambda: proxy.goaways, timeout=60, what="kupd to give up on the quiet client")
        assert proxy.goaways[0].startswith(b"ping_timeout"), proxy.goaways
        with pytest.raises(errors.Unavailable, match="keepalive ping went unanswered"):
            ch.exchange(b"late", timeout=30)
        # the client goes on: a new connection, and the channel again once
        # kupd has ended the dropped one's session (it may not have yet)
        again: list[Channel] = []

        def reopened() -> bool:
            try:
                again.append(c.open("echo").channel(46))
                return True
            except errors.Busy:
                return False

        wait_until(reopened, timeout=60, what="channel 46 free again")
        assert again[0].receive(timeout=30).kind == Kind.PASS
        assert again[0].exchange(b"again", timeout=30).data == b"again"
