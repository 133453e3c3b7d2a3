"""kupd.channel against a real kupsim process running the echo module.

Echo's behaviour (kmod/examples/echo/echo.c): on attach it hands the turn to
user space with a PASS; then it answers every DATA message with one DATA of
the same length -- unchanged on even channels, a-z upper-cased on odd ones --
a PASS with a PASS; a message starting with b"!delay" only after 300 ms (the
kernel holds the turn meanwhile), one starting with b"!hold" never (the
kernel keeps the turn until the user leaves or the device unloads).
"""

from __future__ import annotations

import os
import select
import sys
import time

import pytest

from kupd import abi
from kupd.channel import Channel, Device, DeviceInfo, Kind, Message
from kupd.errors import (
    Busy,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    NotReady,
    NotYourTurn,
    TooBig,
)
from kupd.testing import KupSim, channel_when_free, kupsim

T = 10.0  # generous bound on any single wait that should succeed


def opened(ch: Channel) -> Message:
    """Take echo's opening hand-over on a fresh channel."""
    first = ch.receive(timeout=T)
    assert first.kind is Kind.PASS and first.data == b"" and first.seq == 1
    return first


def roundtrip(ch: Channel, data: bytes) -> Message:
    ch.send(data)
    return ch.receive(timeout=T)


def echoed(chan_id: int, data: bytes) -> bytes:
    """What echo answers on channel chan_id."""
    return data.upper() if chan_id % 2 else data


DELAY = b"!delay"  # echo holds the turn 300 ms, then answers
HOLD = b"!hold"  # echo keeps the turn until the user leaves or the device unloads


def test_open_missing_device_is_notfound(echo_sim: KupSim) -> None:
    with pytest.raises(NotFound, match="nope"):
        Device.open(echo_sim.device_path("nope"))


