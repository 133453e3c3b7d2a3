"""Re-attaching a channel kupd has just released (kupd.devices.attach).

The module lets go of a channel only when its worker sees the user gone;
kupsim parks an ATTACH 0.5 s for that, then answers Busy.  kupd tries again
while it released the channel itself less than REATTACH_GRACE ago, and only
then.  echo's "!lockhold" makes the module keep the channel locked after
the user left for as long as the test likes, far beyond kupsim's park."""

from __future__ import annotations

import threading
import time

import pytest
from gateway_helpers import LOCKHOLD, Kupd, unlock, wait_locked

from kupclient import Client, Kind, Lease
from kupd import errors
from kupd.channel import Device
from kupd.devices import REATTACH_GRACE
from kupd.testing import KupSim, wait_until

WAITS = "attach waits for the module to let go"


def _waits(kupd: Kupd, chan: int) -> int:
    """kupd's log records saying an attach of ``chan`` is being retried."""
    tag = f'"channel": {chan}'
    return sum(1 for line in kupd.log().splitlines() if WAITS in line and tag in line)


def _leave_locked(sim: KupSim, client: Client, chan: int) -> None:
    """Use ``chan`` through a Session and leave it while echo's worker keeps
    it locked (until unlock()): kupsim cannot renew it meanwhile."""
    with client.open("echo").channel(chan) as ch:
        assert ch.receive(timeout=10).kind == Kind.PASS
        ch.send(LOCKHOLD)
        wait_locked(sim, chan)


def test_reattach_waits_for_the_module_to_let_go(
    sim: KupSim, kupd: Kupd, client: Client
) -> None:
    _leave_locked(sim, client, 20)
    got: list[Lease | errors.KupError] = []

    def reattach() -> None:
        try:
            lease = client.attach("echo", 20)
            got.append(lease)
        except errors.KupError as exc:
            got.append(exc)

    t = threading.Thread(target=reattach)
    t.start()
    # kupsim has parked the attach and answered Busy at least once: without
    # the retry the client would have its FAILED_PRECONDITION by now
    wait_until(lambda: _waits(kupd, 20) == 1, what="kupd to retry the attach of channel 20")
    assert not got, got
    unlock(client)  # the module lets go; kupsim renews the channel
    t.join(30)
    assert not t.is_alive() and len(got) == 1, got
    lease = got[0]
    assert isinstance(lease, Lease), lease
    # a fresh conversation on the renewed channel
    assert client.lease_receive(lease.lease_id, timeout=10).kind == Kind.PASS
    reply = client.lease_exchange(lease.lease_id, b"again", timeout=10)
    assert reply.data == b"again"
    client.release(lease.lease_id)
    assert _waits(kupd, 20) == 1  # one log record per attach, not one per try


def test_reattach_gives_up_after_the_grace(sim: KupSim, kupd: Kupd, client: Client) -> None:
    _leave_locked(sim, client, 22)
    released = time.monotonic()
    gave_up = r"module still holds channel 22 [0-9.]+ s after kupd released"
    with pytest.raises(errors.Busy, match=gave_up):
        client.attach("echo", 22)
    assert time.monotonic() - released >= REATTACH_GRACE  # it did keep trying
    unlock(client)
    # and the channel is not left attached to anybody: it can be taken
    wait_until(lambda: _free(client, 22), what="channel 22 free after the module let go")
    with client.open("echo").channel(22) as ch:
        assert ch.receive(timeout=10).kind == Kind.PASS


def _free(client: Client, chan: int) -> bool:
    (dev,) = client.devices("echo")
    return dev.channels[chan].state == "free"


def test_channel_held_outside_kupd_is_busy_at_once(sim: KupSim, kupd: Kupd, client: Client) -> None:
    # a process using the device directly holds channel 30: kupd never
    # released it, so there is nothing to wait for
    with Device.open(sim.device_path("echo")) as dev, dev.channel(30):
        with pytest.raises(errors.Busy, match="30"):
            client.attach("echo", 30)
        with pytest.raises(errors.Busy):
            with client.open("echo").channel(30) as ch:
                ch.receive(timeout=10)
    assert _waits(kupd, 30) == 0
