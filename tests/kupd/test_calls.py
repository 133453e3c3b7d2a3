"""kupd.calls.CallPool by itself, on fake channels (a pipe for the wake-up,
the reply handed over when the test says): the per-tenant share
(max_pool_channels) bookkeeping under random traffic, timeouts, cancels,
module hold-ups and share changes; a dropped channel never coming back;
waiters that gave up leaving no trace.  The same pool behind a real kupd
and kupsim: tests/tenancy/test_tenancy_pool_share.py, test_gw_load.py."""

from __future__ import annotations

import asyncio
import collections
import os
import random

import pytest

from kupd import errors
from kupd.abi import KUP_E_PEER
from kupd.calls import CallPool
from kupd.channel import Kind, Message
from kupd.metrics import Metrics


class FakeChannel:
    """What the pool uses of a Channel.  ``mode``: "echo" answers inside
    try_exchange; "hold" keeps the reply owed until :meth:`answer`;
    "broken" fails the exchange with a protocol error."""

    def __init__(self, chan_id: int) -> None:
        self.id = chan_id
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        self.turn = True  # user space holds it
        self.owed: bytes | None = None
        self.pending: Message | None = None
        self.mode = "echo"
        self.closed = False

    def fileno(self) -> int:
        return self._r

    def _open(self) -> None:
        if self.closed:
            raise errors.InvalidArgument(f"channel {self.id} is closed")

    def my_turn(self) -> bool:
        self._open()
        return self.turn

    def try_receive(self) -> Message | None:
        self._open()
        try:
            os.read(self._r, 64)
        except BlockingIOError:
            pass
        if self.turn and self.pending is not None:
            msg, self.pending = self.pending, None
            return msg
        return None

    def state(self) -> int:
        """What libkup's kernproxy_state reads: "kicked" is a channel whose
        session the module ended (kupdev_disconnect) while it sat idle."""
        self._open()
        return KUP_E_PEER if self.mode == "kicked" else 0

    def try_exchange(self, data: bytes) -> Message | None:
        self._open()
        if self.mode == "kicked":
            raise errors.PeerGone(f"EKU_PEER: channel {self.id}: the peer ended the session")
        if self.mode == "broken":
            raise errors.ProtocolError(f"channel {self.id}: garbage")
        if self.mode == "hold":
            self.turn, self.owed = False, data
            return None
        return Message(data, Kind.DATA, 0)

    def answer(self) -> None:
        """The module hands the owed reply back."""
        if not self.turn and not self.closed:
            self.turn, self.pending = True, Message(self.owed or b"", Kind.DATA, 0)
            os.write(self._w, b"x")

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self._r)
            os.close(self._w)


async def _pool(n: int, **kw: float) -> tuple[CallPool, list[FakeChannel]]:
    pool = CallPool("dev", Metrics(), max_queued=100, size=n, **kw)
    chans = [FakeChannel(i) for i in range(n)]
    for ch in chans:
        pool.add(ch)  # type: ignore[arg-type]
    for _ in range(20):  # each settles: free once its (absent) opening message is taken
        await asyncio.sleep(0)
    assert len(pool._free) == n
    return pool, chans


def _check(pool: CallPool, where: object) -> None:
    """The share bookkeeping agrees with the channels, and nobody who could
    be served waits while a channel is free."""
    held = collections.Counter(pc.group for pc in pool.channels.values() if pc.group)
    assert dict(held) == pool._held, (where, dict(held), pool._held)
    assert not [pc for pc in pool._free if pc.group or pc.state != "free"], where
    # every caller with a queue is in its group, every group in the round
    callers = [c for cs in pool._groups.values() for c in cs]
    assert sorted(callers) == sorted(pool._queues), (where, callers, list(pool._queues))
    assert sorted(pool._rr) == sorted(pool._groups), (where, list(pool._rr))
    if pool._free:
        for caller, q in pool._queues.items():
            group = caller.split("\x1f", 1)[0]
            waiting = [f for f in q if not f.done()]
            assert not waiting or pool._at_share(group), (where, caller, pool._held)


