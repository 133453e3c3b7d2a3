"""Channel.exchange / Channel.try_exchange against a real kupsim echo.

exchange(data, timeout) is send() then receive() as one call into the
extension; try_exchange(data) is send() then a bounded spin, None when the
reply has not come.  What these tests pin down is that the one-call forms
keep the two-call semantics exactly: a refused send sends nothing (the turn
stays here, the next message goes through unchanged), a failed wait leaves
the data sent and the reply owed to a later receive, Busy / closed /
Shutdown / PeerGone as the existing methods.  See tests/kupd/test_channel.py
for echo's behaviour (DELAY: answered after 300 ms; HOLD: never answered).
"""

from __future__ import annotations

import select
import signal
import threading
import time

import pytest

from kupd.channel import Channel, Device, Kind, Message
from kupd.errors import (
    Busy,
    DeadlineExceeded,
    InvalidArgument,
    NotReady,
    NotYourTurn,
    Shutdown,
    TooBig,
)
from kupd.testing import KupSim, echo_lock_holds, kupsim, wait_until

T = 10.0  # generous bound on any single wait that should succeed
DELAY = b"!delay"
HOLD = b"!hold"
#: echo keeps the channel locked (the kernel holding the turn) until a
#: "!lockfree" on another channel: a window the test closes itself
LOCKHOLD = b"!lockhold60000"


def wait_locked(sim: KupSim, chan: int) -> None:
    """Until echo holds ``chan`` locked (a "!lockfree" before that would not
    end the hold).  One hold per channel per kupsim."""
    wait_until(lambda: echo_lock_holds(sim, chan) > 0, 30, f"echo to hold channel {chan} locked")


def unlock(dev: Device) -> None:
    """End echo's lock holds: "!lockfree" on a channel of its own."""
    with dev.channel() as other:
        opened(other)
        assert other.exchange(b"!lockfree", T).data.lower() == b"!lockfree"


def opened(ch: Channel) -> None:
    first = ch.receive(timeout=T)
    assert first.kind is Kind.PASS and first.seq == 1


