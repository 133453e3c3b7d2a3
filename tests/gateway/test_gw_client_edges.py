"""kupclient at its edges, against a real kupd: a client closed while other
threads or tasks use it (or its channels) says so with one error,
InvalidArgument "client of PATH was closed while the operation waited" /
"... is closed" (a genuinely cancelled task still gets CancelledError); a
Session ended by the client itself (an operation cancelled, kupd not
answering within timeout + KUPD_GRACE) says why; a client inherited across
fork() fails at once in the child; and the public API (py.typed, the
exported errors, AsyncDeviceHandle as a context manager)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from gateway_helpers import Kupd, StartKupd, child_env

import kupclient
from kupclient import AsyncClient, Client, _start, _types
from kupclient import errors as kerrors
from kupclient.admin import AdminClient
from kupd import errors
from kupd.testing import REPO_ROOT, Background, KupSim, all_stopped, thread_frame, wait_until

BOUND = 5.0  # what must be prompt ends far below this
#: the grace past an operation's timeout, made short for the tests (a hung
#: kupd is then given up on after timeout + GRACE, not timeout + 5 s)
GRACE = 1.0


def _closed_msg(path: str) -> str:
    return rf"client of {re.escape(path)} (is closed|was closed while the operation waited)$"


def _state(c: Client, chan: int) -> str:
    return c.devices("echo")[0].channels[chan].state


def _in_rpc(t: threading.Thread) -> bool:
    """Whether thread ``t`` waits in an RPC of kupclient's Client._unary_owed
    (lease_receive, lease_exchange, attach; the wait is kupclient._start's
    ``unary``) that it has started (its future exists): past the check that
    would call the client closed already."""
    frame = thread_frame(t)
    while frame is not None:
        if frame.f_code is _start.unary.__code__ and "fut" in frame.f_locals:
            return True
        frame = frame.f_back
    return False


# -- 1. AsyncClient.close() under operations in flight -------------------------


def test_async_client_close_fails_calls_and_sessions_in_flight(kupd: Kupd) -> None:
    async def main() -> None:
        c = AsyncClient(kupd.socket)
        ch = await (await c.open("echo")).channel(30)
        await ch.receive(timeout=10)
        call = asyncio.create_task(c.call("echo", b"!delay", timeout=10))
        session = asyncio.create_task(ch.exchange(b"!hold", timeout=10))
        await asyncio.sleep(0.1)  # both wait in kupd (echo: 300 ms / never)
        await asyncio.wait_for(c.close(), BOUND)
        waited = f"client of {kupd.socket} was closed while the operation waited"
        with pytest.raises(errors.InvalidArgument, match=re.escape(waited)):
            await asyncio.wait_for(call, BOUND)
        with pytest.raises(
            errors.InvalidArgument, match="channel 30 of echo was closed while the operation"
        ):
            await asyncio.wait_for(session, BOUND)
        # started after close()
        with pytest.raises(errors.InvalidArgument, match=_closed_msg(kupd.socket)):
            await c.call("echo", b"x", timeout=1)
        with pytest.raises(errors.InvalidArgument, match=r"channel 30 of echo is closed$"):
            await ch.exchange(b"x", timeout=1)
        await ch.close()

    asyncio.run(main())
    with kupd.client() as c:
        wait_until(lambda: _state(c, 30) == "free", what="channel 30 released")


def test_async_client_close_leaves_a_real_cancel_a_cancel(kupd: Kupd) -> None:
    async def main() -> None:
        c = AsyncClient(kupd.socket)
        call = asyncio.create_task(c.call("echo", b"!delay", timeout=10))
        await asyncio.sleep(0.1)
        call.cancel()
        await c.close()
        with pytest.raises(asyncio.CancelledError):
            await call

    asyncio.run(main())


def test_async_channel_used_after_its_client_closed(kupd: Kupd) -> None:
    async def main() -> None:
        c = AsyncClient(kupd.socket)
        ch = await (await c.open("echo")).channel(31)
        await ch.receive(timeout=10)
        await c.close()
        with pytest.raises(errors.InvalidArgument, match=r"channel 31 of echo is closed$"):
            await ch.exchange(b"x", timeout=1)

    asyncio.run(main())


async def _race_close(c: AsyncClient, seen: list[BaseException]) -> None:
    """AsyncClient.close() among tasks calling, exchanging and opening channels."""

    async def caller() -> None:
        while True:
            await c.call("echo", b"x", timeout=5)

    async def session() -> None:
        ch = await (await c.open("echo")).channel()
        await ch.receive(timeout=5)
        while True:
            await ch.exchange(b"y", timeout=5)

    async def opener() -> None:
        while True:
            ch = await (await c.open("echo")).channel()
            await ch.close()

    async def record(coro: Any) -> None:
        try:
            await coro
        except BaseException as exc:
            seen.append(exc)

    tasks = [
        asyncio.create_task(record(f()))
        for f in [caller] * 4 + [session] * 3 + [opener] * 4
    ]
    await asyncio.sleep(0.4)
    await c.close()
    _, pending = await asyncio.wait(tasks, timeout=BOUND)
    assert not pending, f"{len(pending)} tasks still wait after close()"


def test_async_client_close_among_calls_sessions_and_opens(kupd: Kupd) -> None:
    """Tasks opening a channel when close() came hung (gRPC's write waited
    for metadata a cancelled call never sends) or got a raw CancelledError
    or gRPC's ExecuteBatchError from the channel's close()."""
    chan = r"(channel \d+ of|session on) echo (is closed|was closed while the operation waited)$"
    for _ in range(6):  # the hang came in about half the rounds
        seen: list[BaseException] = []
        asyncio.run(_race_close(AsyncClient(kupd.socket), seen))
        assert len(seen) == 11
        for exc in seen:
            assert isinstance(exc, errors.InvalidArgument), repr(exc)
            msg = str(exc)
            assert re.search(_closed_msg(kupd.socket), msg) or re.match(chan, msg), msg


# -- 2./3. Client.close() under threads in flight ----------------------------------


def _call_until_it_fails(c: Client, seen: list[BaseException]) -> None:
    try:
        while True:
            c.call("echo", b"x", timeout=5)
    except BaseException as exc:
        seen.append(exc)


def test_sync_client_close_gives_one_error_to_every_thread(kupd: Kupd) -> None:
    for _ in range(3):
        c = Client(kupd.socket)
        seen: list[BaseException] = []

        threads = [
            threading.Thread(target=_call_until_it_fails, args=(c, seen), daemon=True)
            for _ in range(12)
        ]
        for t in threads:
            t.start()
        time.sleep(0.3)
        c.close()
        for t in threads:
            t.join(BOUND)
            assert not t.is_alive()
        assert len(seen) == len(threads)
        for exc in seen:
            assert isinstance(exc, errors.InvalidArgument), repr(exc)
            assert re.search(_closed_msg(kupd.socket), str(exc)), str(exc)


def test_sync_watch_and_lease_receive_fail_as_the_client_closes(kupd: Kupd) -> None:
    """A Watch being iterated (and one not, and a lease_receive waiting)
    when another thread closes the client raises the same InvalidArgument
    as every other operation under way; the Watch used to end as if
    cancelled, its loop finishing silently.  cancel() still ends it quietly."""
    c = Client(kupd.socket)
    lease = c.attach("echo", 100)
    c.lease_receive(lease.lease_id, timeout=10)
    c.lease_send(lease.lease_id, b"!hold")  # the receive below waits
    quiet = c.watch("echo", initial_state=True)
    next(quiet)
    quiet.cancel()
    assert list(quiet) == []
    idle = c.watch("echo", initial_state=True)
    next(idle)  # open, and not being iterated when the client closes
    iterated = c.watch("echo", initial_state=True)
    got: dict[str, BaseException | str] = {}

    def run(name: str, op: Any) -> None:
        try:
            op()
            got[name] = "returned"
        except BaseException as exc:
            got[name] = exc

    threads = [
        threading.Thread(target=run, args=("watch", lambda: list(iterated)), daemon=True),
        threading.Thread(
            target=run, args=("lease", lambda: c.lease_receive(lease.lease_id)), daemon=True
        ),
    ]
    for t in threads:
        t.start()
    # both under way when the client closes (the watch is, once made)
    wait_until(lambda: _in_rpc(threads[1]), what="the lease_receive to wait in kupd")
    c.close()
    for t in threads:
        t.join(BOUND)
        assert not t.is_alive()
    for exc in (got["watch"], got["lease"]):
        assert isinstance(exc, errors.InvalidArgument), repr(exc)
        assert re.search(r"was closed while the operation waited$", str(exc)), exc
    with pytest.raises(errors.InvalidArgument, match=_closed_msg(kupd.socket)):
        next(idle)
    with Client(kupd.socket) as other:
        other.release(lease.lease_id)


def test_async_watch_fails_as_the_client_closes(kupd: Kupd) -> None:
    """asyncio: the loop over a watch gets the same InvalidArgument when
    another task closes the client (it got a bare CancelledError, its task
    never having been cancelled)."""

    async def main() -> None:
        c = AsyncClient(kupd.socket)
        started = asyncio.Event()

        async def loop() -> None:
            async for _ in c.watch("echo", initial_state=True):
                started.set()

        task = asyncio.create_task(loop())
        await asyncio.wait_for(started.wait(), BOUND)
        await c.close()
        with pytest.raises(errors.InvalidArgument, match=r"was closed while the operation waited$"):
            await asyncio.wait_for(task, BOUND)
        # a task that is itself cancelled still gets CancelledError
        c2 = AsyncClient(kupd.socket)
        started.clear()

        async def loop2() -> None:
            async for _ in c2.watch("echo", initial_state=True):
                started.set()

        task = asyncio.create_task(loop2())
        await asyncio.wait_for(started.wait(), BOUND)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await c2.close()

    asyncio.run(main())


def test_sync_channel_used_after_or_during_its_client_close(kupd: Kupd) -> None:
    c = Client(kupd.socket)
    idle = c.open("echo").channel(32)
    idle.receive(timeout=10)
    busy = c.open("echo").channel(33)
    busy.receive(timeout=10)
    got: list[BaseException] = []

    def waiting() -> None:
        try:
            busy.exchange(b"!hold", timeout=30)
        except BaseException as exc:
            got.append(exc)

    t = threading.Thread(target=waiting, daemon=True)
    t.start()
    # under way (a reply owed to it) when the client closes
    wait_until(lambda: busy._owed, what="the exchange on channel 33 to wait")
    c.close()
    t.join(BOUND)
    assert not t.is_alive()
    (exc,) = got
    assert isinstance(exc, errors.InvalidArgument), repr(exc)
    assert "channel 33 of echo was closed while the operation waited" in str(exc)
    with pytest.raises(errors.InvalidArgument, match=r"channel 32 of echo is closed$"):
        idle.exchange(b"x", timeout=1)
    with pytest.raises(errors.InvalidArgument, match=r"channel 33 of echo is closed$"):
        busy.receive(timeout=1)
    idle.close()
    busy.close()
    with kupd.client() as c2:
        wait_until(lambda: _state(c2, 32) == _state(c2, 33) == "free", what="released")


# -- 3b. AdminClient.close(): the same error as Client's ----------------------------


@pytest.fixture
def admin_kupd(sim: KupSim, start_kupd: StartKupd, tmp_path: Path) -> tuple[Kupd, str]:
    """kupd with an admin socket: (kupd, the admin socket's path)."""
    admin = tmp_path / "admin.sock"
    cfg = tmp_path / "kupd-admin.toml"
    cfg.write_text(
        f'socket = "{tmp_path}/kupd.sock"\n'
        f'admin_socket = "{admin}"\n'
        f'kupsim_dir = "{sim.rundir}"\n'
        '[[device]]\nname = "echo"\ncall_channels = 4\n'
    )
    return start_kupd(sim, "--config", str(cfg), devices=()), str(admin)


def test_an_admin_call_after_close_says_the_client_is_closed(
    admin_kupd: tuple[Kupd, str],
) -> None:
    """From the main thread and from another, an AdminClient call after
    close() raises what a Client's does -- InvalidArgument "client of PATH
    is closed" -- not gRPC's raw ValueError ("Cannot invoke RPC: Channel
    closed!" from the main thread, "... on closed channel!" from another),
    which no ``except KupError`` caught (kupctl, the admin module's command
    line)."""
    k, admin = admin_kupd
    closed = rf"client of {re.escape(admin)} is closed$"
    a = AdminClient(admin)
    assert a.list_leases() == []
    a.close()
    with pytest.raises(errors.InvalidArgument, match=closed):
        a.metrics("kupd_")
    got = Background(a.list_leases).outcome(BOUND)
    assert isinstance(got, errors.InvalidArgument), repr(got)
    assert re.search(closed, str(got)), got
    # one never used
    never = AdminClient(admin)
    never.close()
    with pytest.raises(errors.InvalidArgument, match=closed):
        never.reload()
    # as a Client's
    c = Client(k.socket)
    c.close()
    with pytest.raises(errors.InvalidArgument, match=_closed_msg(k.socket)):
        c.devices()


def _in_admin_rpc(t: threading.Thread) -> bool:
    """Whether thread ``t`` waits in an AdminClient RPC it has started: the
    main thread's in kupclient._start's ``unary`` (its future made), another
    thread's in gRPC's blocking call (its call made)."""
    blocking = grpc._channel._UnaryUnaryMultiCallable._blocking.__code__
    frame = thread_frame(t)
    while frame is not None:
        if frame.f_code is _start.unary.__code__ and "fut" in frame.f_locals:
            return True
        if frame.f_code is blocking and "call" in frame.f_locals:
            return True
        frame = frame.f_back
    return False


@pytest.mark.parametrize("caller", ["main", "other"])
def test_an_admin_call_under_way_fails_as_another_thread_closes_the_client(
    admin_kupd: tuple[Kupd, str], caller: str
) -> None:
    """An AdminClient call waiting for kupd (stopped) when another thread
    closes the client fails as a Client's does, InvalidArgument "client of
    PATH was closed while the operation waited"; it was SystemFailure
    "Channel closed!" (gRPC's CANCELLED, mapped as a failure of kupd's)."""
    k, admin = admin_kupd
    a = AdminClient(admin)
    a.list_leases()  # connected
    os.kill(k.pid, signal.SIGSTOP)
    try:
        wait_until(lambda: all_stopped(k.pid), what="kupd stopped")
        got: list[BaseException] = []
        if caller == "main":
            main = threading.main_thread()

            def closer() -> None:
                wait_until(lambda: _in_admin_rpc(main), what="the admin call to wait")
                a.close()

            t = threading.Thread(target=closer, daemon=True)
            t.start()
            try:
                a.metrics()
            except BaseException as exc:
                got.append(exc)
            t.join(BOUND)
            assert not t.is_alive()
        else:
            call = Background(a.metrics)
            wait_until(lambda: _in_admin_rpc(call.thread), what="the admin call to wait")
            a.close()
            got.append(cast(BaseException, call.outcome(BOUND)))
    finally:
        os.kill(k.pid, signal.SIGCONT)
    (exc,) = got
    assert isinstance(exc, errors.InvalidArgument), repr(exc)
    waited = rf"client of {re.escape(admin)} was closed while the operation waited$"
    assert re.search(waited, str(exc)), exc


# -- 4. a cancelled operation ends its session, and the next op says why ---------


def test_async_cancelled_operation_names_the_cause(kupd: Kupd) -> None:
    async def main() -> None:
        async with AsyncClient(kupd.socket) as c:
            ch = await (await c.open("echo")).channel(34)
            await ch.receive(timeout=10)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(ch.exchange(b"!delay"), 0.1)
            with pytest.raises(
                errors.InvalidArgument,
                match=r"channel 34 of echo is closed: an operation on it was cancelled "
                r"\(use timeout= to keep the session\)",
            ):
                await ch.receive(timeout=1)

    asyncio.run(main())


# -- 5. kupd not answering: timeout + grace ----------------------------------------


@pytest.fixture
def stopped(kupd: Kupd, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """stop() SIGSTOPs kupd (SIGCONT afterwards, whatever happens); the
    client's grace is GRACE."""
    monkeypatch.setattr(_types, "KUPD_GRACE", GRACE, raising=False)
    halted = []

    def stop() -> None:
        os.kill(kupd.pid, signal.SIGSTOP)
        halted.append(True)
        # stopped for good: a thread not stopped yet could still answer
        wait_until(lambda: all_stopped(kupd.pid), what="kupd stopped")

    yield stop
    if halted:
        os.kill(kupd.pid, signal.SIGCONT)


NO_ANSWER = r"channel 35 of echo: kupd did not answer within 1.3 s"
CLOSED_NO_ANSWER = r"channel 35 of echo is closed: kupd did not answer an operation"
RPC_NO_ANSWER = r"^kupd did not answer within the RPC's deadline .*: Deadline Exceeded$"


def test_sync_session_op_bounded_when_kupd_hangs(kupd: Kupd, stopped: Any) -> None:
    with kupd.client() as c:
        ch = c.open("echo").channel(35)
        ch.receive(timeout=10)
        stopped()
        start = time.monotonic()
        with pytest.raises(errors.DeadlineExceeded, match=NO_ANSWER):
            ch.exchange(b"x", timeout=0.3)
        took = time.monotonic() - start
        assert 1.3 <= took < 1.3 + BOUND, took
        with pytest.raises(errors.InvalidArgument, match=CLOSED_NO_ANSWER):
            ch.receive(timeout=0)
        start = time.monotonic()
        with pytest.raises(errors.DeadlineExceeded, match=RPC_NO_ANSWER):
            c.call("echo", b"x", timeout=0.3)  # gRPC's deadline: timeout + grace
        assert time.monotonic() - start < 1.3 + BOUND
        ch.close()


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_wait_without_timeout_ends_when_kupd_hangs(
    kupd: Kupd, stopped: Any, monkeypatch: pytest.MonkeyPatch, flavour: str
) -> None:
    """A receive without a timeout on a stopped kupd fails Unavailable once
    the client's keepalive ping goes unanswered (here: 5 s, then 2 s), as
    the docs say.  Before, the Python client waited as long as kupd was
    stopped: gRPC's core timed the ping out only by ping_timeout_ms."""
    monkeypatch.setattr(_types, "KEEPALIVE_TIME_MS", 5000, raising=False)  # kupd's minimum interval
    monkeypatch.setattr(_types, "KEEPALIVE_TIMEOUT_MS", 2000, raising=False)
    bound = 5 + 2 + 20  # far above the 7 s it takes, far below a hang
    got: list[BaseException] = []

    def sync_wait() -> None:
        with kupd.client() as c:
            ch = c.open("echo").channel(37)
            ch.receive(timeout=10)
            stopped()
            try:
                ch.receive()
            except BaseException as e:
                got.append(e)

    async def async_wait() -> None:
        async with AsyncClient(kupd.socket) as c:
            ch = await (await c.open("echo")).channel(37)
            await ch.receive(timeout=10)
            stopped()
            try:
                await asyncio.wait_for(ch.receive(), bound)
            except BaseException as e:
                got.append(e)

    t = threading.Thread(
        target=sync_wait if flavour == "sync" else lambda: asyncio.run(async_wait()),
        daemon=True,
    )
    t.start()
    t.join(bound)
    assert not t.is_alive(), "the receive still waits on the stopped kupd"
    assert len(got) == 1 and isinstance(got[0], errors.Unavailable), got
    assert "ping" in str(got[0]).lower(), got[0]  # gRPC names the unanswered ping


def test_sync_close_of_an_idle_channel_bounded_when_kupd_hangs(
    kupd: Kupd, stopped: Any
) -> None:
    """close() of an idle channel half-closes and waits for kupd to end the
    stream (the channel is free when it returns); a kupd that does not
    answer gets the stream cancelled after the grace instead."""
    with kupd.client() as c:
        ch = c.open("echo").channel(36)
        ch.receive(timeout=10)
        stopped()
        start = time.monotonic()
        ch.close()
        assert time.monotonic() - start < GRACE + BOUND


def test_async_close_of_an_idle_channel_bounded_when_kupd_hangs(
    kupd: Kupd, stopped: Any
) -> None:
    async def main() -> None:
        async with AsyncClient(kupd.socket) as c:
            ch = await (await c.open("echo")).channel(37)
            await ch.receive(timeout=10)
            stopped()
            start = time.monotonic()
            await asyncio.wait_for(ch.close(), 60)
            assert time.monotonic() - start < GRACE + BOUND

    asyncio.run(main())


def test_async_session_op_bounded_when_kupd_hangs(kupd: Kupd, stopped: Any) -> None:
    async def main() -> None:
        async with AsyncClient(kupd.socket) as c:
            ch = await (await c.open("echo")).channel(35)
            await ch.receive(timeout=10)
            stopped()
            start = time.monotonic()
            with pytest.raises(errors.DeadlineExceeded, match=NO_ANSWER):
                await asyncio.wait_for(ch.exchange(b"x", timeout=0.3), 1.3 + BOUND)
            assert 1.3 <= time.monotonic() - start < 1.3 + BOUND
            with pytest.raises(errors.InvalidArgument, match=CLOSED_NO_ANSWER):
                await ch.receive(timeout=0)
            with pytest.raises(errors.DeadlineExceeded, match=RPC_NO_ANSWER):
                await asyncio.wait_for(c.call("echo", b"x", timeout=0.3), 1.3 + BOUND)
            await ch.close()

    asyncio.run(main())


# -- 6. fork ---------------------------------------------------------------------


#: The sync fork scenario, in a process of its own for the same reason as
#: the async one below: forking pytest's process, full of other tests'
#: gRPC threads, once hung the fork itself in a full run.
#: Runs body() in a forked child, its result back as JSON (both scripts).
IN_CHILD = """
def in_child(body):
    # gRPC's own fork handling now and then kills a child of a process
    # using grpc.aio before any of its code runs: fork again then
    for _ in range(5):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            signal.alarm(20)
            try:
                out = json.dumps(body())
            except BaseException as exc:
                out = json.dumps(["child failed: " + repr(exc)])
            os.write(w, out.encode())
            os._exit(0)
        os.close(w)
        _, status = os.waitpid(pid, 0)
        with os.fdopen(r, "rb") as f:
            out = f.read().decode()
        if out or not os.WIFSIGNALED(status):
            return json.loads(out) if out else ["child exited " + str(status)]
    return ["child killed at fork 5 times"]
"""

SYNC_FORK = """
import json, os, signal, sys, time
from kupclient import Client, errors
""" + IN_CHILD + """

def err(fn):
    try:
        fn()
    except errors.KupError as exc:
        return type(exc).__name__ + ": " + str(exc)
    return "no error"

c = Client(sys.argv[1])
ch = c.open("echo").channel(36)
ch.receive(timeout=10)
lease = c.attach("echo")  # an owed RPC: kupclient's starter thread runs now
c.release(lease.lease_id)

def child():
    start = time.monotonic()
    lines = [
        err(lambda: c.call("echo", b"x", timeout=2)),
        err(lambda: ch.exchange(b"x", timeout=2)),
        err(lambda: c.open("echo")),
    ]
    ch.close()  # nothing, at once
    c.close()
    with Client(sys.argv[1]) as fresh:  # a new client in the child works
        for attempt in range(3):
            try:
                got = fresh.call("echo", b"fresh", timeout=5).data.decode()
                # an owed RPC: the starter thread did not survive the fork,
                # the child's client gets one of its own
                fresh.release(fresh.attach("echo").lease_id)
                lines.append(got)
                break
            except errors.KupError as exc:
                # gRPC's fork handling, now and then (docs/gateway.md)
                why = str(exc)
                if attempt == 2 or not (
                    "file descriptor generation" in why or "Closed on fork" in why
                ):
                    raise
    lines.append(time.monotonic() - start)
    return lines

lines = in_child(child)  # gRPC kills a sync client's child now and then too
# the parent's client and session are untouched
parent = [
    ch.exchange(b"parent", timeout=5).data.decode(),
    c.call("echo", b"p", timeout=5).data.decode(),
]
ch.close()
c.close()
print(json.dumps({"pid": os.getpid(), "child": lines, "parent": parent}))
"""


def test_sync_client_after_fork_fails_fast_in_the_child(kupd: Kupd) -> None:
    run = subprocess.run(
        [sys.executable, "-c", SYNC_FORK, str(kupd.socket)],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(),
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.splitlines()[-1])
    assert [p.lower() for p in out["parent"]] == ["parent", "p"], out
    forked = (
        f"was created in process {out['pid']} and cannot be used after fork(); "
        "create a new Client in the child"
    )
    assert len(out["child"]) == 5, out
    call, chan, opened, fresh, took = out["child"]
    assert call == f"InvalidArgument: client of {kupd.socket} {forked}", out
    assert chan == f"InvalidArgument: channel 36 of echo (client of {kupd.socket}) {forked}", out
    assert opened == call
    assert fresh.lower() == "fresh"
    assert took < BOUND


#: An AdminClient inherited across fork(), as SYNC_FORK's Client: its calls
#: in the child fail at once naming the fork, a new one works, the parent's
#: is untouched.
ADMIN_FORK = """
import json, os, signal, sys
from kupclient import errors
from kupclient.admin import AdminClient
""" + IN_CHILD + """

def err(fn):
    try:
        fn()
    except errors.KupError as exc:
        return type(exc).__name__ + ": " + str(exc)
    return "no error"

a = AdminClient(sys.argv[1])
a.list_leases()  # connected: gRPC's channel is live at the fork

def child():
    lines = [err(a.list_leases), err(lambda: a.metrics("kupd_"))]
    a.close()  # nothing: the channel is the parent's
    with AdminClient(sys.argv[1]) as fresh:  # a new one in the child works
        for attempt in range(3):
            try:
                lines.append(len(fresh.list_leases()))
                break
            except errors.KupError as exc:
                # gRPC's fork handling, now and then (docs/gateway.md)
                why = str(exc)
                if attempt == 2 or not (
                    "file descriptor generation" in why or "Closed on fork" in why
                ):
                    raise
    return lines

lines = in_child(child)
parent = a.list_leases()  # the parent's client is untouched
a.close()
print(json.dumps({"pid": os.getpid(), "child": lines, "parent": len(parent)}))
"""


def test_admin_client_after_fork_fails_fast_in_the_child(
    admin_kupd: tuple[Kupd, str],
) -> None:
    _, admin = admin_kupd
    run = subprocess.run(
        [sys.executable, "-c", ADMIN_FORK, admin],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(),
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.splitlines()[-1])
    assert out["parent"] == 0, out
    forked = (
        f"was created in process {out['pid']} and cannot be used after fork(); "
        "create a new AdminClient in the child"
    )
    assert len(out["child"]) == 3, out
    leases, metrics, fresh = out["child"]
    assert leases == f"InvalidArgument: client of {admin} {forked}", out
    assert metrics == leases
    assert fresh == 0, out


#: The async fork scenario, run in a process of its own: forking pytest's
#: process -- by then full of other tests' gRPC threads -- killed the child
#: inside Python (random's at-fork reseed) every time in a full run.
ASYNC_FORK = """
import asyncio, json, os, signal, sys
from kupclient import AsyncClient, errors
""" + IN_CHILD + """
async def main():
    async with AsyncClient(sys.argv[1]) as c:
        ch = await (await c.open("echo")).channel(37)
        await ch.receive(timeout=10)

        def child():
            async def use():
                out = []
                for coro in (c.call("echo", b"x", timeout=2), ch.exchange(b"x", timeout=2)):
                    try:
                        await coro
                        out.append("no error")
                    except errors.KupError as exc:
                        out.append(type(exc).__name__ + ": " + str(exc))
                await ch.close()
                await c.close()
                return out
            return asyncio.new_event_loop().run_until_complete(use())

        lines = in_child(child)
        reply = await ch.exchange(b"parent", timeout=5)
        await ch.close()
        print(json.dumps({"pid": os.getpid(), "child": lines, "parent": reply.data.decode()}))

asyncio.run(main())
"""


def test_async_client_after_fork_fails_fast_in_the_child(kupd: Kupd) -> None:
    run = subprocess.run(
        [sys.executable, "-c", ASYNC_FORK, str(kupd.socket)],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(),
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.splitlines()[-1])
    assert out["parent"].lower() == "parent", out  # the parent's session is untouched
    forked = (
        f"was created in process {out['pid']} and cannot be used after fork(); "
        "create a new AsyncClient in the child"
    )
    call, chan = out["child"]
    assert call == f"InvalidArgument: client of {kupd.socket} {forked}", out
    assert chan == f"InvalidArgument: channel 37 of echo (client of {kupd.socket}) {forked}", out


# -- 7./8. the public API ------------------------------------------------------------


PROGRAM = """
from kupclient import AsyncClient, Client
from kupclient.errors import ArgumentValueError, KupError, is_connection_failure
from kupd.errors import Busy


def use(c: Client, data: bytearray, view: memoryview) -> int:
    ch = c.open("echo").channel()
    ch.send(data)
    ch.exchange(view, timeout=1)
    c.call("echo", data)
    c.lease_send("x", view)
    try:
        c.call("echo", b"x")
    except KupError as exc:
        return 1 if is_connection_failure(exc) else 2
    except ArgumentValueError:
        return 3
    except Busy:
        return 4
    return 0


async def ause(c: AsyncClient, data: bytearray) -> None:
    async with await c.open("echo") as dev:
        ch = await dev.channel()
        await ch.exchange(data, timeout=1)
        await dev.call(memoryview(data))


def wrong(c: Client) -> None:
    c.call("echo", "not bytes")
    bad: int = c.health()
"""


def test_py_typed_ships_and_mypy_strict_sees_the_annotations(tmp_path: Path) -> None:
    pkg = REPO_ROOT / "clients" / "python" / "kupclient"
    assert (pkg / "py.typed").is_file()
    with open(REPO_ROOT / "clients" / "python" / "pyproject.toml", "rb") as f:
        client_setuptools = tomllib.load(f)["tool"]["setuptools"]
    assert "py.typed" in client_setuptools["package-data"]["kupclient"]
    # kupclient.errors re-exports kupapi.errors' classes: kupapi is typed too
    assert (REPO_ROOT / "clients" / "python" / "kupapi" / "py.typed").is_file()
    assert "py.typed" in client_setuptools["package-data"]["kupapi"]
    with open(REPO_ROOT / "pyproject.toml", "rb") as f:
        setuptools = tomllib.load(f)["tool"]["setuptools"]
    assert (REPO_ROOT / "kupd" / "py.typed").is_file()
    assert "py.typed" in setuptools["package-data"]["kupd"]
    # an installed-like layout: a venv whose site-packages holds the packages
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (site,) = venv.glob("lib/python3*/site-packages")
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.c")
    shutil.copytree(pkg, site / "kupclient", ignore=ignore)
    shutil.copytree(REPO_ROOT / "clients" / "python" / "kupapi", site / "kupapi", ignore=ignore)
    shutil.copytree(REPO_ROOT / "kupd", site / "kupd", ignore=ignore)
    (tmp_path / "app.py").write_text(PROGRAM)
    mypy = Path(sys.executable).with_name("mypy")
    run = subprocess.run(
        [str(mypy), "--strict", "--no-incremental", "--python-executable",
         str(venv / "bin" / "python"), "app.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [ln for ln in run.stdout.splitlines() if ": error:" in ln]
    assert len(lines) == 2, run.stdout + run.stderr
    assert 'Argument 2 to "call" of "Client" has incompatible type "str"' in lines[0]
    assert 'Incompatible types in assignment (expression has type "str"' in lines[1]
    # the same program against this project's own venv (make's editable
    # install): mypy sees the packages there too, from any directory
    dev = subprocess.run(
        [str(mypy), "--strict", "--no-incremental", "--python-executable", sys.executable,
         "app.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert [ln for ln in dev.stdout.splitlines() if ": error:" in ln] == lines, (
        dev.stdout + dev.stderr
    )


def test_public_errors_and_handles(kupd: Kupd) -> None:
    from kupclient import _args, _errors

    for name in ("ArgumentTypeError", "ArgumentValueError", "ArgumentError"):
        assert name in kerrors.__all__
        assert getattr(kerrors, name) is getattr(_args, name)
    assert "is_connection_failure" in kerrors.__all__
    assert kerrors.is_connection_failure is _errors.is_connection_failure
    assert "/run/kupd/kupd.sock" in (kupclient.__doc__ or "")
    assert "/run/kupd.sock" not in (kupclient.__doc__ or "")
    with Client(str(kupd.socket) + ".none") as c:
        with pytest.raises(errors.Unavailable) as refused:
            c.devices()
    assert kerrors.is_connection_failure(refused.value)
    with Client(kupd.socket) as c, pytest.raises(kerrors.ArgumentTypeError):
        c.call("echo", "text")  # type: ignore[arg-type]

    async def main() -> None:
        async with AsyncClient(kupd.socket) as c:
            async with await c.open("echo") as dev:
                assert (await dev.call(bytearray(b"abc"), timeout=5)).data.lower() == b"abc"

    asyncio.run(main())
