"""kupd.channel across threads and processes, against a real kupsim + echo.

GIL release (two threads on two channels), unload while a receiver waits,
a user process SIGKILLed while holding a channel, ABI version refusal, and
that blocked waiters (user side and kupsim) burn no CPU.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from kupd.channel import Channel, Device, Kind
from kupd.errors import Busy, DeadlineExceeded, KupError, Shutdown, VersionMismatch
from kupd.testing import REPO_ROOT, KupSim, channel_when_free, kupsim

T = 10.0
DELAY = b"!delay"  # echo holds the turn 300 ms, then answers
HOLD = b"!hold"  # echo keeps the turn until the user leaves or the device unloads


def opened(ch: Channel) -> None:
    first = ch.receive(timeout=T)
    assert first.kind is Kind.PASS and first.seq == 1


# --- threads -----------------------------------------------------------------


def test_two_threads_progress_concurrently(echo_sim: KupSim) -> None:
    """Thread A blocks in receive() (echo holds the turn 300 ms, three times);
    thread B does round trips on another channel meanwhile.  If the GIL were
    held during A's wait, B could not complete a single round trip while A
    is inside receive()."""
    dev = Device.open(echo_sim.device_path("echo"))
    a, b = dev.channel(0), dev.channel(2)
    opened(a)
    opened(b)
    b_count = 0
    stop = threading.Event()
    during_a_waits: list[int] = []
    errors: list[BaseException] = []

    def worker_a() -> None:
        try:
            for _ in range(3):
                a.send(DELAY)
                before = b_count
                reply = a.receive(timeout=T)  # ~300 ms inside C
                during_a_waits.append(b_count - before)
                assert reply.data == DELAY
        except BaseException as e:
            errors.append(e)
        finally:
            stop.set()

    def worker_b() -> None:
        nonlocal b_count
        try:
            while not stop.is_set():
                b.send(b"ping %d" % b_count)
                assert b.receive(timeout=T).data == b"ping %d" % b_count
                b_count += 1
        except BaseException as e:
            errors.append(e)

    with dev, a, b:
        ta = threading.Thread(target=worker_a)
        tb = threading.Thread(target=worker_b)
        tb.start()
        ta.start()
        ta.join(60)
        tb.join(60)
        assert not ta.is_alive() and not tb.is_alive()
    assert not errors, errors
    assert len(during_a_waits) == 3
    assert sum(during_a_waits) > 0, "B made no progress while A was blocked: GIL held?"
    print(f"round trips on B during A's three blocked receives: {during_a_waits}")


def test_many_threads_share_one_device(echo_sim: KupSim) -> None:
    """16 threads attach "any" channel of one Device at once and converse;
    every thread gets its own channel and only its own replies."""
    dev = Device.open(echo_sim.device_path("echo"))
    barrier = threading.Barrier(16)
    # every thread keeps its channel until all have conversed: a channel a
    # fast thread already closed is free again and may go to a slow one
    all_done = threading.Barrier(16)
    ids: list[int] = []
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            barrier.wait(T)
            with dev.channel() as ch:
                ids.append(ch.id)
                opened(ch)
                for i in range(100):
                    data = b"T%d#%d" % (n, i)
                    ch.send(data)
                    reply = ch.receive(timeout=T)
                    assert reply.data == data and reply.seq == i + 2, (n, i, reply)
                info = dev.info()  # device calls from many threads at once
                assert ch.id in info.attached
                all_done.wait(T)
        except BaseException as e:
            errors.append(e)

    with dev:
        threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        assert not errors, errors
        assert len(set(ids)) == 16
        assert dev.info().attached == ()


def test_same_channel_from_two_threads_is_busy(echo_sim: KupSim) -> None:
    """While one thread is inside receive(), another thread using the same
    channel gets Busy (libkup allows one thread per channel at a time), and
    close() from that other thread ends the wait."""
    from kupd.errors import InvalidArgument

    with Device.open(echo_sim.device_path("echo")) as dev:
        ch = dev.channel(0)
        opened(ch)
        ch.send(HOLD)  # the receiver below waits until we close
        got: list[BaseException | object] = []

        def wait() -> None:
            try:
                got.append(ch.receive())
            except BaseException as e:
                got.append(e)

        t = threading.Thread(target=wait)
        t.start()
        deadline = time.monotonic() + T
        while True:
            try:
                ch.try_receive()
            except Busy as e:
                assert "another thread is using this channel" in str(e)
                break
            assert time.monotonic() < deadline, "the receiver never became busy"
            time.sleep(0.001)
        with pytest.raises(Busy):
            ch.send(b"x")
        with pytest.raises(Busy):
            ch.fileno()
        ch.close()
        t.join(T)
        assert not t.is_alive(), "close() did not end the blocked receive"
        assert len(got) == 1 and isinstance(got[0], InvalidArgument), got
        assert "closed by another thread" in str(got[0])
        assert ch.closed


def test_signal_interrupts_a_blocked_receive(echo_sim: KupSim) -> None:
    """A blocking receive(None) in the main thread is interrupted by a
    signal handler that raises (^C works): the wait is sliced."""

    class Interrupted(Exception):
        pass

    def handler(signum: int, frame: object) -> None:
        raise Interrupted

    with Device.open(echo_sim.device_path("echo")) as dev, dev.channel(0) as ch:
        opened(ch)
        ch.send(HOLD)
        old = signal.signal(signal.SIGALRM, handler)
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.1)
            with pytest.raises(Interrupted):
                ch.receive()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        # the channel is untouched: still the kernel's turn, still usable
        assert not ch.my_turn()
        with pytest.raises(DeadlineExceeded):
            ch.receive(timeout=0.05)


@pytest.mark.parametrize("hold", [DELAY, HOLD])
def test_next_user_after_close_gets_a_fresh_channel(echo_sim: KupSim, hold: bytes) -> None:
    """A user leaves while the kernel holds the turn; the next user of the
    channel must start a fresh conversation (echo's opening PASS, seq 1),
    never receive what was meant for the previous user."""
    from kupd.errors import InvalidArgument

    with Device.open(echo_sim.device_path("echo")) as dev:
        ch = dev.channel(0)
        opened(ch)
        ch.send(hold)
        outcome: list[BaseException | object] = []

        def wait() -> None:
            try:
                outcome.append(ch.receive())
            except BaseException as e:
                outcome.append(e)

        t = threading.Thread(target=wait)
        t.start()
        ch.close()
        t.join(T)
        assert not t.is_alive()
        assert ch.closed
        # Either the reply beat the close, or the close ended the wait.
        r = outcome[0]
        assert isinstance(r, InvalidArgument) or getattr(r, "data", None) == hold, r
        # The channel is free again for the next user.
        with channel_when_free(dev, 0, T) as again:
            opened(again)


# --- unload ------------------------------------------------------------------


def test_unload_while_receiver_waits_is_shutdown(record_property: pytest.RecordProperty) -> None:
    with kupsim("echo") as sim:
        dev = Device.open(sim.device_path("echo"))
        ch = dev.channel(0)
        opened(ch)
        outcome: list[BaseException] = []
        sigterm_at: list[float] = []
        raised_at: list[float] = []
        waiting = threading.Event()

        def wait() -> None:
            try:
                ch.send(HOLD)  # the kernel keeps the turn until the unload
                waiting.set()
                ch.receive()
            except BaseException as e:
                raised_at.append(time.monotonic())
                outcome.append(e)

        with dev, ch:
            t = threading.Thread(target=wait)
            t.start()
            assert waiting.wait(T)
            sigterm_at.append(time.monotonic())
            sim.signal(signal.SIGTERM)
            t.join(30)
            assert not t.is_alive(), "receiver still blocked 30 s after SIGTERM"
        assert len(outcome) == 1 and isinstance(outcome[0], Shutdown), outcome
        assert "EKU_SHUTDOWN" in str(outcome[0])
        latency_ms = (raised_at[0] - sigterm_at[0]) * 1000
        record_property("shutdown_latency_ms", round(latency_ms, 2))
        print(f"SIGTERM -> Shutdown in the waiting receiver: {latency_ms:.1f} ms")
        assert sim.wait(T) == 0, sim.output()


def test_operations_after_unload_are_shutdown() -> None:
    with kupsim("echo") as sim, Device.open(sim.device_path("echo")) as dev:
        with dev.channel(0) as ch:
            opened(ch)
            sim.stop()
            with pytest.raises(Shutdown):
                ch.send(b"x")
            with pytest.raises(Shutdown):
                ch.receive(timeout=T)
        with pytest.raises(KupError):
            dev.channel(1)


def test_event_fd_signals_shutdown() -> None:
    import select

    with kupsim("echo") as sim, Device.open(sim.device_path("echo")) as dev:
        fd = dev.event_fd()
        assert fd == dev.event_fd()  # one fd, owned by the device
        sim.signal(signal.SIGTERM)
        r, _, _ = select.select([fd], [], [], T)
        assert r == [fd], "device event fd did not poll readable at unload"
        try:
            info = dev.info()
        except Shutdown:
            pass  # the host is already gone
        else:
            assert info.shutting_down
        assert sim.wait(T) == 0


# --- processes -----------------------------------------------------------------

_HOLDER = textwrap.dedent(
    """
    import sys
    from kupd.channel import Device
    dev = Device.open(sys.argv[1])
    ch = dev.channel(int(sys.argv[2]))
    first = ch.receive(timeout=10)
    print("attached", ch.id, first.kind.name, flush=True)
    sys.stdin.read()  # hold the channel until killed
    """
)


def _spawn_holder(sim: KupSim, chan: int) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, sim.device_path("echo"), str(chan)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.split() != ["attached", str(chan), "PASS"]:
        proc.kill()
        _, err = proc.communicate(timeout=T)
        pytest.fail(f"holder did not attach: {line!r}\n{err}")
    return proc


def test_killed_holder_frees_the_channel(echo_sim: KupSim) -> None:
    with Device.open(echo_sim.device_path("echo")) as dev:
        proc = _spawn_holder(echo_sim, 5)
        try:
            assert 5 in dev.info().attached
            with pytest.raises(Busy):
                dev.channel(5)
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=T)
            assert proc.returncode == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=T)
        # kupsim notices the closed connection and detaches; wait for it.
        with channel_when_free(dev, 5, T) as ch:
            opened(ch)  # a fresh attachment: sequence restarts at 1
            ch.send(b"alive")
            assert ch.receive(timeout=T).data == b"ALIVE"  # odd channel: upper-cased
        assert "chan 5: peer gone" in echo_sim.stderr()


def test_wrong_abi_version_is_refused(
    echo_sim: KupSim, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Device.open(echo_sim.device_path("echo")) as dev:
        monkeypatch.setenv("KUP_TEST_ABI_VERSION", "2")  # libkup's test hook
        with pytest.raises(VersionMismatch, match="EKU_VERSION"):
            dev.channel(0)
        assert dev.info().attached == ()
        monkeypatch.delenv("KUP_TEST_ABI_VERSION")
        with dev.channel(0) as ch:
            opened(ch)


# --- idle CPU ------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of pid, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # after the ")" the fields are numbered from 3 (state); utime=14, stime=15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


_WAITER = textwrap.dedent(
    """
    import sys
    from kupd.channel import Device
    dev = Device.open(sys.argv[1])
    ch = dev.channel(0)
    ch.receive(timeout=10)
    ch.send(b"!hold")         # an idle channel: echo never answers
    print("ready", flush=True)
    ch.receive()              # blocked here until killed
    """
)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_blocked_receiver_uses_no_cpu(echo_sim: KupSim) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [sys.executable, "-c", _WAITER, echo_sim.device_path("echo")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        c0, w0 = _cpu_seconds(proc.pid), time.monotonic()
        k0 = _cpu_seconds(echo_sim.pid)
        time.sleep(1.0)
        c1, w1 = _cpu_seconds(proc.pid), time.monotonic()
        k1 = _cpu_seconds(echo_sim.pid)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    finally:
        proc.kill()
        proc.communicate(timeout=T)
    interval = w1 - w0
    user_share, kernel_share = (c1 - c0) / interval, (k1 - k0) / interval
    print(f"over {interval:.2f}s: waiter {user_share:.1%} CPU, kupsim {kernel_share:.1%} CPU")
    assert user_share < 0.05, f"blocked receiver used {user_share:.1%} of a CPU"
    assert kernel_share < 0.05, f"kupsim used {kernel_share:.1%} of a CPU"


def test_idle_kernel_waiter_uses_no_cpu(echo_sim: KupSim) -> None:
    """The user holds the turn and does nothing: echo's worker is blocked in
    kupdev_receive_msg; kupsim must sleep, not spin."""
    with Device.open(echo_sim.device_path("echo")) as dev, dev.channel(0) as ch:
        opened(ch)
        ch.send(b"x")
        ch.receive(timeout=T)  # the worker is now waiting for our next message
        k0, w0 = _cpu_seconds(echo_sim.pid), time.monotonic()
        time.sleep(1.0)
        k1, w1 = _cpu_seconds(echo_sim.pid), time.monotonic()
    share = (k1 - k0) / (w1 - w0)
    print(f"kupsim with one idle kernel-side waiter: {share:.1%} CPU")
    assert share < 0.05, f"kupsim used {share:.1%} of a CPU while its worker waited"


def test_a_handle_of_a_kupsim_that_restarted_stays_shut_down(tmp_path: Path) -> None:
    """A device handle is one kupsim instance.  After a restart in the same
    run directory its info() said Shutdown for good while channel() quietly
    attached through the same path to the new kupsim -- half of one handle on
    each instance.  Now every call on the old handle says Shutdown, and
    opening the device again reaches the new one."""
    run = tmp_path / "run"
    with kupsim("echo", rundir=run) as first:
        dev = Device.open(first.device_path("echo"))
        with dev.channel(0) as ch:
            ch.receive(timeout=10)
    try:
        with kupsim("echo", rundir=run) as second:
            with pytest.raises(Shutdown):
                dev.info()
            with pytest.raises(Shutdown):
                dev.channel(1)
            with pytest.raises(Shutdown):
                dev.event_fd()
            with Device.open(second.device_path("echo")) as again, again.channel(1) as ch:
                assert ch.receive(timeout=10).kind.name == "PASS"
    finally:
        dev.close()


# --- file descriptors ----------------------------------------------------------


def test_out_of_file_descriptors_is_resource_exhausted(echo_sim: KupSim) -> None:
    """A process at its descriptor limit cannot receive a channel's
    descriptors from kupsim: that is its own shortage -- ResourceExhausted
    saying so -- not kupsim breaking the protocol (EKU_PROTO, as it was)."""
    script = textwrap.dedent(
        """
        import resource, sys
        from kupd.channel import Device
        from kupd.errors import KupError
        dev = Device.open(sys.argv[1])
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))
        held = []
        try:
            for _ in range(64):
                held.append(dev.channel())
        except KupError as exc:
            print(type(exc).__name__, len(held), exc, flush=True)
        for ch in held:
            ch.close()
        held.append(dev.channel())  # descriptors back: attaching works again
        print("again", flush=True)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(echo_sim.device_path("echo"))],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert out.returncode == 0, out.stderr
    first, again = out.stdout.splitlines()
    assert first.startswith("ResourceExhausted "), first
    assert "run out of file descriptors" in first, first
    assert int(first.split()[1]) > 0, first
    assert again == "again"


