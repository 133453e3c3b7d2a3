"""A sync RPC interrupted anywhere in the client -- also while gRPC starts
it -- loses nothing, leaves no lease behind, and hangs nothing.

An interrupt (a signal handler that raises: Ctrl-C) in the middle of gRPC's
start of a call it manages (``.future()``: grpc._channel's ``create``
registers the call with the channel, then counts it and starts the thread
that polls for it) left a call no thread polled for: the client's
``close()`` then waited for it for ever (py-spy: ``Channel._close`` in
``Condition.wait``), and a later RPC's future never completed.  kupclient
now starts the main thread's RPCs on a thread of its own, where no signal
handler runs (kupclient._start).

The walk also lands an interrupt just after ``Condition.wait`` let go of
its lock and before its ``try``/``finally`` (in ``Thread.start``'s wait,
when the first RPC starts kupclient's starter thread): CPython then raises
``RuntimeError: release unlocked lock`` from the ``with`` around it, the
interrupt as its context.  The program must see its KeyboardInterrupt.

The walk also found the next hazard: an interrupt just as ``with`` took
gRPC's condition in ``future.result()`` (``Condition.__enter__`` returns
the lock's ``__enter__()``: CPython runs the handler after that call, and
the ``with`` never calls ``__exit__``) left the lock held by the main
thread, and gRPC's polling thread waited on it for ever.  kupclient now
waits for a bare lock that a done-callback releases, and asks the future
only once it has completed.

The same walk covers gRPC's blocking unary call (it took the channel's
lock in a ``with``: the main thread's unary calls now go as the owed ones,
kupclient._start.unary; so do kupclient.admin's, whose next call from
another thread hung after one such interrupt),
the start of a Session's stream and of a watch (managed calls, as a
future), the whole of a Session channel's open (the stream's cancel was
registered only after the stream had started: an interrupt in between
left it and its request thread for the life of the process), a
Session operation's wait for its reply (gRPC's ``next()``: the
responses are now read by a thread of their own), the main thread's
cancel of a live stream (through the starter thread) and the client's
``close()`` with a Session open, called again after the interrupt (it
finishes what the first began; gRPC's close of its channel runs on the
starter thread), and the asyncio client's ``close()`` likewise (its loop
run by ``run_until_complete``, which an interrupt leaves open), and an
``AsyncChannel``'s, called again from its own loop or from another.

Deterministic, no timing: a child process (a fresh client for each point,
so that each RPC is its channel's first and gRPC starts its polling thread
for it) walks every point of ``Client._unary_owed`` that the main thread
runs where CPython 3.11 runs a signal handler -- the start of a Python
function, the return from a call into C, a lock's blocking acquire --
counted with ``sys.setprofile`` in ``_unary_owed`` and all it calls, gRPC's
and CPython's threading code included, and at the Nth signals itself; the
handler raises KeyboardInterrupt.  For an ``attach``: no lease is left (the
channel is free once the client has closed); for a ``lease_receive`` of an
echo: the echo comes back exactly once, from that receive or the next, and
no other message after it; for ``devices()`` and a ``lease_send`` (gRPC's
blocking unary call, before): no lease left; and every time the client's
next RPCs -- one that gRPC's polling thread completes among them -- and
its ``close()`` return.  Each point prints a line; the test fails, with the
child's stacks (py-spy), when the child stops making progress, and with its
output when an interrupt surfaced as anything but KeyboardInterrupt.
"""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
from gateway_helpers import StartKupd

from kupapi import kup_pb2
from kupclient import Client
from kupd.testing import Kupd, KupSim

#: no progress for this long: the child hangs (a bound on a hang, not a timing)
STUCK = 60.0