def test_exchange_is_send_then_receive(echo_sim: KupSim) -> None:
    with Device.open(echo_sim.device_path("echo")) as dev, dev.channel(1) as ch:
        opened(ch)
        m = ch.exchange(b"hello", T)
        assert type(m) is Message
        assert m == Message(b"HELLO", Kind.DATA, 2)  # odd channel: upper-cased
        # no timeout (forever), an int timeout, any buffer
        assert ch.exchange(bytearray(b"abc")) == Message(b"ABC", Kind.DATA, 3)
        assert ch.exchange(memoryview(b"xyz"), 5).data == b"XYZ"
        assert ch.exchange(b"").data == b""  # empty DATA is answered with empty DATA
        big = bytes(range(256)) * (ch.max_msg // 256)
        assert ch.exchange(big, T).data == big.upper()
        # and the two-call form still follows on from it
        ch.send(b"next")
        assert ch.receive(timeout=T) == Message(b"NEXT", Kind.DATA, 7)


def test_exchange_arguments_as_a_def_would_take_them(echo_sim: KupSim) -> None:
    """exchange is the extension's method bound per channel (no Python frame),
    but takes its arguments like ``def exchange(self, data, timeout=None)``."""
    with Device.open(echo_sim.device_path("echo")) as dev, dev.channel(0) as ch:
        opened(ch)
        assert ch.exchange(b"kw", timeout=T).data == b"kw"
        assert ch.exchange(data=b"kw2", timeout=None).data == b"kw2"
        assert ch.exchange(timeout=T, data=b"kw3").data == b"kw3"
        with pytest.raises(TypeError, match="unexpected keyword argument 'deadline'"):
            ch.exchange(b"x", deadline=T)  # type: ignore[call-arg]
        with pytest.raises(TypeError, match="multiple values for argument 'data'"):
            ch.exchange(b"x", data=b"y")  # type: ignore[misc]
        with pytest.raises(TypeError, match="missing required argument 'data'"):
            ch.exchange(timeout=T)  # type: ignore[call-arg]
        with pytest.raises(TypeError, match="at most 2 arguments"):
            ch.exchange(b"x", T, T)  # type: ignore[call-arg]
        with pytest.raises(TypeError):
            ch.try_exchange("text")  # type: ignore[arg-type]
        # none of those sent anything
        assert ch.exchange(b"last", T).seq == 5


def test_receive_bound_to_the_extension(echo_sim: KupSim) -> None:
    """receive / try_receive are the extension's methods too (Message built
    in C): the same arguments, results and errors as before."""
    with Device.open(echo_sim.device_path("echo")) as dev, dev.channel(0) as ch:
        first = ch.receive(timeout=T)
        assert type(first) is Message and first == Message(b"", Kind.PASS, 1)
        ch.send(b"a")
        assert ch.receive(T) == Message(b"a", Kind.DATA, 2)
        ch.send(b"b")
        assert ch.receive() == Message(b"b", Kind.DATA, 3)
        ch.send(DELAY)
        with pytest.raises(NotReady):
            ch.receive(timeout=0)
        assert ch.try_receive() is None
        with pytest.raises(DeadlineExceeded, match="no message within 10 ms"):
            ch.receive(0.01)
        for bad in (-1, float("nan"), True, "5"):
            with pytest.raises(InvalidArgument, match="timeout must be None or"):
                ch.receive(bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="timeout=None"):
            ch.receive(deadline=T)  # type: ignore[call-arg]
        with pytest.raises(TypeError, match="timeout=None"):
            ch.receive(T, T)  # type: ignore[call-arg]
        assert ch.receive(timeout=float("inf")) == Message(DELAY, Kind.DATA, 4)
        with pytest.raises(NotYourTurn):
            ch.receive(T)
        with pytest.raises(NotYourTurn):
            ch.try_receive()
        ch.send(b"c")
        m = None
        deadline = time.monotonic() + T
        while m is None:
            assert time.monotonic() < deadline
            m = ch.try_receive()
        assert m == Message(b"c", Kind.DATA, 5)


def test_exchange_message_is_a_real_message(echo_sim: KupSim) -> None:
    """The Message built in C is the dataclass: frozen, equal, hashable, repr."""
    with Device.open(echo_sim.device_path("echo")) as dev, dev.channel(0) as ch:
        opened(ch)
        m = ch.exchange(b"m", T)
        assert m == Message(b"m", Kind.DATA, 2) and hash(m) == hash(Message(b"m", Kind.DATA, 2))
        assert m.kind is Kind.DATA
        assert repr(m) == "Message(data=b'm', kind=<Kind.DATA: 1>, seq=2)"
        with pytest.raises(AttributeError):
            m.data = b"other"  # type: ignore[misc]


def test_refused_exchange_sends_nothing(echo_sim: KupSim) -> None:
    with Device.open(echo_sim.device_path("echo")) as dev, dev.channel(0) as ch:
        opened(ch)
        with pytest.raises(TooBig, match="exchange: send of"):
            ch.exchange(b"x" * (ch.max_msg + 1), T)
        with pytest.raises(TooBig, match="try_exchange: send of"):
            ch.try_exchange(b"x" * (ch.max_msg + 1))
        for bad in (-1, -0.5, float("nan"), True, "1", [1]):
            with pytest.raises(InvalidArgument, match="timeout must be None or"):
                ch.exchange(b"x", bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            ch.exchange(12345)  # type: ignore[arg-type]
        # nothing went out: the turn is still ours and the sequence continues
        assert ch.my_turn()
        assert ch.exchange(b"after", T) == Message(b"after", Kind.DATA, 2)


def test_exchange_when_not_my_turn(echo_sim: KupSim) -> None:
    with Device.open(echo_sim.device_path("echo")) as dev, dev.channel(0) as ch:
        opened(ch)
        ch.send(DELAY)  # the kernel holds the turn for 300 ms
        with pytest.raises(NotYourTurn):
            ch.try_exchange(b"two")
        with pytest.raises(NotYourTurn):
            ch.exchange(b"three", T)
        assert ch.receive(timeout=T) == Message(DELAY, Kind.DATA, 2)  # only DELAY went out
        assert ch.exchange(b"four", T).seq == 3


def test_exchange_deadline_leaves_the_reply_owed(echo_sim: KupSim) -> None:
    with Device.open(echo_sim.device_path("echo")) as dev, dev.channel(0) as ch:
        opened(ch)
        with pytest.raises(DeadlineExceeded, match="reply is owed to a later receive"):
            ch.exchange(LOCKHOLD, 0.01)  # held until unlock(): the checks cannot be late
        assert not ch.my_turn()
        with pytest.raises(NotYourTurn):  # the data was sent: no second send
            ch.send(b"x")
        wait_locked(echo_sim, 0)
        unlock(dev)
        assert ch.receive(timeout=T) == Message(LOCKHOLD, Kind.DATA, 2)
        # timeout=0: send, look once, NotReady
        with pytest.raises(NotReady, match="reply is owed"):
            ch.exchange(DELAY, 0)
        assert ch.receive(timeout=T) == Message(DELAY, Kind.DATA, 3)
        assert ch.exchange(b"ok", T).seq == 4


def test_try_exchange_none_then_receive(echo_sim: KupSim) -> None:
    with Device.open(echo_sim.device_path("echo")) as dev, dev.channel(0) as ch:
        opened(ch)
        # the reply comes only once this test unlocks echo: a try_exchange
        # that waited for it would return it (after echo's 60 s bound), not
        # None -- no wall-clock bound needed to tell
        assert ch.try_exchange(LOCKHOLD) is None
        assert ch.try_receive() is None
        wait_locked(echo_sim, 0)
        unlock(dev)
        assert ch.receive(timeout=T) == Message(LOCKHOLD, Kind.DATA, 2)
        # a fast reply: mostly caught by the spin; when not, it is owed
        for i in range(200):
            data = b"fast %d" % i
            m = ch.try_exchange(data)
            if m is None:
                m = ch.receive(timeout=T)
            assert m == Message(data, Kind.DATA, 3 + i)


def test_try_exchange_in_poll_mode(echo_sim: KupSim) -> None:
    """The gateway pattern: the fd is registered; try_exchange, and on None
    wait for the fd and try_receive."""
    with Device.open(echo_sim.device_path("echo")) as dev, dev.channel(0) as ch:
        fd = ch.fileno()
        r, _, _ = select.select([fd], [], [], T)
        assert r == [fd]
        assert ch.try_receive() is not None  # the opening PASS
        for i, data in enumerate([b"a", DELAY, b"b" * 100, DELAY, b"c"]):
            m = ch.try_exchange(data)
            deadline = time.monotonic() + T
            while m is None:
                assert time.monotonic() < deadline, "no reply"
                select.select([fd], [], [], T)
                m = ch.try_receive()
            assert m == Message(data, Kind.DATA, 2 + i)


def test_try_exchange_poll_mode_wakes_on_every_miss(echo_sim: KupSim) -> None:
    """try_exchange sends with KP_SPIN_NEXT: in poll mode the kernel is not
    asked to write the fd while the spin looks, only once it has missed.
    Every miss must still make the fd readable (the fd alone, no
    try_receive polling), after hits, after plain sends and after
    exchange(), in any order."""
    with Device.open(echo_sim.device_path("echo")) as dev, dev.channel(0) as ch:
        fd = ch.fileno()
        assert select.select([fd], [], [], T)[0] == [fd]
        assert ch.try_receive() is not None  # the opening PASS
        seq = 2

        def miss() -> None:
            nonlocal seq
            assert ch.try_exchange(DELAY) is None  # 300 ms: always a miss
            assert select.select([fd], [], [], T)[0] == [fd], "wake-up lost"
            assert ch.try_receive() == Message(DELAY, Kind.DATA, seq)
            seq += 1

        def fast(i: int) -> None:
            nonlocal seq
            data = b"fast %d" % i
            m = ch.try_exchange(data)
            while m is None:  # a miss: the fd must say so
                assert select.select([fd], [], [], T)[0] == [fd], "wake-up lost"
                m = ch.try_receive()
            assert m == Message(data, Kind.DATA, seq)
            seq += 1

        miss()
        for i in range(50):
            fast(i)
        miss()
        # a plain send after a try_exchange hit asks for the wake-up again
        fast(100)
        ch.send(DELAY)
        assert select.select([fd], [], [], T)[0] == [fd], "wake-up lost after send"
        assert ch.try_receive() == Message(DELAY, Kind.DATA, seq)
        seq += 1
        # exchange() after a hit, then a miss again
        fast(101)
        assert ch.exchange(b"x", T) == Message(b"x", Kind.DATA, seq)
        seq += 1
        miss()
        for i in range(20):
            fast(200 + i)
            miss()


def test_exchange_busy_in_another_thread(echo_sim: KupSim) -> None:
    """The other thread's exchange is held by echo ("!lockhold") until the
    Busy attempts are done: with a 300 ms "!delay" a loaded machine could
    let it finish first (then the attempts were not Busy at all)."""
    with Device.open(echo_sim.device_path("echo")) as dev, dev.channel(0) as ch:
        opened(ch)
        got: list[Message] = []
        started = threading.Event()

        def slow() -> None:
            started.set()
            got.append(ch.exchange(LOCKHOLD, 60))

        t = threading.Thread(target=slow)
        t.start()
        assert started.wait(T)
        deadline = time.monotonic() + T
        while ch.my_turn():  # until the DELAY is out and the thread waits
            assert time.monotonic() < deadline
            time.sleep(0.001)
        with pytest.raises(Busy, match=r"exchange on channel 0.*another thread"):
            ch.exchange(b"x", T)
        with pytest.raises(Busy):
            ch.try_exchange(b"x")
        wait_locked(echo_sim, 0)
        unlock(dev)
        t.join(T)
        assert got == [Message(LOCKHOLD, Kind.DATA, 2)]
        assert ch.exchange(b"y", T).seq == 3  # the Busy attempts sent nothing


def test_exchange_closed(echo_sim: KupSim) -> None:
    with Device.open(echo_sim.device_path("echo")) as dev:
        ch = dev.channel(0)
        opened(ch)
        ch.close()
        with pytest.raises(InvalidArgument, match="closed"):
            ch.exchange(b"x", T)
        with pytest.raises(InvalidArgument, match="closed"):
            ch.try_exchange(b"x")


def test_exchange_closed_by_another_thread_while_waiting(echo_sim: KupSim) -> None:
    with Device.open(echo_sim.device_path("echo")) as dev:
        ch = dev.channel(0)
        opened(ch)
        outcome: list[BaseException] = []

        def wait() -> None:
            try:
                ch.exchange(HOLD)  # never answered
            except BaseException as e:
                outcome.append(e)

        t = threading.Thread(target=wait)
        t.start()
        deadline = time.monotonic() + T
        while ch.my_turn():
            assert time.monotonic() < deadline
            time.sleep(0.001)
        ch.close()
        t.join(T)
        assert not t.is_alive()
        assert len(outcome) == 1 and isinstance(outcome[0], InvalidArgument), outcome
        assert "closed by another thread" in str(outcome[0])


def test_exchange_shutdown_while_waiting() -> None:
    with kupsim("echo") as sim, Device.open(sim.device_path("echo")) as dev:
        with dev.channel(0) as ch:
            opened(ch)
            outcome: list[BaseException] = []
            waiting = threading.Event()

            def wait() -> None:
                try:
                    waiting.set()
                    ch.exchange(HOLD)
                except BaseException as e:
                    outcome.append(e)

            t = threading.Thread(target=wait)
            t.start()
            assert waiting.wait(T)
            deadline = time.monotonic() + T
            while ch.my_turn():
                assert time.monotonic() < deadline
                time.sleep(0.001)
            sim.signal(signal.SIGTERM)
            t.join(30)
            assert not t.is_alive()
            assert len(outcome) == 1 and isinstance(outcome[0], Shutdown), outcome
            with pytest.raises(Shutdown):
                ch.exchange(b"x", T)
            with pytest.raises(Shutdown):
                ch.try_exchange(b"x")


def test_set_message_type_checks_the_class(echo_sim: KupSim) -> None:
    """The extension fills Message's slots at fixed offsets: it only accepts
    a class whose data/kind/seq are its own writable object slots, and a
    refused class leaves the registered one in place."""
    from kupd import _kupchan

    class Plain:
        data = b""
        kind = 0
        seq = 0

    class Slotted:
        __slots__ = ("data", "kind")  # no seq

    for bad in (Plain, Slotted):
        with pytest.raises((TypeError, AttributeError)):
            _kupchan.set_message_type(bad, {})  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        _kupchan.set_message_type(Message, [])  # type: ignore[arg-type]
    with Device.open(echo_sim.device_path("echo")) as dev, dev.channel(0) as ch:
        opened(ch)
        assert ch.exchange(b"still", T) == Message(b"still", Kind.DATA, 2)