def test_close_during_a_large_nonblocking_receive_is_carried_out() -> None:
    """try_receive copies a large message (>= 64 KiB) out with the GIL
    released.  A close() from another thread that lands in that copy must
    still release the channel: before, the receive cleared the claim
    without looking at the close it recorded, so .closed said True while
    the channel stayed attached (every other user got Busy)."""
    from kupd.errors import InvalidArgument

    env = {"KUP_PARAM_ECHO_CHANNELS": "2", "KUP_PARAM_ECHO_PAGES": "1024"}
    with kupsim("echo", env=env) as sim, Device.open(sim.device_path("echo")) as dev:
        payload = b"x" * (dev.info().max_msg // 2)
        for _ in range(50):
            ch = channel_when_free(dev, 0)
            opened(ch)
            ch.send(payload)
            deadline = time.monotonic() + T
            while not ch.my_turn():
                assert time.monotonic() < deadline, "echo never answered"
                time.sleep(0.001)
            stop = threading.Event()
            hit: list[bool] = []

            def closer(
                ch: Channel = ch, stop: threading.Event = stop, hit: list[bool] = hit
            ) -> None:
                # spins on the GIL: it runs as soon as the copy lets go of it
                while not stop.is_set():
                    try:
                        ch.fileno()  # Busy while the channel is claimed
                    except Busy:
                        ch.close()
                        hit.append(True)
                        return

            t = threading.Thread(target=closer)
            t.start()
            try:
                got: object = ch.try_receive()
            except InvalidArgument as e:
                got = e
            stop.set()
            t.join(T)
            assert not t.is_alive()
            if not hit:  # the close came after the receive: try again
                ch.close()
                continue
            assert isinstance(got, InvalidArgument), got
            assert "closed by another thread" in str(got)
            assert ch.closed
            deadline = time.monotonic() + T
            while 0 in dev.info().attached:
                assert time.monotonic() < deadline, "the closed channel stayed attached"
                time.sleep(0.01)
            channel_when_free(dev, 0).close()  # and the next user gets it
            return
        pytest.fail("the close never landed inside the copy in 50 tries")