@pytest.mark.parametrize("seed", range(6))
def test_share_bookkeeping_under_random_traffic(seed: int) -> None:
    async def main() -> None:
        rnd = random.Random(seed)
        pool, chans = await _pool(rnd.randint(1, 4), quarantine=0.05)
        shares = {"tenant:a": rnd.randint(0, 2), "tenant:b": rnd.randint(0, 2), "tenant:c": 0}
        tasks: list[asyncio.Task[None]] = []

        async def call(group: str, caller: str) -> None:
            key = f"{group}\x1f{caller}"
            timeout = rnd.choice([0.01, 0.03, 0.2])
            try:
                await pool.call(b"x", timeout, key, 100, None, shares[group])
            except errors.KupError:
                pass

        for step in range(150):
            r = rnd.random()
            if r < 0.5:
                group = rnd.choice(list(shares))
                tasks.append(asyncio.ensure_future(call(group, rnd.choice("xyz"))))
            elif r < 0.6:
                rnd.choice(chans).mode = rnd.choice(["echo", "hold", "hold"])
            elif r < 0.75:
                for ch in chans:
                    if rnd.random() < 0.5:
                        ch.answer()
            elif r < 0.8 and tasks:
                rnd.choice(tasks).cancel()
            elif r < 0.85:
                shares[rnd.choice(["tenant:a", "tenant:b"])] = rnd.randint(0, 2)
                if rnd.random() < 0.5:
                    pool.set_shares(shares)  # a reload
            await asyncio.sleep(rnd.choice([0, 0, 0.005, 0.02]))
            _check(pool, (seed, step))
        for ch in chans:
            ch.mode = "echo"
        for _ in range(10):
            for ch in chans:
                ch.answer()
            await asyncio.sleep(0.03)
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
        _check(pool, (seed, "end"))
        # everything came back: every channel free, nothing held or queued
        assert pool._held == {} and pool.queued == 0
        assert all(not q for q in pool._queues.values())
        pool.close()

    asyncio.run(main())


def test_a_broken_channel_leaves_the_pool_for_good() -> None:
    async def main() -> None:
        pool, chans = await _pool(2)
        chans[0].mode = "broken"
        outcomes = []
        for i in range(6):
            try:
                msg, chan = await pool.call(f"c{i}".encode(), 1.0, "k", 100)
                outcomes.append((chan, msg.data))
            except errors.ProtocolError:
                outcomes.append((-1, b""))
        # at most the first Call on channel 0 fails; the rest go to channel 1
        assert outcomes.count((-1, b"")) == 1, outcomes
        assert [c for c, _ in outcomes if c != -1] == [1] * 5, outcomes
        assert 0 not in pool.channels and chans[0].closed
        pool.close()

    asyncio.run(main())


def test_a_channel_the_module_disconnected_while_idle_is_dropped_not_failed() -> None:
    """kupdev_disconnect of an idle pool channel wakes nobody: the next Call
    to take it found out by failing with PeerGone (ABORTED), though it sent
    nothing.  Now the Call drops that channel and takes another, through
    the fast path and through the queue alike."""

    async def main() -> None:
        pool, chans = await _pool(3)
        chans[0].mode = chans[1].mode = "kicked"
        for i in range(4):  # the first meets both dead channels on its way
            msg, chan = await pool.call(f"c{i}".encode(), 1.0, "k", 100)
            assert (chan, msg.data) == (2, f"c{i}".encode())
        assert sorted(pool.channels) == [2] and chans[0].closed and chans[1].closed
        pool.close()

    asyncio.run(main())


