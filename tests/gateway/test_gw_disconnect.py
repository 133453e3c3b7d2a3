"""A module that ends a user's session from the kernel side (kupdev_disconnect,
echo's b"!kick[N]"), seen by a kupd client: the session ends with PeerGone
(gRPC ABORTED, EKU_PEER), kupd lets go of the channel, and the channel serves
the next session afresh."""

from __future__ import annotations

import grpc
import pytest

from kupclient import Client, Kind
from kupd import errors
from kupd.testing import KupSim, wait_until


def _state(client: Client, chan: int) -> str:
    return {c.id: c.state for c in client.devices("echo")[0].channels}[chan]


def test_module_disconnect_ends_the_session_with_peergone(sim: KupSim, client: Client) -> None:
    with client.open("echo").channel(30) as ch:
        assert ch.receive(timeout=10).kind == Kind.PASS
        ch.send(b"ping")
        assert ch.receive(timeout=10).data == b"ping"
        ch.send(b"!kick200")  # never answered: the module disconnects the session
        with pytest.raises(errors.PeerGone) as ei:
            ch.receive(timeout=30)
    assert ei.value.grpc_code == grpc.StatusCode.ABORTED, ei.value
    assert "EKU_PEER" in str(ei.value), ei.value
    wait_until(
        lambda: "echo: chan 30: disconnected the user (0)" in sim.stderr(),
        what="echo's disconnect line",
    )
    # kupd let go of the channel: free, and the next session is served afresh
    wait_until(lambda: _state(client, 30) == "free", what="channel 30 free again")
    with client.open("echo").channel(30) as ch:
        first = ch.receive(timeout=10)
        assert first.kind == Kind.PASS and first.seq == 1
        ch.send(b"again")
        assert ch.receive(timeout=10).data == b"again"


def test_module_disconnect_ends_an_attach_lease_and_frees_its_channel(
    sim: KupSim, client: Client
) -> None:
    """The same for an Attach lease: the operation that meets the disconnect
    gets PeerGone, and kupd ends the lease at once -- before, it kept the
    channel, useless to everyone, until the client released it or the lease
    idled out.  Later uses of the lease id say how it ended."""
    lease = client.attach("echo", 31)
    lid = lease.lease_id
    assert client.lease_receive(lid, timeout=10).kind == Kind.PASS
    with pytest.raises(errors.PeerGone, match="EKU_PEER"):
        client.lease_exchange(lid, b"!kick200", timeout=30)
    wait_until(lambda: _state(client, 31) == "free", what="channel 31 free again")
    with pytest.raises(errors.NotFound, match=f"lease {lid} has ended .*module"):
        client.lease_send(lid, b"more")
    with client.open("echo").channel(31) as ch:
        first = ch.receive(timeout=10)
        assert first.kind == Kind.PASS and first.seq == 1


def test_an_idle_session_and_lease_let_go_of_a_channel_the_module_disconnected(
    sim: KupSim, client: Client
) -> None:
    """kupdev_disconnect of a user that is not waiting (echo's "!kick100"
    fires 100 ms after the send returns): nothing wakes kupd, yet it must
    not keep the dead channel from everyone for the Session's life or the
    lease's idle timeout.  Its reaper reads the idle channels' pages: the
    channels are free again, the Session's next request fails with
    PeerGone, and the lease id says the module ended it."""
    ch = client.open("echo").channel(40)
    assert ch.receive(timeout=10).kind == Kind.PASS
    ch.send(b"!kick100")
    lease = client.attach("echo", 41)
    assert client.lease_receive(lease.lease_id, timeout=10).kind == Kind.PASS
    client.lease_send(lease.lease_id, b"!kick100")
    for chan in (40, 41):
        wait_until(
            lambda chan=chan: f"echo: chan {chan}: disconnected the user (0)" in sim.stderr(),
            what=f"echo's disconnect line for channel {chan}",
        )
    wait_until(
        lambda: _state(client, 40) == "free" and _state(client, 41) == "free",
        timeout=20,
        what="both channels free again",
    )
    with pytest.raises(errors.PeerGone, match="EKU_PEER"):
        ch.receive(timeout=10)
    ch.close()
    with pytest.raises(errors.NotFound, match="ended by the module"):
        client.lease_send(lease.lease_id, b"more")