CHILD = r'''
import asyncio, gc, linecache, signal, sys, threading, time
from kupapi import kup_pb2
from kupclient import AsyncClient, Client, EventType, Kind
from kupclient import admin as admin_mod, aio as aio_mod, client as client_mod
from kupd import errors

SOCKET, OP = sys.argv[1], sys.argv[2]
ADMIN = sys.argv[3] if len(sys.argv) > 3 else ""
MAIN = threading.get_ident()
#: the client's function whose points (and all it calls) are walked
WALKED = {
    "attach": client_mod.Client._unary_owed,
    "receive": client_mod.Client._unary_owed,
    "devices": client_mod.Client._unary,  # gRPC's blocking unary call
    "send": client_mod.Client._unary,
    "session": client_mod._start_session,  # a Session stream's start
    "open": client_mod.Channel.__init__,  # a Session channel's open, all of it
    "watch": client_mod.Client.watch,
    "watch-next": client_mod.Watch.__next__,  # iterating a watch, its event there
    "watch-wait": client_mod.Watch.__next__,  # the same, waiting for its event
    "exchange": client_mod.Channel._op,  # a Session operation, its wait included
    "close": client_mod.Channel.close,  # its end
    "abort": client_mod.Channel._abort,  # a live stream cancelled (Client.close)
    "client-close": client_mod.Client.close,  # the client's end, a Session open
    "admin": admin_mod.AdminClient._unary,  # an admin call (gRPC's blocking call, before)
    "admin-close": admin_mod.AdminClient.close,  # the admin client's end
    "aio-close": aio_mod.AsyncClient.close,  # the asyncio client's end, a Session open
    # an AsyncChannel's close(), idle and with an operation waiting on it
    "aio-channel-close": aio_mod.AsyncChannel.close,
    "aio-channel-close-busy": aio_mod.AsyncChannel.close,
    # the same, closed again from another event loop (_cancel_dropped)
    "aio-channel-close-busy-elsewhere": aio_mod.AsyncChannel.close,
}[OP].__code__


def interrupt(signum, frame):
    raise KeyboardInterrupt


def profiler(n, fired):
    """Signal the main thread at the nth point inside WALKED where
    CPython 3.11 runs a signal handler: a Python function's start (RESUME),
    just after a call into C returns (CALL), and a lock's acquire that
    blocks (a signal while it waits: the lock not taken).  (Not any line:
    between a ``with`` body and its ``__exit__`` a handler never runs.)"""
    count = [0]
    depth = [0]

    def prof(frame, event, arg):
        if frame.f_code is WALKED:
            depth[0] = 1 if event != "return" else 0
        if not depth[0] or event not in ("call", "c_call", "c_return"):
            return
        if event == "c_call" and not getattr(arg, "__name__", "") == "acquire":
            return
        count[0] += 1
        if count[0] == n:
            what = getattr(arg, "__qualname__", "") if event != "call" else frame.f_code.co_name
            where = frame.f_code.co_filename.rsplit("/", 1)[-1]
            fired.append(f"{where}:{frame.f_lineno} {event} {what}")
            signal.pthread_kill(MAIN, signal.SIGALRM)

    return prof


def traced(n, op):
    """op() with the nth point interrupted: (fired where, outcome)."""
    fired = []
    sys.setprofile(profiler(n, fired))
    try:
        try:
            return fired, ("ok", op())
        finally:
            sys.setprofile(None)
    except KeyboardInterrupt:
        return fired, ("interrupted", None)
    except BaseException as exc:
        return fired, ("raised", exc)


def channels_busy(direct):
    return [ch.id for ch in direct.devices("echo")[0].channels if ch.state not in ("free", "calls")]


def request_threads():
    """Threads waiting in a Session's request stream (gRPC's, for each
    stream not yet ended)."""
    code = client_mod._requests_of.__code__
    found = []
    for ident, frame in sys._current_frames().items():
        while frame is not None and frame.f_code is not code:
            frame = frame.f_back
        if frame is not None:
            found.append(ident)
    return found


def _wait_none(threads, what):
    for _ in range(2000):
        if not threads():
            return
        time.sleep(0.01)
    raise AssertionError(f"{what}: {threads()}")


def wait_no_request_thread():
    _wait_none(request_threads, "a Session's request thread was left waiting")


def watch_threads():
    return [t for t in threading.enumerate() if t.name == "kupclient-watch"]


def wait_no_watch_thread():
    _wait_none(watch_threads, "a watch's reader thread was left")


def waiting_for_event():
    """Whether the main thread waits in a watch's next() for its event."""
    frame = sys._current_frames().get(MAIN)
    return frame is not None and frame.f_code is client_mod._Responses.__next__.__code__ and (
        "acquire" in linecache.getline(frame.f_code.co_filename, frame.f_lineno))


def wait_free(direct):
    for _ in range(2000):
        if not channels_busy(direct):
            return
        time.sleep(0.01)
    raise AssertionError(f"a lease was left behind: channels {channels_busy(direct)} busy")


def exchange_written(task):
    """Whether ``task`` (an AsyncChannel's exchange) has written its
    request and waits for the reply (its ``_op``'s ``written``)."""
    coro = task.get_coro()
    while coro is not None:
        frame = getattr(coro, "cr_frame", None)
        if frame is not None and frame.f_code is aio_mod.AsyncChannel._op.__code__:
            return frame.f_locals.get("written", False)
        coro = getattr(coro, "cr_await", None)
    return False


signal.signal(signal.SIGALRM, interrupt)
direct = Client(SOCKET)
lease = None
if OP == "receive":
    lease = direct.attach("echo")
    assert direct.lease_receive(lease.lease_id, timeout=30).kind == Kind.PASS
if OP == "open":
    # the Session watchdog's thread kept running through the walk of a
    # channel's open: one that ended between two points (its last channel
    # gone) would make the next open start it, and so the points move
    # under the walk (test_the_watchdog_runs_whatever_interrupts_its_start
    # walks that start)
    class Idle:
        def _watch(self, now):
            pass

    idle = Idle()
    client_mod._WATCHDOG.track(idle)
LOOP = asyncio.new_event_loop()
#: another event loop, of this thread: an AsyncChannel's close() from there
ELSEWHERE = asyncio.new_event_loop()
#: the Session's channel in the walk of Client.close: one not in the Call pool
CLOSE_CHANNEL = [ch.id for ch in direct.devices("echo")[0].channels if ch.state == "free"][0]
n = 0
while True:
    n += 1
    with Client(SOCKET) as c:
        if OP == "attach":
            fired, (kind, what) = traced(n, lambda: c.attach("echo"))
            if kind == "ok":
                c.release(what.lease_id)
        elif OP == "devices":
            fired, (kind, what) = traced(n, lambda: c.devices("echo"))
        elif OP == "send":
            # a lease of its own for each point: whether an interrupted
            # send went out is not asked, only that nothing hangs
            held = direct.attach("echo")
            fired, (kind, what) = traced(n, lambda: c.lease_send(held.lease_id, b"x"))
            direct.release(held.lease_id)
        elif OP == "session":
            fired, (kind, what) = traced(n, lambda: c.open("echo").channel())
            if kind == "ok":
                assert what.receive(timeout=30).kind == Kind.PASS, what  # it runs
                what.close()
        elif OP == "open":
            h = c.open("echo")
            fired, (kind, what) = traced(n, lambda: h.channel())
            if kind == "ok":
                assert what.receive(timeout=30).kind == Kind.PASS
                what.close()
            what = None
            # the client still open: an open interrupted anywhere leaves no
            # stream behind once its Channel, never returned, is collected
            gc.collect()
            wait_free(direct)
            wait_no_request_thread()
        elif OP == "exchange":
            ch = c.open("echo").channel()
            assert ch.receive(timeout=30).kind == Kind.PASS
            data = f"!stamp0-msg-{n:04d}-".encode() + bytes(8)
            fired, (kind, what) = traced(n, lambda: ch.exchange(data, timeout=30))
            if kind == "ok":
                assert what.data[:-8].upper() == data[:-8].upper(), (n, fired, what)
            ch.close()  # interrupted: the session had ended (its reply owed)
        elif OP in ("close", "abort"):
            ch = c.open("echo").channel()
            assert ch.receive(timeout=30).kind == Kind.PASS
            fired, (kind, what) = traced(n, ch.close if OP == "close" else ch._abort)
            ch.close()  # whatever the interrupt left
            # done by then, the client still open: its close() would cancel
            # every stream
            wait_free(direct)
            wait_no_request_thread()
        elif OP == "client-close":
            ch = c.open("echo").channel(CLOSE_CHANNEL)
            assert ch.receive(timeout=30).kind == Kind.PASS
            fired, (kind, what) = traced(n, c.close)
            c.close()  # again: it finishes what the interrupted one began
            # free while the Channel is still referenced (ch: its finalizer
            # does not run) and the process lives on; and the stream's
            # request thread has ended
            wait_free(direct)
            wait_no_request_thread()
            if kind == "raised":
                print(f"point {n} {fired}: raised {what!r}", flush=True)
                sys.exit(1)
            print(f"point {n} {fired}: {kind}", flush=True)
            if not fired:
                break
            continue
        elif OP == "aio-close":
            # in a loop that the interrupt leaves open (asyncio.run closes
            # its loop on one; run_until_complete lets it propagate)
            ac = AsyncClient(SOCKET)

            async def opened():
                ch = await (await ac.open("echo")).channel(CLOSE_CHANNEL)
                assert (await ch.receive(timeout=30)).kind == Kind.PASS
                return ch

            ach = LOOP.run_until_complete(opened())
            grpc_channel = ac._grpc
            fired, (kind, what) = traced(n, lambda: LOOP.run_until_complete(ac.close()))
            # again: it finishes what the interrupted one began
            LOOP.run_until_complete(ac.close())
            # free while the AsyncChannel is still referenced (ach: its
            # finalizer does not run) and the process lives on; and gRPC's
            # channel closed, not left to the collector
            wait_free(direct)
            assert grpc_channel._channel.closed(), f"point {n}: gRPC's channel is open"
            if kind == "raised":
                print(f"point {n} {fired}: raised {what!r}", flush=True)
                sys.exit(1)
            print(f"point {n} {fired}: {kind}", flush=True)
            if not fired:
                break
            continue
        elif OP in ("aio-channel-close", "aio-channel-close-busy",
                    "aio-channel-close-busy-elsewhere"):
            ac = AsyncClient(SOCKET)

            async def opened():
                ch = await (await ac.open("echo")).channel(CLOSE_CHANNEL)
                assert (await ch.receive(timeout=30)).kind == Kind.PASS
                return ch

            ach = LOOP.run_until_complete(opened())
            waiter = None
            if OP != "aio-channel-close":
                # an exchange kupd never answers, its request written: the
                # close() cancels the stream under it
                waiter = LOOP.create_task(ach.exchange(b"!hold", timeout=30))
                while not exchange_written(waiter):
                    LOOP.run_until_complete(asyncio.sleep(0.01))
            fired, (kind, what) = traced(n, lambda: LOOP.run_until_complete(ach.close()))
            # again: it finishes what the interrupted one began
            if OP == "aio-channel-close-busy-elsewhere":
                # from another loop: the cancel is handed to the channel's
                # loop, which runs on
                ELSEWHERE.run_until_complete(ach.close())
                LOOP.run_until_complete(asyncio.sleep(0))
            else:
                LOOP.run_until_complete(ach.close())
            # free while the client and the AsyncChannel (ach: its finalizer
            # does not run) are still there and the process lives on
            wait_free(direct)
            if waiter is not None:
                LOOP.run_until_complete(asyncio.wait([waiter]))
                exc = waiter.exception()
                assert isinstance(exc, errors.InvalidArgument), f"point {n}: {exc!r}"
            LOOP.run_until_complete(ac.close())
            if kind == "raised":
                print(f"point {n} {fired}: raised {what!r}", flush=True)
                sys.exit(1)
            print(f"point {n} {fired}: {kind}", flush=True)
            if not fired:
                break
            continue
        elif OP == "admin-close":
            a = admin_mod.AdminClient(ADMIN)
            a.list_leases()
            fired, (kind, what) = traced(n, a.close)
            a.close()  # again: it returns, gRPC's channel closed
            # and a call from another thread fails at once, as a closed
            # Client's; so does gRPC's blocking call there, which the
            # client no longer reaches once closed: it takes the channel's
            # lock to see it closed (an interrupt that left it held hung it)
            other = []

            def late():
                try:
                    a.list_leases()
                except errors.InvalidArgument as exc:
                    other.append(exc)
                try:
                    a._stub.ListLeases(kup_pb2.ListLeasesRequest(), timeout=30)
                except ValueError as exc:
                    other.append(exc)

            t = threading.Thread(target=late)
            t.start()
            t.join()
            assert len(other) == 2, f"point {n}: a call after close() did not fail: {other}"
            assert str(other[0]) == f"client of {ADMIN} is closed", other[0]
        elif OP == "admin":
            with admin_mod.AdminClient(ADMIN) as a:
                fired, (kind, what) = traced(n, lambda: a.metrics("kupd_"))
                # the admin client's next call from another thread: gRPC's
                # blocking call there takes the channel's lock
                other = []
                t = threading.Thread(target=lambda: other.append(a.list_leases()))
                t.start()
                t.join()
                assert other, f"point {n}: the other thread's list_leases failed"
                a.list_leases()  # and the main thread's
        elif OP == "watch":
            fired, (kind, what) = traced(n, lambda: c.watch("echo", initial_state=True))
            if kind == "ok":
                assert next(what).initial  # it runs
                what.cancel()
        elif OP in ("watch-next", "watch-wait"):
            w = c.watch("echo", initial_state=True)
            assert next(w).initial  # subscribed: every later event comes
            if OP == "watch-next":
                held = direct.attach("echo")  # the event there before next()
                fired, (kind, what) = traced(n, lambda: next(w))
            else:
                # the event made once next() waits for it (or was interrupted
                # before it got there)
                made, walked = [], threading.Event()

                def make():
                    while not walked.is_set() and not waiting_for_event():
                        time.sleep(0.001)
                    made.append(direct.attach("echo"))

                t = threading.Thread(target=make)
                t.start()
                fired, (kind, what) = traced(n, lambda: next(w))
                walked.set()
                t.join()
                held = made[0]
            got = what if kind == "ok" else next(w)
            while got.initial:
                got = next(w)
            # the event the interrupt landed on is not lost, and comes once
            taken = (EventType.LEASE_TAKEN, held.lease_id)
            assert (got.type, got.lease_id) == taken, (n, fired, got)
            direct.release(held.lease_id)
            got = next(w)  # the watch goes on
            released = (EventType.LEASE_RELEASED, held.lease_id)
            assert (got.type, got.lease_id) == released, (n, fired, got)
            w.cancel()
            for _ in w:  # it ends, quietly
                pass
            wait_no_watch_thread()  # its reader ended with it
        else:
            data = f"!stamp0-msg-{n:04d}-".encode() + bytes(8)
            c.lease_send(lease.lease_id, data)
            fired, (kind, what) = traced(n, lambda: c.lease_receive(lease.lease_id, timeout=30))
            got = what if kind == "ok" else c.lease_receive(lease.lease_id, timeout=30)
            assert got.data[:-8].upper() == data[:-8].upper(), (n, fired, got)
            # nothing more: the echo came once
            try:
                extra = c.lease_receive(lease.lease_id, timeout=0)
            except (errors.NotReady, errors.NotYourTurn):
                pass
            else:
                raise AssertionError(f"point {n}: a second message {extra}")
        c.devices()  # the client's next RPC completes
        # and so does one that gRPC's polling thread completes (an
        # interrupt that left gRPC's channel lock held blocks that thread)
        c.release(c.attach("echo").lease_id)
    # close() returned: with no lease left over
    if OP in ("attach", "send", "session", "open", "exchange", "close", "abort"):
        wait_free(direct)
    if kind == "raised":
        print(f"point {n} {fired}: raised {type(what).__name__}: {what} "
              f"(context {what.__context__!r})", flush=True)
        sys.exit(1)
    print(f"point {n} {fired}: {kind}", flush=True)
    if not fired:
        break
print("done", flush=True)
'''


