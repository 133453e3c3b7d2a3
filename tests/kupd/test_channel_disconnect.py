"""A module that ends its user's session (kupdev_disconnect, echo's
b"!kick[N]") and one that wakes its own receive (kupdev_wake_channel,
echo's b"!wake[N]"), seen through kupd's channel layer (kupd.channel)
against a real kupsim."""

from __future__ import annotations

import asyncio
import time

import pytest

from kupd.channel import Channel, Device, Kind, Message
from kupd.errors import PeerGone
from kupd.testing import KupSim, channel_when_free, wait_until

T = 10.0


def opened(ch: Channel) -> Message:
    first = ch.receive(timeout=T)
    assert first.kind is Kind.PASS and first.seq == 1
    return first


def test_disconnect_ends_a_blocked_receive_with_peergone(echo_sim: KupSim) -> None:
    with Device.open(echo_sim.device_path("echo")) as dev:
        with dev.channel(20) as ch:
            opened(ch)
            assert ch.exchange(b"hi", timeout=T).data == b"hi"
            ch.send(b"!kick200")  # never answered: the module disconnects us
            t0 = time.monotonic()
            with pytest.raises(PeerGone) as ei:
                ch.receive(timeout=30.0)  # blocked when the disconnect comes
            assert time.monotonic() - t0 < 20.0
            assert ei.value.code == 1010 and ei.value.seed_name == "EKU_PEER"
            assert "EKU_PEER" in str(ei.value)
            with pytest.raises(PeerGone):  # and so is everything after it
                ch.send(b"x")
        # the channel is free for the next user, served afresh
        with channel_when_free(dev, 20) as ch:
            opened(ch)
            assert ch.exchange(b"again", timeout=T).data == b"again"
    assert "echo: chan 20: disconnected the user (0)" in echo_sim.stderr()


def test_disconnect_reaches_an_event_loop(echo_sim: KupSim) -> None:
    """kupd's way of waiting: the channel's fd in the loop, then a
    non-blocking receive -- the fd turns readable, the receive raises."""

    async def run(ch: Channel) -> None:
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        loop.add_reader(ch.fileno(), ready.set)
        try:
            ch.send(b"!kick")
            deadline = loop.time() + 20.0
            while True:
                await asyncio.wait_for(ready.wait(), deadline - loop.time())
                ready.clear()
                try:
                    if ch.try_receive() is None:
                        continue
                except PeerGone:
                    return
                raise AssertionError("echo answered a !kick")
        finally:
            loop.remove_reader(ch.fileno())

    with Device.open(echo_sim.device_path("echo")) as dev, dev.channel(22) as ch:
        opened(ch)
        asyncio.run(run(ch))


WOKEN_WAITING = "echo: chan 24: receive woken (-125) while waiting"


def test_module_wake_of_its_receive_keeps_the_session(echo_sim: KupSim) -> None:
    with Device.open(echo_sim.device_path("echo")) as dev, dev.channel(24) as ch:
        opened(ch)
        assert ch.exchange(b"!wake50", timeout=T).data == b"!wake armed"
        # the module's receive waits for us, and is woken: echo logs it
        # before it waits again (a message sent before that would be the
        # one the receive gets, and the wake kept for the receive after)
        wait_until(
            lambda: WOKEN_WAITING in echo_sim.stderr(), what="echo's receive woken while waiting"
        )
        assert ch.exchange(b"x", timeout=T).data == b"!wake -125"
        assert ch.exchange(b"on", timeout=T).data == b"on"
    assert echo_sim.stderr().count(WOKEN_WAITING) == 1
    assert "after a message" not in echo_sim.stderr()
