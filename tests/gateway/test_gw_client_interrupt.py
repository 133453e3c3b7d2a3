"""An interrupted sync unary RPC is cancelled at once, not left running.

A KeyboardInterrupt (here raised by a signal handler, as Ctrl-C or an
alarm does) while ``lease_exchange`` / ``lease_receive`` waited used to
surface only at gRPC's next look for signals, up to 200 ms later: gRPC's
blocking call waits in C and looks every 200 ms.  A reply that came in
between was taken by kupd for the RPC and dropped with it, and the next
receive on the lease never saw it ("No kernel message is dropped on a
client's behalf").  kupclient now waits on the RPC's future, which runs
the handler at once and cancels the RPC before the interrupt propagates;
kupd then leaves the reply for the next receive, as with the asyncio
client.

A real signal and a real kupd.  echo holds its channel locked
(LOCKHOLD), so the RPC is surely waiting in kupd when the signal comes,
and replies when the test sends "!lockfree": REPLY_AFTER the signal,
which is ample for the handler to run and the cancel to reach kupd now,
and well inside the 200 ms the old client took.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

import pytest
from gateway_helpers import LOCKHOLD, unlock, wait_locked

from kupclient import Client, _start
from kupd.testing import KupSim, thread_frame, wait_until


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


#: From the signal to the "!lockfree" that makes echo reply (seconds).
REPLY_AFTER = 0.1


@contextmanager
def interrupted_when(
    ready: Callable[[], object], then: Callable[[], object] = lambda: None
) -> Iterator[None]:
    """Signal the main thread (its handler raises KeyboardInterrupt) once
    ``ready()`` returns, from another thread, and call ``then()``
    REPLY_AFTER later (without waiting for the handler); the body must be
    interrupted.  The handler stays until that thread is done (a signal
    after it would end the test process)."""
    main = threading.main_thread().ident
    assert main is not None and threading.get_ident() == main
    failed: list[BaseException] = []

    def fire() -> None:
        try:
            ready()
        except BaseException as exc:
            failed.append(exc)
            # the body waits for a reply that will not come: end it anyway
        signal.pthread_kill(main, signal.SIGUSR1)
        time.sleep(REPLY_AFTER)
        then()

    old = signal.signal(signal.SIGUSR1, _interrupt)
    t = threading.Thread(target=fire, daemon=True)
    try:
        with pytest.raises(KeyboardInterrupt):
            t.start()
            yield
    finally:
        t.join()
        signal.signal(signal.SIGUSR1, old)
    if failed:
        raise failed[0]


def _waiting_for_the_answer() -> bool:
    """Whether the main thread waits for an RPC's answer: in gRPC's
    blocking call's wait or a future's, or in kupclient's wait for its
    future to complete (``kupclient._start.unary`` once it has ``fut``) -- not still
    starting the RPC (test_gw_client_start_interrupt.py walks that)."""
    frame = thread_frame(threading.main_thread())
    while frame is not None:
        code = frame.f_code
        if code.co_name in ("_blocking", "_wait_once") and f"{os.sep}grpc{os.sep}" in (
            code.co_filename
        ):
            return True
        if code is _start.unary.__code__ and "fut" in frame.f_locals:
            return True
        frame = frame.f_back
    return False


def _waiting(kupd_side: Callable[[], object]) -> Callable[[], None]:
    """Ready: ``kupd_side()`` (the request is in kupd) and the main thread
    waits for the answer."""

    def ready() -> None:
        kupd_side()
        wait_until(_waiting_for_the_answer, what="the main thread waiting for the answer")

    return ready


def _lease(client: Client, chan: int) -> str:
    lid = client.attach("echo", chan).lease_id
    client.lease_receive(lid, timeout=10)  # echo's opening hand-over
    return lid


def test_an_interrupted_lease_exchange_leaves_the_reply_owed(
    client: Client, sim: KupSim
) -> None:
    lid = _lease(client, 30)
    with interrupted_when(_waiting(lambda: wait_locked(sim, 30)), lambda: unlock(client)):
        client.lease_exchange(lid, LOCKHOLD, timeout=60)
    msg = client.lease_receive(lid, timeout=20)
    assert (msg.data, msg.seq) == (LOCKHOLD, 2)
    assert client.lease_exchange(lid, b"next", timeout=20).data == b"next"


def test_an_interrupted_lease_receive_leaves_the_reply_owed(client: Client, sim: KupSim) -> None:
    lid = _lease(client, 32)
    client.lease_send(lid, LOCKHOLD)
    wait_locked(sim, 32)

    def in_kupd() -> None:
        # nothing tells when kupd has the Receive: the main thread waiting
        # for its answer, and then ample time for the request to get there
        # (were it cancelled before, the reply would stay anyway: the test
        # would pass without showing anything, never fail)
        wait_until(_waiting_for_the_answer, what="the main thread waiting")
        time.sleep(0.5)

    with interrupted_when(_waiting(in_kupd), lambda: unlock(client)):
        client.lease_receive(lid)
    msg = client.lease_receive(lid, timeout=20)
    assert (msg.data, msg.seq) == (LOCKHOLD, 2)
