"""Re-attaching a channel whose module has not let go of it yet
(kupd.devices.attach).

The module lets go of a channel only when its worker sees the user gone;
kupsim parks an ATTACH 0.5 s for that, then answers Releasing -- distinct
from Busy, another user holding the channel.  kupd tries a Releasing
channel again for up to reattach_grace, whoever its last user was, and
gives up on a Busy one at once.  echo's "!lockhold" makes the module keep
the channel locked after the user left for as long as the test likes, far
beyond kupsim's park."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from gateway_helpers import LOCKHOLD, Kupd, StartKupd, unlock, wait_locked

from kupclient import Client, Kind, Lease
from kupd import errors
from kupd.channel import Device
from kupd.channel import Kind as ChannelKind
from kupd.config import Config
from kupd.testing import KupSim, channel_when_free, in_background, wait_until

WAITS = "attach waits for the module to let go"
#: kupd's reattach_grace when the test does not set it
REATTACH_GRACE = Config().reattach_grace
#: reattach_grace for the tests that wait for kupd to give up (waiting out
#: the default's 10 s showed nothing more)
SHORT_GRACE = 2.0


@pytest.fixture
def impatient(sim: KupSim, start_kupd: StartKupd) -> Kupd:
    """kupd giving up on a channel its module still holds after SHORT_GRACE."""
    return start_kupd(sim, "--reattach-grace", str(SHORT_GRACE))


@pytest.fixture
def impatient_client(impatient: Kupd) -> Iterator[Client]:
    with impatient.client() as c:
        yield c


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
    reattach = in_background(lambda: client.attach("echo", 20))
    # kupsim has parked the attach and answered Releasing at least once:
    # without the retry the client would have its FAILED_PRECONDITION by now
    wait_until(lambda: _waits(kupd, 20) == 1, what="kupd to retry the attach of channel 20")
    assert not reattach.done
    unlock(client)  # the module lets go; kupsim renews the channel
    lease = reattach.outcome(30)
    assert isinstance(lease, Lease), lease
    # a fresh conversation on the renewed channel
    assert client.lease_receive(lease.lease_id, timeout=10).kind == Kind.PASS
    reply = client.lease_exchange(lease.lease_id, b"again", timeout=10)
    assert reply.data == b"again"
    client.release(lease.lease_id)
    assert _waits(kupd, 20) == 1  # one log record per attach, not one per try


def test_reattach_gives_up_after_the_grace(sim: KupSim, impatient_client: Client) -> None:
    client = impatient_client
    _leave_locked(sim, client, 22)
    released = time.monotonic()
    gave_up = (
        r"device echo: channel 22 is still held by the module after its last user left "
        r"\(kupd waited [0-9.]+ s for it to let go\); retry later"
    )
    with pytest.raises(errors.Releasing, match=gave_up) as info:
        client.attach("echo", 22)
    assert isinstance(info.value, errors.Busy)  # what callers that retry catch
    assert time.monotonic() - released >= SHORT_GRACE  # it did keep trying
    unlock(client)
    # and the channel is not left attached to anybody: it can be taken
    wait_until(lambda: _free(client, 22), what="channel 22 free after the module let go")
    with client.open("echo").channel(22) as ch:
        assert ch.receive(timeout=10).kind == Kind.PASS


def test_a_grace_of_zero_gives_up_at_the_first_releasing(
    sim: KupSim, start_kupd: StartKupd
) -> None:
    """reattach_grace 0: the host's first Releasing is the answer, with no
    retry and no "waits" log record."""
    k = start_kupd(sim, "--reattach-grace", "0")
    with k.client() as client:
        _leave_locked(sim, client, 24)
        with pytest.raises(errors.Releasing, match=r"channel 24 .*\(kupd waited 0\.0 s"):
            client.attach("echo", 24)
        unlock(client)
    assert _waits(k, 24) == 0


def _free(client: Client, chan: int) -> bool:
    (dev,) = client.devices("echo")
    return dev.channels[chan].state == "free"


def test_channel_held_outside_kupd_is_busy_at_once(sim: KupSim, kupd: Kupd, client: Client) -> None:
    # a process using the device directly holds channel 30: another user,
    # so there is nothing to wait for
    with Device.open(sim.device_path("echo")) as dev, dev.channel(30):
        with pytest.raises(errors.Busy, match="30"):
            client.attach("echo", 30)
        with pytest.raises(errors.Busy):
            with client.open("echo").channel(30) as ch:
                ch.receive(timeout=10)
    assert _waits(kupd, 30) == 0


def test_channel_kupd_released_then_taken_directly_is_busy_at_once(
    sim: KupSim, kupd: Kupd, client: Client
) -> None:
    """kupd released channel 32 a moment ago and a process using the device
    directly has taken it since: that is another user, Busy at once -- not
    a wait of REATTACH_GRACE for a module that has long let go (what kupd
    did when it could not tell the two apart)."""
    with client.open("echo").channel(32) as ch:
        assert ch.receive(timeout=10).kind == Kind.PASS
    with Device.open(sim.device_path("echo")) as dev:
        direct = channel_when_free(dev, 32)
        try:
            start = time.monotonic()
            with pytest.raises(errors.Busy, match="held by another user") as info:
                client.attach("echo", 32)
            assert not isinstance(info.value, errors.Releasing)
            assert time.monotonic() - start < REATTACH_GRACE / 2
        finally:
            direct.close()
    assert _waits(kupd, 32) == 0


def test_kupd_waits_for_a_channel_a_direct_user_left_locked(
    sim: KupSim, kupd: Kupd, client: Client
) -> None:
    """A process using the device directly left channel 34 while echo's
    worker still holds it: nobody holds it but the module, so kupd waits for
    the module to let go, as for a channel it released itself."""
    with Device.open(sim.device_path("echo")) as dev:
        direct = channel_when_free(dev, 34)
        try:
            assert direct.receive(timeout=10).kind == ChannelKind.PASS
            direct.send(LOCKHOLD)
            wait_locked(sim, 34)
        finally:
            direct.close()
    attach = in_background(lambda: client.attach("echo", 34))
    wait_until(lambda: _waits(kupd, 34) == 1, what="kupd to retry the attach of channel 34")
    assert not attach.done
    unlock(client)
    lease = attach.outcome(30)
    assert isinstance(lease, Lease), lease
    assert client.lease_receive(lease.lease_id, timeout=10).kind == Kind.PASS
    client.release(lease.lease_id)


def _state(client: Client, chan: int) -> str:
    (dev,) = client.devices("echo")
    return dev.channels[chan].state


def test_a_channel_its_module_still_holds_shows_as_module(
    sim: KupSim, impatient_client: Client
) -> None:
    """A channel whose user left while its module's worker keeps it locked
    (echo "!lockhold": as a worker that exited or hangs between its receive
    and kupdev_unlock_channel would, for good) is neither free nor
    attachable: INFO says so (KUP_INFO_MODULE_HOLDS) and ListDevices shows
    it as "module" -- it used to show "free" while every attach of it
    failed -- until the module lets go."""
    client = impatient_client
    _leave_locked(sim, client, 36)
    with Device.open(sim.device_path("echo")) as dev:
        wait_until(
            lambda: 36 not in dev.info().attached, what="channel 36 without a user"
        )
        assert 36 in dev.info().module_holds
    wait_until(lambda: _state(client, 36) == "module", what="channel 36 shown as module")
    with pytest.raises(errors.Releasing, match="channel 36 is still held by the module"):
        client.attach("echo", 36)
    unlock(client)
    wait_until(lambda: _state(client, 36) == "free", what="channel 36 free once let go")
    with Device.open(sim.device_path("echo")) as dev:
        assert 36 not in dev.info().module_holds
