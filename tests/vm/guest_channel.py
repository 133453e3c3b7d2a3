"""kupd.channel against the real Linux module (run INSIDE the test VM).

tests/vm/guest_tests.sh runs this file with pytest in the guest, after
kup.ko, kup_echo.ko and kup_rot13.ko are loaded, with KUP_BACKEND=linux so
libkup (inside kupd._kupchan) can only use /dev/kup/<name>.  It is not
collected on the host (the name does not start with test_): there is no
/dev/kup there.  KMODDIR names the directory of the built modules (for the
unload scenario, which reloads kup_rot13.ko afterwards).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from kupd import abi
from kupd.channel import Channel, Device, Kind, Message
from kupd.errors import (
    Busy,
    DeadlineExceeded,
    NotFound,
    NotReady,
    NotYourTurn,
    PeerGone,
    Releasing,
    Shutdown,
    TooBig,
    VersionMismatch,
)

T = 20.0  # generous bound on any wait that should succeed (TCG is slow)

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/kup/echo"), reason="needs the loaded kernel module (in the VM)"
)


@pytest.fixture
def echo() -> Iterator[Device]:
    assert os.environ.get("KUP_BACKEND") == "linux"
    with Device.open("echo") as dev:
        yield dev


def opened(ch: Channel) -> Message:
    first = ch.receive(timeout=T)
    assert first == Message(b"", Kind.PASS, 1)
    return first


def test_info_is_the_modules(echo: Device) -> None:
    info = echo.info()
    assert info.name == "echo"
    assert info.abi_version == abi.KUP_ABI_VERSION
    assert info.page_size == os.sysconf("SC_PAGE_SIZE")
    assert info.chan_count == 128 and info.announced == 128
    assert info.max_msg == info.pages * info.page_size
    assert not info.shutting_down


def test_round_trips_and_pass(echo: Device) -> None:
    with echo.channel(0) as ch:
        assert echo.info().attached == (0,)
        opened(ch)
        for i, data in enumerate([b"hello", b"\x00\xff binary", b"x" * ch.max_msg]):
            ch.send(data)
            assert ch.receive(timeout=T) == Message(data, Kind.DATA, 2 + i)
        ch.pass_()
        assert ch.receive(timeout=T).kind is Kind.PASS
    assert echo.info().attached == ()


def test_module_state_under_a_kup_mutex_in_the_kernel(echo: Device) -> None:
    """echo's "!count2" on kup.ko: kup_os_mutex is a struct mutex its holder
    may sleep under (2 ms between read and update), kup_os_snprintf the
    kernel's vsnprintf.  Three kernel threads counting at once: consecutive
    counts, none twice, each "prev" the channel counted just before."""
    rounds, chans = 15, (50, 51, 52)
    got: dict[int, list[tuple[int, int]]] = {}
    opened_chans = [echo.channel(c) for c in chans]
    try:
        for ch in opened_chans:
            opened(ch)

        def count(ch: Channel) -> None:
            out = []
            for _ in range(rounds):
                ch.send(b"!count2")
                word, n, prev, c = ch.receive(timeout=T).data.decode().split()
                assert (word, prev) == ("!count", "prev")
                out.append((int(n), int(c)))
            got[ch.id] = out

        threads = [threading.Thread(target=count, args=(ch,)) for ch in opened_chans]
        for t in threads:
            t.start()
        for t in threads:
            t.join(T * 3)
        assert sorted(got) == list(chans)
    finally:
        for ch in opened_chans:
            ch.close()
    by_n = {n: (chan, prev) for chan, rs in got.items() for n, prev in rs}
    total = rounds * len(chans)
    assert len(by_n) == total, "a count was given twice"
    first = min(by_n)
    assert sorted(by_n) == list(range(first, first + total))
    for n in range(first + 1, first + total):
        assert by_n[n][1] == by_n[n - 1][0], (n, by_n[n], by_n[n - 1])


def test_module_reentry_is_refused_by_the_linux_core(echo: Device) -> None:
    """echo's "!reenter": its kernel thread sends and receives on the channel
    it still holds; kup.ko refuses both with -EDEADLK (KUP_CURTHREAD() is
    `current`) instead of leaving an unkillable thread, and the channel goes on."""
    with echo.channel(2) as ch:
        opened(ch)
        ch.send(b"!reenter")
        assert ch.receive(timeout=T).data == b"!reenter ok"
        ch.send(b"after")
        assert ch.receive(timeout=T).data == b"after"
    log = subprocess.run(["dmesg"], capture_output=True, text=True, check=False).stdout
    assert "call kupdev_unlock_channel first (-EDEADLK)" in log, log[-2000:]


def _dmesg() -> str:
    return subprocess.run(["dmesg"], capture_output=True, text=True, check=False).stdout


def _wait_dmesg(line: str) -> None:
    deadline = time.monotonic() + T
    while line not in _dmesg():
        assert time.monotonic() < deadline, f"no {line!r} in dmesg"
        time.sleep(0.05)


def test_attach_while_the_module_still_holds_the_channel(echo: Device) -> None:
    """A user leaves channel 40 while echo's worker keeps it locked
    ("!lockhold", as a module computing a long reply).  Another attach of
    it used to sleep in mutex_lock -- unkillable, D state -- for the whole
    hold; now it tries for KUP_ATTACH_LETGO_MS and fails with Releasing (a
    Busy), a signal meanwhile does not break it, and once the module lets go
    the channel attaches with a fresh conversation."""
    ch = echo.channel(40)
    opened(ch)
    ch.send(b"!lockhold60000")
    _wait_dmesg("echo: chan 40: holding the channel locked")
    ch.close()
    # INFO tells why: no user, and the module holds it (KUP_INFO_MODULE_HOLDS)
    info = echo.info()
    assert 40 not in info.attached and 40 in info.module_holds, info
    for _ in range(2):
        start = time.monotonic()
        with pytest.raises(Releasing, match="EKU_RELEASING") as info:
            echo.channel(40)
        took = time.monotonic() - start
        assert isinstance(info.value, Busy)
        # waited its ~0.5 s, then gave up (counting 1 ms pauses, it was 4 s
        # at HZ=250: a pause is two jiffies)
        assert 0.4 <= took < 3.0, took
    # a signal during the wait: libkup asks again after the handler ran
    hits: list[int] = []
    old = signal.signal(signal.SIGALRM, lambda signo, frame: hits.append(signo))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        with pytest.raises(Releasing):
            echo.channel(40)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert hits == [signal.SIGALRM]
    # signals more often than the kernel's wait (a profiler's SIGPROF):
    # each interrupted ioctl restarted that wait, and libkup asked for as
    # long as the module held the channel; the retries share a deadline
    hits.clear()
    old = signal.signal(signal.SIGALRM, lambda signo, frame: hits.append(signo))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1, 0.1)
        start = time.monotonic()
        with pytest.raises(Releasing, match="EKU_RELEASING"):
            echo.channel(40)
        took = time.monotonic() - start
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    # (Python runs the handler once for signals that arrived together)
    assert hits and took < 5.0, (hits, took)
    # "!lockfree" on another channel ends the hold; echo lets go
    with echo.channel(41) as other:
        opened(other)
        other.send(b"!lockfree")
        assert other.receive(timeout=T).data == b"!LOCKFREE"
    _wait_dmesg("echo: chan 40: lock hold ended (released)")
    deadline = time.monotonic() + T
    while True:
        try:
            again = echo.channel(40)
            break
        except Busy:
            assert time.monotonic() < deadline, "channel 40 never let go"
            time.sleep(0.05)
    with again:
        opened(again)
        again.send(b"fresh")
        assert again.receive(timeout=T).data == b"fresh"
        assert 40 in echo.info().attached and 40 not in echo.info().module_holds


def test_odd_channel_upper_cases_and_rot13_device(echo: Device) -> None:
    with echo.channel(1) as ch, Device.open("rot13") as r, r.channel(1) as rc:
        opened(ch)
        opened(rc)
        ch.send(b"Hello, kernel")
        assert ch.receive(timeout=T).data == b"HELLO, KERNEL"
        rc.send(b"Hello, kernel")
        assert rc.receive(timeout=T).data == b"Uryyb, xreary"


def test_fileno_polls_readable_when_the_turn_comes_back(echo: Device) -> None:
    with echo.channel(2) as ch:
        opened(ch)
        ch.send(b"poll me")
        r, _, _ = select.select([ch.fileno()], [], [], T)
        assert r == [ch.fileno()]
        msg = ch.try_receive()
        assert msg == Message(b"poll me", Kind.DATA, 2)


def test_fileno_is_quiet_once_the_message_is_taken(echo: Device) -> None:
    """The event-loop pattern (poll the fd, then try_receive) must not spin:
    after the message is taken the fd is not readable until the next one."""
    with echo.channel(8) as ch:
        fd = ch.fileno()
        for seq in (1, 2, 3):
            msg = None
            while msg is None:
                r, _, _ = select.select([fd], [], [], T)
                assert r == [fd], "the fd never polled readable"
                msg = ch.try_receive()
            assert msg.seq == seq
            assert select.select([fd], [], [], 0)[0] == [], "readable after the take"
            ch.send(b"%d" % seq)


def test_a_late_wakeup_is_consumed_by_try_receive(echo: Device) -> None:
    """A wake-up that lands after the message was taken (here: the user's own
    write(2) on the fd, libkup's self-wake) is drained by the next look."""
    with echo.channel(10) as ch:
        fd = ch.fileno()
        opened(ch)
        ch.send(b"x")
        assert ch.receive(timeout=T).data == b"x"
        os.write(fd, (1).to_bytes(8, "little"))
        assert select.select([fd], [], [], T)[0] == [fd]
        with pytest.raises(NotYourTurn):
            ch.try_receive()
        assert select.select([fd], [], [], 0)[0] == []


def test_refusals(echo: Device) -> None:
    with echo.channel(4) as ch:
        with pytest.raises(Busy):
            echo.channel(4)
        opened(ch)
        with pytest.raises(TooBig):
            ch.send(b"y" * (ch.max_msg + 1))
        assert ch.my_turn()
        ch.send(b"!hold")  # echo keeps the turn until we leave
        with pytest.raises(NotYourTurn):
            ch.send(b"again")
        with pytest.raises(NotReady):
            ch.receive(timeout=0)
        assert ch.try_receive() is None
        with pytest.raises(DeadlineExceeded):
            ch.receive(timeout=0.2)
    with pytest.raises(NotFound):
        Device.open("no-such-device")


def test_version_mismatch_is_refused_before_anything_moves(
    echo: Device, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUP_TEST_ABI_VERSION", str(abi.KUP_ABI_VERSION + 1))
    with pytest.raises(VersionMismatch):
        echo.channel(6)
    monkeypatch.delenv("KUP_TEST_ABI_VERSION")
    with echo.channel(6) as ch:
        opened(ch)


def test_any_channel_and_many_at_once(echo: Device) -> None:
    chans = [echo.channel() for _ in range(16)]
    try:
        assert len({c.id for c in chans}) == 16
        for c in chans:
            opened(c)
            c.send(b"n%d" % c.id)
        for c in chans:
            want = b"n%d" % c.id
            assert c.receive(timeout=T).data == (want.upper() if c.id & 1 else want)
    finally:
        for c in chans:
            c.close()


def test_unload_while_blocked_raises_shutdown() -> None:
    """rmmod kup_rot13 while a receiver waits: Shutdown, then the device is gone."""
    moddir = os.environ["KMODDIR"]
    dev = Device.open("rot13")
    ch = dev.channel(3)
    opened(ch)
    ch.send(b"!hold")
    errors: list[BaseException] = []

    def unload() -> None:
        try:
            subprocess.run(["rmmod", "kup_rot13"], check=True, timeout=T)
        except BaseException as e:  # reported below
            errors.append(e)

    t = threading.Thread(target=unload)
    t.start()
    try:
        with pytest.raises(Shutdown):
            ch.receive(timeout=T)
        with pytest.raises(Shutdown):
            ch.receive(timeout=0)
    finally:
        t.join(T)
        ch.close()
        dev.close()
    assert errors == []
    with pytest.raises(NotFound):
        Device.open("rot13")
    subprocess.run(["insmod", f"{moddir}/kup_rot13.ko"], check=True, timeout=T)


def test_attach_on_a_device_unloaded_since_it_was_opened_raises_shutdown() -> None:
    """A device opened, then rmmod kup_rot13: an attach through the open
    device is Shutdown (the device went away), not NotFound's "the device
    has no channel with this id" -- its node has vanished, which is what
    libkup's attach, opening the node by path again, used to report.  Once
    the module is loaded again the old device still says Shutdown: the path
    names another device now, not the one this handle opened."""
    moddir = os.environ["KMODDIR"]
    dev = Device.open("rot13")
    try:
        subprocess.run(["rmmod", "kup_rot13"], check=True, timeout=T)
        assert not os.path.exists("/dev/kup/rot13")
        for chan in (5, None):
            with pytest.raises(Shutdown) as exc:
                dev.channel(chan)
            assert "EKU_SHUTDOWN" in str(exc.value) and "no channel" not in str(exc.value)
        _insmod_rot13(moddir)
        with pytest.raises(Shutdown):
            dev.channel(5)
    finally:
        dev.close()
        if not os.path.exists("/sys/module/kup_rot13"):
            _insmod_rot13(moddir)
    with Device.open("rot13") as fresh, _attach(fresh, 5) as ch:  # the new device works
        opened(ch)


def _insmod_rot13(moddir: str) -> None:
    subprocess.run(["insmod", f"{moddir}/kup_rot13.ko"], check=True, timeout=T)
    deadline = time.monotonic() + T
    while not os.path.exists("/dev/kup/rot13"):
        assert time.monotonic() < deadline, "/dev/kup/rot13 did not come back"
        time.sleep(0.05)


def _reload_rot13(params: str) -> None:
    """rmmod kup_rot13, set kup.ko's params, insmod it again (its
    kup_os_param_int reads them at init) and wait for its node."""
    moddir = os.environ["KMODDIR"]
    subprocess.run(["rmmod", "kup_rot13"], check=True, timeout=T)
    with open("/sys/module/kup/parameters/params", "w") as f:
        f.write(params)
    subprocess.run(["insmod", f"{moddir}/kup_rot13.ko"], check=True, timeout=T)
    deadline = time.monotonic() + T
    while not os.path.exists("/dev/kup/rot13"):
        assert time.monotonic() < deadline, "/dev/kup/rot13 did not come back"
        time.sleep(0.05)


def _attach(dev: Device, chan: int) -> Channel:
    deadline = time.monotonic() + T
    while True:
        try:
            return dev.channel(chan)
        except Releasing:  # the module still lets go of the last user
            assert time.monotonic() < deadline, f"channel {chan} stays releasing"
            time.sleep(0.01)


def test_a_held_reattach_does_not_stall_the_acceptor() -> None:
    """Attach, close and re-attach channels at once and hold them: the
    worker started for the first attachment (made to sleep 300 ms before
    its first call: rot13.start_delay_ms) serves the second one, and the
    module's acceptor must not wait for it -- another channel still gets
    its PASS (echo.c, struct echo_slot; the fuzzer's "task kup-echo-acc
    blocked for more than 120 seconds")."""
    with open("/sys/module/kup/parameters/params") as f:
        saved = f.read().strip()
    _reload_rot13(saved + ",rot13.start_delay_ms=300")
    try:
        with Device.open("rot13") as dev:
            held = []
            try:
                for c in range(4):
                    _attach(dev, c).close()
                    held.append(_attach(dev, c))
                with _attach(dev, 9) as probe:
                    assert probe.receive(timeout=T).kind is Kind.PASS
                    assert probe.exchange(b"ab", T).data == b"no"
                for ch in held:
                    assert ch.receive(timeout=T).kind is Kind.PASS
                    assert ch.exchange(b"ab", T).data == b"no"
            finally:
                for ch in held:
                    ch.close()
    finally:
        _reload_rot13(saved)


def _given_up(dev: Device, chan: int, msg: bytes) -> Channel:
    """A user of ``chan`` whose session echo gives up on ("!oversize": the
    worker's reply fails with -EMSGSIZE, which does not end the session for
    the core), returned still attached once echo has taken the message."""
    user = _attach(dev, chan)
    assert user.receive(timeout=T).kind is Kind.PASS
    user.send(msg)
    _wait_dmesg(f"echo: chan {chan}: oversize reply in")
    return user


def _next_served(dev: Device, chan: int) -> None:
    with _attach(dev, chan) as nxt:
        assert nxt.receive(timeout=T).kind is Kind.PASS, chan
        assert nxt.exchange(b"next", T).data == b"next"


def test_the_next_user_is_served_after_a_session_given_up(echo: Device) -> None:
    """kup_echo.ko gives up on a session with an error that does not end
    it for the core (echo's "!oversize"); the first call of the channel's
    next session -- a new worker's PASS, or the re-pass of the same worker
    flagged by the acceptor -- gets -EPIPE for the given-up session, and
    the module must call again instead of leaving the next user without
    its first PASS (kupdev.h, "Sessions").  Channel 64: the user leaves
    after the failed reply; channel 66: the next user attaches while the
    worker still sleeps before its failing reply."""
    user = _given_up(echo, 64, b"!oversize")
    _wait_dmesg("echo: chan 64: oversize reply: -90")
    user.close()
    _next_served(echo, 64)
    user = _given_up(echo, 66, b"!oversize1000")
    user.close()
    _next_served(echo, 66)
    _wait_dmesg("echo: chan 66: oversize reply: -90")
    _next_served(echo, 64)
    _next_served(echo, 66)


def test_params_written_with_a_trailing_newline() -> None:
    """`echo "rot13.channels=48" > /sys/module/kup/parameters/params`
    stores the newline echo appends; the last value used to be refused
    ("48?" is not a decimal integer) and the module got its default."""
    with open("/sys/module/kup/parameters/params") as f:
        saved = f.read().strip()
    _reload_rot13("echo.channels=128,rot13.channels=48\n")
    try:
        with Device.open("rot13") as dev:
            assert dev.info().chan_count == 48
    finally:
        _reload_rot13(saved)
    with Device.open("rot13") as dev:
        assert dev.info().chan_count == 64


def _dmesg_has(text: str) -> bool:
    return text in subprocess.run(["dmesg"], capture_output=True, text=True, check=True).stdout


def test_relay_never_waits_for_another_channel(echo: Device) -> None:
    """echo's "!relayC" forwards the message its worker still holds to
    channel C (a zero-copy relay).  kup.ko used to hold a channel's lock for
    a worker's whole receive and until its unlock: the forward waited for
    C's user (a hung task in kup_send_common) or for C's worker to let go.
    Now it is refused at once: -EAGAIN while C's worker waits in its
    receive, -EBUSY while it holds a message (kupdev.h, "Conventions")."""
    with echo.channel(96) as c, echo.channel(98) as a:
        opened(c)  # C's worker now waits in its receive
        opened(a)
        assert a.exchange(b"!relay96", T).data == b"!relay -11"
        assert c.exchange(b"still mine", T) == Message(b"still mine", Kind.DATA, 2)
        c.send(b"!lockhold60000")  # C's worker holds its message
        deadline = time.monotonic() + T
        while not _dmesg_has("echo: chan 96: holding the channel locked"):
            assert time.monotonic() < deadline, "channel 96's hold never started"
            time.sleep(0.05)
        assert a.exchange(b"!relay96", T).data == b"!relay -16"
        a.exchange(b"!lockfree", T)  # ends C's hold
        assert c.receive(timeout=T).data == b"!lockhold60000"


def _relay(go: threading.Barrier, got: dict[str, bytes], name: str, ch: Channel, to: int) -> None:
    go.wait(timeout=T)
    ch.send(b"!relay%d" % to)
    got[name] = ch.receive(timeout=T).data


def test_relays_forwarding_to_each_other_never_hang(echo: Device) -> None:
    """Two workers, each holding its channel's message, forward it to the
    other's channel at the same moment: the zero-copy relay that left both
    in D state for good and rmmod hanging.  Every answer comes (the forward
    went through, or was refused at once).  A fresh pair of channels each
    round (a worker whose own answer was refused ends its session without
    a word, which costs that channel's next session a first call)."""
    for i in range(10):
        cx, cy = 100 + 2 * i, 101 + 2 * i
        with echo.channel(cx) as x, echo.channel(cy) as y:
            opened(x)
            opened(y)
            got: dict[str, bytes] = {}
            go = threading.Barrier(2)
            ts = [
                threading.Thread(target=_relay, args=(go, got, "x", x, cy)),
                threading.Thread(target=_relay, args=(go, got, "y", y, cx)),
            ]
            for t in ts:
                t.start()
            for t in ts:
                t.join(timeout=2 * T)
                assert not t.is_alive(), "a relay hangs"
            answers = {b"!relay 0", b"!relay -11", b"!relay -16"}
            assert got.get("x") in answers | {b"!relay%d" % cx}, got
            assert got.get("y") in answers | {b"!relay%d" % cy}, got


def test_fire_and_forget_requests_reach_the_module(echo: Device) -> None:
    """A user sends one request and closes at once: kup.ko delivers it to
    the module's receive anyway (it used to report the departure first,
    and the request was lost to the race with the user's own detach)."""
    fired = range(120, 127)
    with echo.channel(127) as probe:
        opened(probe)

        def count() -> int:
            word, n, _, _ = probe.exchange(b"!count", T).data.decode().split()
            assert word == "!count"
            return int(n)

        start = count()
        for c in fired:
            with echo.channel(c) as ch:
                opened(ch)
                ch.send(b"!count")
        asked = 0
        deadline = time.monotonic() + T
        while True:
            asked += 1
            got = count() - start - asked
            if got == len(fired):
                break
            assert got < len(fired), got
            assert time.monotonic() < deadline, f"{got} of {len(fired)} requests counted"
            time.sleep(0.05)


def test_module_disconnect_ends_a_blocked_receive(echo: Device) -> None:
    """echo's "!kick": kup.ko's kupdev_disconnect ends the session of a user
    blocked in its receive -- PeerGone (EKU_PEER), well before its timeout,
    then for every call -- and once the user lets go the channel serves the
    next one afresh.  In poll mode the fd turns readable for it (POLLERR)."""
    with echo.channel(70) as ch:
        opened(ch)
        ch.send(b"!kick300")
        t0 = time.monotonic()
        with pytest.raises(PeerGone):
            ch.receive(timeout=3 * T)
        assert time.monotonic() - t0 < 2 * T
        with pytest.raises(PeerGone):
            ch.send(b"x")
    _wait_dmesg("echo: chan 70: disconnected the user (0)")
    with _attach(echo, 70) as ch:
        opened(ch)
        fd = ch.fileno()
        ch.send(b"!kick")
        deadline = time.monotonic() + T
        while True:
            r, _, _ = select.select([fd], [], [], T)
            assert r, "the fd never turned readable"
            try:
                assert ch.try_receive() is None, "echo answered a !kick"
            except PeerGone:
                break
            assert time.monotonic() < deadline
    with _attach(echo, 70) as ch:
        opened(ch)
        assert ch.exchange(b"again", timeout=T).data == b"again"


def test_module_wakes_its_own_receive(echo: Device) -> None:
    """echo's "!wake": a kthread asleep in kupdev_receive_msg is woken by
    kupdev_wake_channel from another kthread (-ECANCELED, -125) and the
    session goes on; a wake after the user's message is answered by the
    worker's next receive."""
    with echo.channel(72) as ch:
        opened(ch)
        assert ch.exchange(b"!wake50", timeout=T).data == b"!wake armed"
        _wait_dmesg("echo: chan 72: receive woken (-125) while waiting")
        assert ch.exchange(b"x", timeout=T).data == b"!wake -125"
        assert ch.exchange(b"!wake1500", timeout=T).data == b"!wake armed"
        assert ch.exchange(b"y", timeout=T).data == b"!wake -125"
        assert ch.exchange(b"on", timeout=T).data == b"on"
    _wait_dmesg("echo: chan 72: receive woken (-125) after a message")