def test_open_by_name_finds_kupsim_via_env(
    echo_sim: KupSim, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bare name: libkup tries the kernel device (/dev/kup/echo), then the
    kupsim socket in $KUPSIM_DIR."""
    monkeypatch.setenv("KUPSIM_DIR", str(echo_sim.rundir))
    with Device.open("echo") as dev, dev.channel(0) as ch:
        assert dev.name == "echo" and dev.info().name == "echo"
        opened(ch)
        assert roundtrip(ch, b"by name").data == b"by name"
    monkeypatch.setenv("KUPSIM_DIR", str(echo_sim.rundir / "elsewhere"))
    with pytest.raises(NotFound):
        Device.open("echo")


def test_open_bad_names() -> None:
    for bad in ("", "a\x00b"):
        with pytest.raises(InvalidArgument, match="empty name or NUL"):
            Device.open(bad)
    with pytest.raises(NotFound, match="nonexistent"):
        Device.open("/nonexistent/dir/echo.sock")
    with pytest.raises(NotFound):
        Device.open("/nonexistent/\u00e9.sock")  # non-ASCII is a name like any other
    with pytest.raises(InvalidArgument, match="device name"):
        Device.open(b"echo")  # type: ignore[arg-type]


def test_info(echo_sim: KupSim) -> None:
    with Device.open(echo_sim.device_path("echo")) as dev:
        info = dev.info()
    assert isinstance(info, DeviceInfo)
    assert info.name == "echo"
    assert info.abi_version == abi.KUP_ABI_VERSION
    assert info.page_size > 0 and info.pages > 0
    assert info.max_msg == info.page_size * info.pages
    assert 0 < info.announced <= info.chan_count <= abi.KUP_MAX_CHANNELS
    assert info.attached == ()
    assert not info.shutting_down


def test_one_channel_blocking(echo_sim: KupSim) -> None:
    with Device.open(echo_sim.device_path("echo")) as dev, dev.channel(0) as ch:
        assert 0 <= ch.id < dev.info().chan_count
        assert dev.info().attached == (ch.id,)
        opened(ch)
        assert ch.my_turn()
        for i, text in enumerate([b"hello", b"world", b"\x00\xff binary \x00"]):
            reply = roundtrip(ch, text)
            assert reply == Message(text, Kind.DATA, 2 + i)
        ch.pass_()
        assert ch.receive(timeout=T).kind is Kind.PASS
    with Device.open(echo_sim.device_path("echo")) as dev:
        assert dev.info().attached == ()


def test_send_accepts_any_buffer(echo_sim: KupSim) -> None:
    with Device.open(echo_sim.device_path("echo")) as dev, dev.channel(0) as ch:
        opened(ch)
        assert roundtrip(ch, bytearray(b"bytearray")).data == b"bytearray"
        assert roundtrip(ch, memoryview(b"xxmemoryviewxx")[2:-2]).data == b"memoryview"
        with pytest.raises(TypeError):
            ch.send("a str is not a buffer")  # type: ignore[arg-type]
        assert ch.my_turn()  # nothing was sent


def test_nonblocking_receive_before_kernel_passes(echo_sim: KupSim) -> None:
    with Device.open(echo_sim.device_path("echo")) as dev, dev.channel(0) as ch:
        opened(ch)
        ch.send(HOLD)
        assert not ch.my_turn()
        with pytest.raises(NotReady, match="kernel holds the turn"):
            ch.receive(timeout=0)
        assert ch.try_receive() is None
        assert ch.try_receive() is None


def test_nonblocking_receive_then_the_message(echo_sim: KupSim) -> None:
    with Device.open(echo_sim.device_path("echo")) as dev, dev.channel(0) as ch:
        opened(ch)
        ch.send(DELAY)
        seen_not_ready = False
        while True:  # echo answers after 300 ms; poll until it does
            msg = ch.try_receive()
            if msg is not None:
                break
            seen_not_ready = True
            select.select([], [], [], 0.01)
        assert msg == Message(DELAY, Kind.DATA, 2)
        assert seen_not_ready


def test_try_receive_after_fileno_readable(echo_sim: KupSim) -> None:
    with Device.open(echo_sim.device_path("echo")) as dev, dev.channel(0) as ch:
        fd = ch.fileno()
        r, _, _ = select.select([fd], [], [], T)
        assert r == [fd], "fileno never polled readable for the opening PASS"
        first = ch.try_receive()
        assert first == Message(b"", Kind.PASS, 1)
        ch.send(b"polled")
        msg = None
        for _ in range(1000):  # readable is a hint: the page is the truth
            r, _, _ = select.select([fd], [], [], T)
            assert r == [fd], "fileno never polled readable for the reply"
            msg = ch.try_receive()
            if msg is not None:
                break
        assert msg == Message(b"polled", Kind.DATA, 2)


def test_fileno_is_quiet_after_try_receive(echo_sim: KupSim) -> None:
    """The asyncio pattern (add_reader + try_receive) must not spin: once the
    message is taken and this side holds the turn, the fd is not readable."""
    with Device.open(echo_sim.device_path("echo")) as dev, dev.channel(0) as ch:
        fd = ch.fileno()
        for i in range(3):
            msg = None
            for _ in range(1000):
                r, _, _ = select.select([fd], [], [], T)
                assert r == [fd], "fileno never polled readable"
                msg = ch.try_receive()
                if msg is not None:
                    break
            assert msg is not None and msg.seq == i + 1
            r, _, _ = select.select([fd], [], [], 0)
            assert r == [], "fd still readable after the message was taken: pollers would spin"
            ch.send(b"x")


def test_late_wakeup_while_holding_turn_is_consumed(echo_sim: KupSim) -> None:
    """The kernel's wake-up for a hand-over can land after the user already
    took the message (kernel preempted between storing the turn and writing
    the eventfd).  The documented reaction -- try_receive() when the fd
    polls readable -- must consume that readiness even though it reports
    NotYourTurn, or an event loop spins until this side hands over again.
    The late wake-up is simulated by writing the (kupsim eventfd) wake fd."""
    with Device.open(echo_sim.device_path("echo")) as dev, dev.channel(0) as ch:
        fd = ch.fileno()
        opened(ch)
        assert roundtrip(ch, b"x").data == b"x"  # we hold the turn, message taken
        os.write(fd, (1).to_bytes(8, "little"))  # the late wake-up
        r, _, _ = select.select([fd], [], [], 0)
        assert r == [fd]
        with pytest.raises(NotYourTurn):
            ch.try_receive()
        r, _, _ = select.select([fd], [], [], 0)
        assert r == [], "readiness not consumed: an event loop would spin"


def test_receive_deadline(echo_sim: KupSim) -> None:
    with Device.open(echo_sim.device_path("echo")) as dev, dev.channel(0) as ch:
        opened(ch)
        ch.send(HOLD)
        expected = f"channel {ch.id} of device .*: no message within 200 ms"
        with pytest.raises(DeadlineExceeded, match=expected):
            ch.receive(timeout=0.2)
        with pytest.raises(DeadlineExceeded):  # a deadline leaves the channel as it was
            ch.receive(timeout=0.001)


def test_late_reply_after_deadline(echo_sim: KupSim) -> None:
    with Device.open(echo_sim.device_path("echo")) as dev, dev.channel(0) as ch:
        opened(ch)
        for _ in range(5):  # echo answers after 300 ms: a 20 ms deadline passes first
            ch.send(DELAY)
            try:
                reply = ch.receive(timeout=0.02)
            except DeadlineExceeded:
                reply = ch.receive(timeout=T)  # the late reply is still taken
                assert reply == Message(DELAY, Kind.DATA, reply.seq)
                break
            assert reply.data == DELAY  # overloaded machine: the reply won; retry
        else:
            pytest.fail("the 20 ms deadline never passed before a 300 ms reply")
        assert roundtrip(ch, b"after").data == b"after"


def test_send_when_not_my_turn(echo_sim: KupSim) -> None:
    with Device.open(echo_sim.device_path("echo")) as dev, dev.channel(0) as ch:
        opened(ch)
        ch.send(HOLD)
        with pytest.raises(NotYourTurn, match="send of 5 bytes on channel 0"):
            ch.send(b"again")
        with pytest.raises(NotYourTurn):
            ch.pass_()
        assert not ch.my_turn()


def _wait_unread(ch: Channel) -> Kind | None:
    deadline = time.monotonic() + T
    while (kind := ch.unread()) is None:
        assert time.monotonic() < deadline, "the kernel's message never came"
        time.sleep(0.001)
    return kind


def test_unread_and_keep_unread(echo_sim: KupSim) -> None:
    """unread() tells what the kernel handed over and nobody received yet.
    A send over an unread DATA message drops it (libkup's rule: the caller
    answers without reading); keep_unread() makes that NotYourTurn, the
    message kept for a receive.  An unread PASS is dropped either way."""
    with Device.open(echo_sim.device_path("echo")) as dev, dev.channel(0) as ch:
        assert _wait_unread(ch) is Kind.PASS
        opened(ch)
        assert ch.unread() is None
        ch.send(b"one")
        assert _wait_unread(ch) is Kind.DATA
        ch.send(b"two")  # drops "one"'s reply
        assert ch.receive(timeout=T) == Message(b"two", Kind.DATA, 3)
        ch.keep_unread()
        ch.send(b"three")
        assert _wait_unread(ch) is Kind.DATA
        unread = "the kernel's message is unread .this side holds the turn.; receive it first"
        sent = "send of 4 bytes on channel 0 of device .*"
        with pytest.raises(NotYourTurn, match=f"{sent}: EKU_NOTTURN: {unread}"):
            ch.send(b"four")
        with pytest.raises(NotYourTurn, match=unread):
            ch.pass_()
        with pytest.raises(NotYourTurn, match=unread):
            ch.exchange(b"four", T)
        with pytest.raises(NotYourTurn, match=unread):
            ch.try_exchange(b"four")
        assert ch.unread() is Kind.DATA
        assert ch.receive(timeout=T) == Message(b"three", Kind.DATA, 4)  # kept
        assert roundtrip(ch, b"four").data == b"four"
    with Device.open(echo_sim.device_path("echo")) as dev, dev.channel(0) as ch:
        ch.keep_unread()
        assert _wait_unread(ch) is Kind.PASS
        assert roundtrip(ch, b"x").data == b"x"  # the opening PASS: dropped, not refused


def test_not_your_turn_says_whose_turn_it_is_once(echo_sim: KupSim) -> None:
    """A NotYourTurn names the operation, the channel and the device, then
    the code and the reason once: the reason takes the place of libkup's
    own "the turn is on the wrong side for this operation", which said the
    same again after it."""
    path = echo_sim.device_path("echo")
    kernel = "EKU_NOTTURN: the kernel holds the turn; receive its message first"
    with Device.open(path) as dev, dev.channel(0) as held, dev.channel(2) as ch:
        opened(held)
        held.send(HOLD)  # echo keeps the turn
        with pytest.raises(NotYourTurn) as e:
            held.send(b"now")
        assert str(e.value) == f"send of 3 bytes on channel 0 of device {path}: {kernel}"
        with pytest.raises(NotYourTurn) as e:
            held.pass_()
        assert str(e.value) == f"pass on channel 0 of device {path}: {kernel}"
        opened(ch)
        ch.keep_unread()
        ch.send(b"x")
        assert _wait_unread(ch) is Kind.DATA
        with pytest.raises(NotYourTurn) as e:
            ch.pass_()
        assert str(e.value) == (
            f"pass on channel 2 of device {path}: EKU_NOTTURN: the kernel's message is "
            "unread (this side holds the turn); receive it first: passing now would drop it"
        )
        assert ch.receive(timeout=T).data == b"x"
        with pytest.raises(NotYourTurn) as e:
            ch.receive(timeout=1)
        assert str(e.value) == (
            f"receive on channel 2 of device {path}: EKU_NOTTURN: this side holds the turn "
            "(the kernel's message was already received); send or pass first"
        )


def test_a_send_of_one_byte_says_byte(echo_sim: KupSim) -> None:
    """The channel layer's messages count a payload of one in the singular
    ("send of 1 byte"), every operation that sends."""
    path = echo_sim.device_path("echo")
    with Device.open(path) as dev, dev.channel(0) as ch:
        opened(ch)
        ch.send(HOLD)  # echo keeps the turn
        where = f"on channel 0 of device {path}: EKU_NOTTURN"
        with pytest.raises(NotYourTurn) as e:
            ch.send(b"!")
        assert str(e.value).startswith(f"send of 1 byte {where}"), str(e.value)
        with pytest.raises(NotYourTurn) as e:
            ch.exchange(b"!", T)
        assert str(e.value).startswith(f"exchange: send of 1 byte {where}"), str(e.value)
        with pytest.raises(NotYourTurn) as e:
            ch.try_exchange(b"!")
        assert str(e.value).startswith(f"try_exchange: send of 1 byte {where}"), str(e.value)
        with pytest.raises(NotYourTurn) as e:
            ch.send(b"")
        assert str(e.value).startswith(f"send of 0 bytes {where}"), str(e.value)


def test_receive_when_holding_turn_is_notyourturn(echo_sim: KupSim) -> None:
    with Device.open(echo_sim.device_path("echo")) as dev, dev.channel() as ch:
        opened(ch)
        with pytest.raises(NotYourTurn):
            ch.receive(timeout=1)
        assert roundtrip(ch, b"OK").data == b"OK"


def test_max_msg_and_one_over(echo_sim: KupSim) -> None:
    with Device.open(echo_sim.device_path("echo")) as dev, dev.channel(0) as ch:
        opened(ch)
        n = ch.max_msg
        assert n == dev.info().max_msg
        big = bytes(range(256)) * (n // 256) + b"z" * (n % 256)
        assert len(big) == n
        reply = roundtrip(ch, big)
        assert reply.kind is Kind.DATA and len(reply.data) == n and reply.data == big
        seq = reply.seq
        with pytest.raises(TooBig, match=str(n + 1)):
            ch.send(big + b"!")
        assert ch.my_turn()  # nothing was sent
        reply = roundtrip(ch, b"still usable")
        assert reply == Message(b"still usable", Kind.DATA, seq + 1)


def test_empty_message(echo_sim: KupSim) -> None:
    with Device.open(echo_sim.device_path("echo")) as dev, dev.channel() as ch:
        opened(ch)
        reply = roundtrip(ch, b"")
        assert reply == Message(b"", Kind.DATA, 2)


def test_bad_arguments(echo_sim: KupSim) -> None:
    with Device.open(echo_sim.device_path("echo")) as dev:
        with pytest.raises(InvalidArgument, match="chan_id"):
            dev.channel(-3)
        with pytest.raises(NotFound):
            dev.channel(dev.info().chan_count)
        with pytest.raises(InvalidArgument):
            dev.channel(0, pages=dev.info().pages + 1)  # must match the device's size
        assert dev.info().attached == ()
        with dev.channel() as ch:
            opened(ch)
            for bad in (-1, float("nan"), "1"):
                with pytest.raises(InvalidArgument, match="timeout"):
                    ch.receive(timeout=bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match="closed"):
            ch.send(b"x")
        ch.close()  # idempotent
    with pytest.raises(InvalidArgument, match="closed"):
        dev.channel()


def test_attach_before_the_announce_says_it_is_the_modules_move() -> None:
    """EKU_NOTREADY at attach means the module has not announced the channel
    (kupdev_notify / kupdev_announce): the error says so, not only "not
    ready" (a module author who forgot kupdev_notify saw nothing else)."""
    env = {"KUP_PARAM_ECHO_ANNOUNCE_DELAY_MS": "600000", "KUP_PARAM_ECHO_CHANNELS": "4"}
    with kupsim("echo", env=env) as sim, Device.open(sim.device_path("echo")) as dev:
        assert dev.info().announced == 0
        with pytest.raises(NotReady) as one:
            dev.channel(3)
        assert "channel 3 of device" in str(one.value)
        assert "the module has not announced this channel yet (kupdev_notify" in str(one.value)
        with pytest.raises(NotReady) as anyone:
            dev.channel(None)
        assert "the module has announced no channel yet (kupdev_notify" in str(anyone.value)
        with pytest.raises(NotFound) as beyond:  # not a channel at all: no such hint
            dev.channel(4)
        assert "announce" not in str(beyond.value)


def test_attach_past_the_last_channel_names_the_channel_and_device() -> None:
    """EKU_NOENT at attach ("no such device or channel") on a device that
    is open: the error names the device and the channel asked for, says
    that it is the channel the device does not have, and where its count
    is."""
    env = {"KUP_PARAM_ECHO_CHANNELS": "4"}
    with kupsim("echo", env=env) as sim, Device.open(sim.device_path("echo")) as dev:
        with pytest.raises(NotFound) as beyond:
            dev.channel(4)
        assert str(beyond.value) == (
            f"attach channel 4 of device {sim.device_path('echo')}: the device has no "
            "channel with this id (Device.info().chan_count: how many it has): "
            "EKU_NOENT: no such device or channel"
        )
        assert dev.info().chan_count == 4


def test_specific_channel_busy(echo_sim: KupSim) -> None:
    with Device.open(echo_sim.device_path("echo")) as dev, dev.channel(0) as ch:
        assert ch.id == 0
        with pytest.raises(Busy):
            dev.channel(0)
        with dev.channel() as other:
            assert other.id != 0


def test_two_channels_interleaved(echo_sim: KupSim) -> None:
    with Device.open(echo_sim.device_path("echo")) as dev, dev.channel() as a, dev.channel() as b:
        assert a.id != b.id
        opened(a)
        opened(b)
        a.send(b"to a")
        b.send(b"to b")
        assert b.receive(timeout=T).data == echoed(b.id, b"to b")
        assert a.receive(timeout=T).data == echoed(a.id, b"to a")


def test_two_channels_different_transforms(echo_sim: KupSim) -> None:
    with Device.open(echo_sim.device_path("echo")) as dev, dev.channel(0) as even, \
            dev.channel(1) as odd:
        opened(even)
        opened(odd)
        assert roundtrip(even, b"Hello, kernel!").data == b"Hello, kernel!"
        assert roundtrip(odd, b"Hello, kernel!").data == b"HELLO, KERNEL!"


def test_128_channels(echo_sim: KupSim) -> None:
    with Device.open(echo_sim.device_path("echo")) as dev:
        assert dev.info().chan_count >= 128
        chans = [dev.channel() for _ in range(128)]
        try:
            assert sorted(c.id for c in chans) == list(range(128))
            assert dev.info().attached == tuple(range(128))
            for c in chans:
                opened(c)
            for c in chans:
                c.send(b"chan %d" % c.id)
            for c in reversed(chans):
                assert c.receive(timeout=T).data == echoed(c.id, b"chan %d" % c.id)
        finally:
            for c in chans:
                c.close()


def test_two_devices_at_once() -> None:
    with kupsim("echo") as sim1, kupsim("echo") as sim2:
        d1 = Device.open(sim1.device_path("echo"))
        d2 = Device.open(sim2.device_path("echo"))
        with d1, d2, d1.channel(0) as c1, d2.channel(0) as c2:
            opened(c1)
            opened(c2)
            c1.send(b"one")
            c2.send(b"two")
            assert c2.receive(timeout=T).data == b"two"
            assert c1.receive(timeout=T).data == b"one"
            assert d1.info().attached == (0,) and d2.info().attached == (0,)


def test_stamp_answers_later_with_the_kernel_clock(echo_sim: KupSim) -> None:
    """b"!stamp<ms>" (>= 16 bytes): answered ms later, the last 8 bytes the
    module's CLOCK_MONOTONIC at the hand-over (the benchmark's wake-up
    figure subtracts it from the receiver's clock)."""
    with Device.open(echo_sim.device_path("echo")) as dev, dev.channel(0) as ch:
        opened(ch)
        req = b"!stamp120".ljust(64, b".")
        t0 = time.monotonic_ns()
        reply = roundtrip(ch, req)
        t1 = time.monotonic_ns()
        stamp = int.from_bytes(reply.data[-8:], sys.byteorder)
        assert reply.data[:-8] == req[:-8] and reply.kind is Kind.DATA
        assert t0 + 120_000_000 <= stamp <= t1, (t0, stamp, t1)
        # too short for a stamp, or no digits (1000 ms default, not waited
        # for here): a plain echo, or an answer after the default delay
        assert roundtrip(ch, b"!stamp12").data == b"!stamp12"
        t0 = time.monotonic_ns()
        reply = roundtrip(ch, b"!stamp".ljust(16, b"-"))
        assert int.from_bytes(reply.data[-8:], sys.byteorder) >= t0 + 1_000_000_000


def test_stamp_wait_ends_when_the_user_leaves(echo_sim: KupSim) -> None:
    """A user that leaves during the stamp's wait (the longest, 10 s) ends
    that worker within its 20 ms look-out: echo joins a channel's old worker
    before it starts the next user's, so the next user's opening PASS would
    otherwise wait the full 10 s -- the receive below allows 4."""
    with Device.open(echo_sim.device_path("echo")) as dev:
        with dev.channel(0) as ch:
            opened(ch)
            ch.send(b"!stamp10000".ljust(32, b"."))
        with channel_when_free(dev, 0, T) as ch2:
            first = ch2.receive(timeout=4.0)  # DeadlineExceeded: the old worker slept on
            assert first.kind is Kind.PASS and first.seq == 1
            assert roundtrip(ch2, b"after").data == b"after"


def _count_parts(msg: Message) -> tuple[int, int]:
    """(N, C) of echo's "!count N prev C"."""
    word, n, prev, c = msg.data.decode().split()
    assert (word, prev) == ("!count", "prev"), msg.data
    return int(n), int(c)


def test_module_state_shared_under_a_kup_mutex(echo_sim: KupSim) -> None:
    """echo's "!count2": every channel's worker reads one count and the
    channel of the last "!count", sleeps 2 ms, and updates both, all under
    a kup_os_mutex, then formats the reply with kup_os_snprintf.  Four
    channels counting at once: the counts are consecutive, none twice, and
    each reply's "prev" is the channel that got the count before it --
    without the mutex, overlapping updates give counts twice."""
    import threading

    rounds, chans = 40, (4, 5, 6, 7)
    got: dict[int, list[tuple[int, int]]] = {}
    with Device.open(echo_sim.device_path("echo")) as dev:
        opened_chans = [dev.channel(c) for c in chans]
        try:
            for ch in opened_chans:
                opened(ch)

            def count(ch: Channel) -> None:
                got[ch.id] = [_count_parts(roundtrip(ch, b"!count2")) for _ in range(rounds)]

            threads = [threading.Thread(target=count, args=(ch,)) for ch in opened_chans]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert sorted(got) == list(chans)
            # the channel goes on echoing after its counts
            assert roundtrip(opened_chans[0], b"after").data == b"after"
        finally:
            for ch in opened_chans:
                ch.close()
    by_n = {n: (chan, prev) for chan, rs in got.items() for n, prev in rs}
    assert len(by_n) == rounds * len(chans), "a count was given twice"
    first = min(by_n)
    assert sorted(by_n) == list(range(first, first + rounds * len(chans)))
    for n in range(first + 1, first + rounds * len(chans)):
        assert by_n[n][1] == by_n[n - 1][0], (n, by_n[n], by_n[n - 1])


def test_module_reentry_is_refused_not_a_hang(echo_sim: KupSim) -> None:
    """echo's b"!reenter": its worker sends and receives on the channel it
    still holds from its receive; the core must refuse both (-EDEADLK)
    rather than block the worker forever, and the channel goes on."""
    with Device.open(echo_sim.device_path("echo")) as dev, dev.channel(0) as ch:
        opened(ch)
        for _ in range(2):  # refused every time, not just the first
            assert roundtrip(ch, b"!reenter").data == b"!reenter ok"
        assert roundtrip(ch, b"after").data == b"after"