def _stacks(pid: int) -> str:
    spy = Path(sys.prefix) / "bin" / "py-spy"
    out = subprocess.run(
        [str(spy), "dump", "--native", "--pid", str(pid)],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout + out.stderr


def _walk(kupd: Kupd, op: str, *args: str) -> list[str]:
    """Run the child's walk of ``op`` (``args``: the admin socket); its
    lines.  Fails with its stacks when it stops making progress, with its
    output when it fails."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, kupd.socket, op, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONFAULTHANDLER": "1"},
    )
    assert child.stdout is not None
    lines: list[str] = []
    sel = selectors.DefaultSelector()
    sel.register(child.stdout, selectors.EVENT_READ)
    try:
        while True:
            if not sel.select(STUCK):
                stacks = _stacks(child.pid)
                raise AssertionError(f"{op}: the client hangs after {lines[-1:]}:\n{stacks}")
            line = child.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
    finally:
        sel.close()
        if child.poll() is None:
            child.kill()
        child.wait()
        child.stdout.close()
    assert child.returncode == 0 and lines[-1:] == ["done"], "\n".join(lines[-40:])
    return lines


def test_an_attach_interrupted_at_any_point_leaves_no_lease_and_no_hang(
    kupd: Kupd, client: Client
) -> None:
    lines = _walk(kupd, "attach")
    assert any(line.endswith(": interrupted") for line in lines)
    busy = [c.id for c in client.devices("echo")[0].channels if c.state not in ("free", "calls")]
    assert not busy, f"channels {busy} still held"


def test_a_receive_interrupted_at_any_point_loses_no_message_and_no_hang(kupd: Kupd) -> None:
    lines = _walk(kupd, "receive")
    assert any(line.endswith(": interrupted") for line in lines)


class _RaisingFuture:
    """A completed future whose first ``result()`` raises what CPython makes
    of an interrupt in the window of ``Condition.wait`` (Lib/threading.py
    3.11, lines 323-325: the lock let go, the ``try`` that takes it back not
    yet entered; the ``with`` around the wait then fails to release it):
    ``RuntimeError`` with the interrupt as ``__context__``.  A stand-in, not
    a real gRPC future, only because the real race cannot be forced on
    demand: kupclient no longer waits in ``result()`` from the main thread
    (it asks a completed future), and a thread other than the main one gets
    no signals.  Later calls return ``answer`` (it had completed)."""

    def __init__(self, context: BaseException, answer: object) -> None:
        self._context = context
        self._answer = answer
        self._raised = False

    def add_done_callback(self, fn: Callable[[object], object]) -> None:
        fn(self)  # completed

    def cancel(self) -> bool:
        return False  # completed

    def result(self, timeout: float | None = None) -> object:
        if self._raised:
            return self._answer
        self._raised = True
        try:
            raise self._context
        except BaseException:
            raise RuntimeError("cannot release un-acquired lock")  # noqa: B904 (as CPython)


def _receive_with(tmp_path: Path, fut: _RaisingFuture) -> Client:
    """A client (never connected) whose Receive RPC is ``fut``."""
    c = Client(tmp_path / "none.sock")
    c._stub = SimpleNamespace(Receive=SimpleNamespace(future=lambda req, timeout: fut))
    return c


def test_an_interrupt_turned_into_runtimeerror_in_result_is_raised_as_itself(
    tmp_path: Path,
) -> None:
    interrupt = KeyboardInterrupt()
    answer = kup_pb2.ReceiveResponse(not_ready=True)
    with _receive_with(tmp_path, _RaisingFuture(interrupt, answer)) as c:
        with pytest.raises(KeyboardInterrupt) as raised:
            c.lease_receive("lease-1", timeout=5)
        assert raised.value is interrupt
        assert raised.value.__context__ is None  # not the RuntimeError
        # given up on as any interrupt: the next receive asks again for it
        assert c._again.pending("lease-1") != ""


def test_a_runtimeerror_from_an_exception_stays_a_runtimeerror(tmp_path: Path) -> None:
    """Only an interrupt's shape (the context not an Exception) is undone:
    a RuntimeError in the middle of handling an ordinary error is kept."""
    answer = kup_pb2.ReceiveResponse(not_ready=True)
    with _receive_with(tmp_path, _RaisingFuture(ValueError("x"), answer)) as c:
        with pytest.raises(RuntimeError, match="un-acquired"):
            c.lease_receive("lease-1", timeout=5)


#: The Session watchdog's thread, started under an interrupt at every point
#: of ``_Watchdog.track`` where a handler runs; then tracked again, as the
#: next Channel would be: the thread must be running.
WATCHDOG_WALK = r"""
import signal, sys, threading
from kupclient import client as client_mod

MAIN = threading.get_ident()
TRACK = client_mod._Watchdog.track.__code__


class Chan:
    def _watch(self, now):
        pass


def interrupt(signum, frame):
    raise KeyboardInterrupt


signal.signal(signal.SIGALRM, interrupt)
keep = []
n = 0
while True:
    n += 1
    dog = client_mod._Watchdog()
    count = [0]
    depth = [0]

    def prof(frame, event, arg):
        if frame.f_code is TRACK:
            depth[0] = 0 if event == "return" else 1
        if not depth[0] or event not in ("call", "c_call", "c_return"):
            return
        if event == "c_call" and getattr(arg, "__name__", "") != "acquire":
            return
        count[0] += 1
        if count[0] == n:
            signal.pthread_kill(MAIN, signal.SIGALRM)

    ch = Chan()
    keep.append(ch)
    sys.setprofile(prof)
    try:
        try:
            dog.track(ch)
        finally:
            sys.setprofile(None)
    except KeyboardInterrupt:
        pass
    dog.track(ch)  # the next Channel
    t = dog._thread
    assert t is not None and t.is_alive(), f"point {n}: no watchdog thread runs ({t})"
    if count[0] < n:
        break
print("done", n)
"""


def test_the_watchdog_runs_whatever_interrupts_its_start() -> None:
    """``_Watchdog.track`` starts its thread in the main thread (a Channel
    opened there): an interrupt inside ``Thread.start`` before the thread
    existed left ``_thread`` set and no thread, and no later Channel
    started one -- no Session operation was bounded in that process."""
    run = subprocess.run(
        [sys.executable, "-c", WATCHDOG_WALK],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0 and run.stdout.startswith("done"), run.stderr[-2000:]


@pytest.mark.parametrize("op", ["devices", "send"])
def test_a_blocking_unary_call_interrupted_at_any_point_hangs_nothing(
    kupd: Kupd, client: Client, op: str
) -> None:
    """A unary call (``devices()``, ``lease_send`` and the others through
    ``Client._unary``) interrupted anywhere leaves nothing that hangs.

    gRPC's blocking call (a ``segregated_call``, its completion queue
    polled by the caller) registers its call inside cygrpc's ``with`` on
    the channel's condition; interrupted just as ``Condition.__enter__``
    took the lock, the ``with`` never released it: the main thread held
    it for good, and the next call completed by gRPC's polling thread (the
    attach after the traced call) waited for ever (py-spy: the starter in
    ``_channel_managed_call_management.create``, in ``Condition.__enter__``).
    The main thread's unary calls now go as ``_unary_owed``'s."""
    lines = _walk(kupd, op)
    assert any(line.endswith(": interrupted") for line in lines)
    busy = [c.id for c in client.devices("echo")[0].channels if c.state not in ("free", "calls")]
    assert not busy, f"channels {busy} still held"


def test_a_channel_open_interrupted_at_any_point_leaves_no_stream(
    kupd: Kupd, client: Client
) -> None:
    """``open(...).channel()`` interrupted anywhere in ``Channel.__init__``
    -- the stream's start, the Session's attach and what comes between --
    leaves no lease and no Session request thread once the Channel, never
    returned to the caller, is collected, while the client stays open.  The
    stream's cancel (a ``weakref.finalize``) was registered only after the
    stream had started: interrupted in between, nothing cancelled that
    stream, and its request thread waited until the process ended (gRPC's
    close of the channel, the client's close(), does not end it)."""
    lines = _walk(kupd, "open")
    assert any(line.endswith(": interrupted") for line in lines)
    busy = [c.id for c in client.devices("echo")[0].channels if c.state not in ("free", "calls")]
    assert not busy, f"channels {busy} still held"


@pytest.mark.parametrize("op", ["session", "watch"])
def test_a_stream_interrupted_at_any_point_of_its_start_hangs_nothing(
    kupd: Kupd, client: Client, op: str
) -> None:
    """A Session channel's stream (``open(...).channel()``) or ``watch()``
    interrupted anywhere in its start leaves no lease and nothing that
    hangs.  gRPC manages both (``_channel_managed_call_management``): an
    interrupt between the call's registration and its count left a call
    no thread polled for, and the client's ``close()`` waited for it for
    ever; they are now started on the starter thread.  (Only the start is
    walked here: a watch's ``next()`` is walked by
    test_iterating_a_watch_interrupted_at_any_point_loses_no_event_and_hangs_nothing.)"""
    lines = _walk(kupd, op)
    assert any(line.endswith(": interrupted") for line in lines)
    busy = [c.id for c in client.devices("echo")[0].channels if c.state not in ("free", "calls")]
    assert not busy, f"channels {busy} still held"


@pytest.mark.parametrize("op", ["watch-next", "watch-wait"])
def test_iterating_a_watch_interrupted_at_any_point_loses_no_event_and_hangs_nothing(
    kupd: Kupd, op: str
) -> None:
    """``next()`` of a watch in the main thread, interrupted anywhere --
    its wait for the event included: the event comes with the next
    ``next()``, once, the watch goes on, and nothing hangs.  It used to
    wait in gRPC's ``next()`` on the stream, whose ``with`` on the call's
    condition, interrupted just as it took the lock, left the lock held
    by the main thread: gRPC's polling thread, and every call of the
    client after it, waited for ever.  The events are now read by a
    thread of their own (``_Responses``, bounded), which ends with the
    watch's ``cancel()``."""
    lines = _walk(kupd, op)
    assert any(line.endswith(": interrupted") for line in lines)


@pytest.mark.parametrize("op", ["exchange", "close", "abort"])
def test_a_session_operation_interrupted_at_any_point_hangs_nothing(
    kupd: Kupd, client: Client, op: str
) -> None:
    """A Session operation interrupted anywhere -- its wait for the reply
    included -- ends the session and leaves no lease and nothing that
    hangs.  Its wait used to be gRPC's ``next()`` on the stream, whose
    ``with`` on the call's condition, interrupted just as it took the
    lock, left the lock held by the main thread: gRPC's polling thread
    then waited on it for ever, and every call after it with it.  The
    responses are now read by a thread of their own (``_Responses``).
    The same ``with`` is in gRPC's cancel of the stream (the end of
    ``close()``, of an interrupted operation): the main thread's cancel
    goes through the starter thread.

    A channel's ``close()`` and its cancel, interrupted and the channel
    closed again, leave no lease and no request thread while the client
    stays open: the stream's cancel is a ``weakref.finalize``, which runs
    once -- it takes itself off weakref's registry first -- so an interrupt
    just after that left the stream open, the lease held until the
    client's close(), and the later close() did nothing (walk of
    ``Channel._abort``: point 3, the registry's ``dict.pop``)."""
    lines = _walk(kupd, op)
    assert any(line.endswith(": interrupted") for line in lines)
    busy = [c.id for c in client.devices("echo")[0].channels if c.state not in ("free", "calls")]
    assert not busy, f"channels {busy} still held"


def test_a_client_close_interrupted_at_any_point_is_finished_by_the_next(
    kupd: Kupd, client: Client
) -> None:
    """``Client.close()`` with a Session open, interrupted anywhere, then
    called again: the second one finishes what the first began -- the
    Session's stream cancelled, gRPC's channel closed -- so the channel is
    free while the program (and the Channel object) live on, and no
    Session request thread is left waiting.  The first close() used to
    mark the client closed before anything else, and the second then
    returned at once: interrupted before its sessions were cancelled
    (point 2 on), the lease stayed until the process ended.  And gRPC's
    close of its channel, run by the main thread, takes the channel's
    condition in a ``with``: interrupted just as the lock was taken
    (point 45, ``Condition.__enter__``), the next close() waited for ever;
    it is now run on the starter thread."""
    lines = _walk(kupd, "client-close")
    assert any(line.endswith(": interrupted") for line in lines)
    busy = [c.id for c in client.devices("echo")[0].channels if c.state not in ("free", "calls")]
    assert not busy, f"channels {busy} still held"


@pytest.mark.parametrize("op", ["admin", "admin-close"])
def test_an_admin_call_interrupted_at_any_point_hangs_nothing(
    sim: KupSim, start_kupd: StartKupd, tmp_path: Path, op: str
) -> None:
    """An AdminClient call (``metrics()``, as kupctl's ``metrics`` and
    ``top`` make) interrupted anywhere leaves nothing that hangs.  It was
    gRPC's blocking call, as the Client's unary calls were (see
    :func:`test_a_blocking_unary_call_interrupted_at_any_point_hangs_nothing`):
    interrupted just as it took the channel's lock in a ``with``, the main
    thread held the lock for good, and the admin client's next call from
    another thread waited for ever.  It now goes through
    ``kupclient._start.unary`` as the Client's do.

    The same for its ``close()``, which is gRPC's close of its channel,
    also taking that lock in a ``with`` (point 7): a call from another
    thread after it waited for ever instead of failing ("Cannot invoke RPC
    on closed channel!").  It now runs on the starter thread.  (A call on
    the closed client now fails before gRPC, as a Client's, InvalidArgument
    "client of PATH is closed": the walk also makes gRPC's own blocking
    call from that thread, to see the lock free.)"""
    admin = tmp_path / "admin.sock"
    cfg = tmp_path / "kupd-admin.toml"
    cfg.write_text(
        f'socket = "{tmp_path}/kupd.sock"\n'
        f'admin_socket = "{admin}"\n'
        f'kupsim_dir = "{sim.rundir}"\n'
        '[[device]]\nname = "echo"\ncall_channels = 4\n'
    )
    k = start_kupd(sim, "--config", str(cfg), devices=())
    lines = _walk(k, op, str(admin))
    assert any(line.endswith(": interrupted") for line in lines)


def test_an_async_client_close_interrupted_at_any_point_is_finished_by_the_next(
    kupd: Kupd, client: Client
) -> None:
    """``AsyncClient.close()`` with a Session open, interrupted anywhere (a
    KeyboardInterrupt that a signal handler raises in the loop's thread: a
    program's own handler, a second Ctrl-C), then called again: the second
    one finishes what the first began -- the Session's stream cancelled,
    gRPC's channel closed -- so the channel is free while the program (and
    the AsyncChannel object) live on.  The first close() used to mark the
    client closed before anything else and drop gRPC's channel before
    closing it, and the second then returned at once: interrupted before
    its sessions were cancelled, the lease stayed until the process ended;
    inside gRPC's close, the channel was left to the collector."""
    lines = _walk(kupd, "aio-close")
    assert any(line.endswith(": interrupted") for line in lines)
    busy = [c.id for c in client.devices("echo")[0].channels if c.state not in ("free", "calls")]
    assert not busy, f"channels {busy} still held"



@pytest.mark.parametrize(
    "op", ["aio-channel-close", "aio-channel-close-busy", "aio-channel-close-busy-elsewhere"]
)
def test_an_async_channel_close_interrupted_at_any_point_is_finished_by_the_next(
    kupd: Kupd, client: Client, op: str
) -> None:
    """``AsyncChannel.close()`` interrupted anywhere (a KeyboardInterrupt a
    signal handler raises in the loop's thread), idle or with an exchange
    waiting on the channel in another task, then called again: the channel
    is free at kupd while the client, the AsyncChannel and the process live
    on, and the waiting exchange fails "... was closed while the operation
    waited".  With an operation waiting, close() cancels the stream under
    it, and gRPC's cancel marks the call done before it cancels the call in
    gRPC's core: interrupted in between, the second close() -- seeing the
    channel closed -- called gRPC's cancel(), a no-op on a call marked done,
    and the stream went on, kupd holding the lease, for the life of the
    process.  It now asks the core's cancel again (``_cancel_under``).
    Called again from another event loop, close() hands the cancel to the
    channel's loop (``_cancel_dropped``), which skipped a call that looked
    done -- the same window, still open on that path; it hands over a call
    cancelled locally too."""
    lines = _walk(kupd, op)
    assert any(line.endswith(": interrupted") for line in lines)
    busy = [c.id for c in client.devices("echo")[0].channels if c.state not in ("free", "calls")]
    assert not busy, f"channels {busy} still held"