def test_waiters_that_gave_up_leave_the_queue() -> None:
    """A tenant at its share whose Calls keep timing out in the queue:
    each expired waiter leaves at once, not when the tenant next gets a
    turn (which its quarantined channels may delay for call_quarantine)."""

    async def main() -> None:
        pool, chans = await _pool(2, quarantine=60.0)
        chans[0].mode = chans[1].mode = "hold"
        with pytest.raises(errors.DeadlineExceeded):
            await pool.call(b"x", 0.01, "tenant:a\x1fk", 100, None, 1)  # quarantines one
        for _ in range(50):
            with pytest.raises(errors.DeadlineExceeded, match="max_pool_channels=1"):
                await pool.call(b"x", 0.001, "tenant:a\x1fk", 100, None, 1)
        assert sum(len(q) for q in pool._queues.values()) == 0
        assert pool.queued == 0
        # Calls under a new caller key each (a tenant at its share, and one
        # waiting for a busy pool) leave no key behind either
        for i in range(50):
            with pytest.raises(errors.DeadlineExceeded):
                await pool.call(b"x", 0.001, f"tenant:a\x1fk{i}", 100, None, 1)
        held = asyncio.ensure_future(pool.call(b"y", 60.0, "tenant:c\x1fk", 100))
        await asyncio.sleep(0.01)  # holds the last free channel
        for i in range(50):
            with pytest.raises(errors.DeadlineExceeded):
                await pool.call(b"x", 0.001, f"tenant:d\x1fk{i}", 100)
        assert (pool._queues, pool._groups, list(pool._rr)) == ({}, {}, [])
        chans[1].answer()
        assert (await held)[0].data == b"y"
        # the other channel still serves another tenant at once
        chans[1].mode = "echo"
        msg, chan = await pool.call(b"other", 1.0, "tenant:b\x1fk", 100, None, 1)
        assert (msg.data, chan) == (b"other", 1)
        pool.close()
        for ch in chans:
            ch.close()

    asyncio.run(main())


def test_a_close_right_after_a_timeout_still_settles_the_channel() -> None:
    """A Call that times out leaves its channel quarantined, with its
    tenant's slot, to a settle task it spawns.  A close() in the same loop
    iteration (the device went away, kupd's drain) cancels that task
    before its first step, which then runs none of its code: the slot
    is still given back and the channel closed."""

    async def main() -> None:
        pool = CallPool("dev", Metrics(), max_queued=10, size=1, quarantine=60.0)
        ch = FakeChannel(0)
        pool.add(ch)  # type: ignore[arg-type]
        for _ in range(10):
            await asyncio.sleep(0)
        assert len(pool._free) == 1
        ch.mode = "hold"  # the module does not answer in time
        loop = asyncio.get_running_loop()
        looks = 0
        real = ch.try_receive

        def try_receive() -> Message | None:
            # the second look is the one the Call's deadline woke: the
            # device goes away in the very next callback
            nonlocal looks
            looks += 1
            if looks == 2:
                loop.call_soon(pool.close)
            return real()

        ch.try_receive = try_receive  # type: ignore[method-assign]
        released: list[str] = []
        held = [lambda: released.append("slot")]
        with pytest.raises(errors.DeadlineExceeded):
            await pool.call(b"x", 0.05, "k", 100, held)
        assert held == [], "the quarantined channel took the tenant's slot"
        for _ in range(20):
            await asyncio.sleep(0.01)
        assert pool.closed and looks >= 2
        assert (released, ch.closed) == (["slot"], True), pool.state_of(0)

    asyncio.run(main())


def test_a_channel_granted_at_the_calls_deadline_is_not_used() -> None:
    """A queued Call whose channel comes free only as its deadline passes
    (the loop was busy meanwhile) is DeadlineExceeded with nothing sent:
    sending then would only have left the channel quarantined, owing a
    reply nobody waits for."""

    async def main() -> None:
        import time

        pool, (ch,) = await _pool(1, quarantine=60.0)
        ch.mode = "hold"
        pc = pool._free.popleft()  # busy with a Call of its own
        pc.state = "busy"
        loop = asyncio.get_running_loop()

        def back_then_busy() -> None:
            pool._put_back(pc)  # granted to the queued Call ...
            time.sleep(0.06)  # ... which resumes past its deadline

        loop.call_later(0.02, back_then_busy)
        with pytest.raises(errors.DeadlineExceeded, match="nothing was sent"):
            await pool.call(b"b", 0.05, "k2", 100)
        assert ch.owed is None and pool.state_of(0) == "free"
        ch.mode = "echo"
        assert (await pool.call(b"c", 1.0, "k3", 100))[0].data == b"c"
        pool.close()
        ch.close()

    asyncio.run(main())
