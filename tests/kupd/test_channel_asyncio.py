"""The gateway pattern: many channels multiplexed on one asyncio loop with
``loop.add_reader(ch.fileno(), ...)`` + ``ch.try_receive()`` (see the
kupd.channel module docstring), against a real kupsim + echo."""

from __future__ import annotations

import asyncio

from kupd.channel import Channel, Device, Kind, Message
from kupd.errors import NotYourTurn
from kupd.testing import KupSim

T = 10.0
CHANNELS = 32
ROUNDS = 10


class Mux:
    """One reader per channel; a waiting coroutine gets the next message."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.waiters: dict[int, asyncio.Future[Message]] = {}
        self.wakeups = 0

    def add(self, ch: Channel) -> None:
        self.loop.add_reader(ch.fileno(), self._readable, ch)

    def remove(self, ch: Channel) -> None:
        self.loop.remove_reader(ch.fileno())

    def _readable(self, ch: Channel) -> None:
        self.wakeups += 1
        try:
            msg = ch.try_receive()
        except NotYourTurn:
            return  # a late wake-up for a message already taken: harmless
        if msg is None:
            return  # spurious: the kernel still holds the turn
        fut = self.waiters.pop(ch.id)
        fut.set_result(msg)

    async def receive(self, ch: Channel) -> Message:
        fut = self.loop.create_future()
        self.waiters[ch.id] = fut
        # The message may already be there (readiness may have been consumed).
        self._readable(ch)
        return await asyncio.wait_for(fut, T)


def test_many_channels_on_one_loop(echo_sim: KupSim) -> None:
    async def main() -> tuple[int, int, int]:
        mux = Mux(asyncio.get_running_loop())
        with Device.open(echo_sim.device_path("echo")) as dev:
            chans = [dev.channel() for _ in range(CHANNELS)]
            try:
                for ch in chans:
                    mux.add(ch)

                async def converse(ch: Channel) -> int:
                    first = await mux.receive(ch)
                    assert first.kind is Kind.PASS
                    for i in range(ROUNDS):
                        data = b"%d:%d" % (ch.id, i)
                        ch.send(data)
                        reply = await mux.receive(ch)
                        assert reply.data == data and reply.seq == i + 2
                    return ROUNDS + 1

                got = await asyncio.gather(*(converse(ch) for ch in chans))
                # Every channel is idle now (we hold every turn): the loop must
                # go quiet instead of being woken by fds that stay readable.
                before = mux.wakeups
                await asyncio.sleep(0.3)
                idle_wakeups = mux.wakeups - before
            finally:
                for ch in chans:
                    mux.remove(ch)
                    ch.close()
        return sum(got), mux.wakeups, idle_wakeups

    messages, wakeups, idle_wakeups = asyncio.run(main())
    assert messages == CHANNELS * (ROUNDS + 1)
    print(f"{messages} messages, {wakeups} reader wake-ups, {idle_wakeups} while idle")
    # Readiness must be consumed: an fd that stays readable wakes the loop
    # endlessly.  At most one late wake-up per channel is allowed once idle.
    assert idle_wakeups <= CHANNELS, f"{idle_wakeups} wake-ups on idle channels: the loop spins"
