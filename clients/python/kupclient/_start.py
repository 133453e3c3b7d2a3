"""Starting the main thread's gRPC calls where no signal handler runs.

gRPC starts a call it manages (a ``.future()``, a stream) in
``grpc._channel._channel_managed_call_management``'s ``create``: the call
is registered with the channel (``integrated_call``), then counted
(``managed_calls``), and the first call in flight starts the thread that
polls the channel's completion queue.  Python runs a signal handler in the
main thread between any two bytecodes, so one that raises (Ctrl-C's
KeyboardInterrupt, a program's alarm) after the registration and before
the count leaves a call no thread polls for, the count one short:

* ``close()`` of the channel waits for every registered call to be
  polled to its end: for ever (the client's ``close()`` hung there);
* the next call starts a polling thread, which stops when the short count
  reaches zero while a call is still under way: that call's future never
  completes, and its caller waits for ever.

So a call the main thread starts is started on a thread of kupclient's
(:func:`start`), where no signal handler runs, the main thread waiting for
it; an interrupt of that wait leaves the call to the thread, which hands
it to ``abandon`` (the caller cancels it) once started.  Other threads
start their calls themselves: no handler runs there either.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar, cast

import grpc

from kupclient import _fork

__all__ = ["cancel_call", "ignore", "interrupt_of", "start", "start_thread", "unary"]

T = TypeVar("T")


def interrupt_of(exc: BaseException) -> BaseException | None:
    """The KeyboardInterrupt (or other non-Exception a signal handler
    raised) that CPython turned into ``exc``, else None.

    ``threading.Condition.wait`` (CPython 3.11, Lib/threading.py) lets go of
    its lock (line 323, ``saved_state = self._release_save()``) before the
    ``try`` (line 325) whose ``finally`` takes it back (line 336): a handler
    that raises as ``_release_save`` returns leaves the lock free, and the
    ``with`` around the wait -- gRPC's ``future.result()``, Event.wait in
    Thread.start -- fails to release it (Condition.__exit__, line 275):
    ``RuntimeError`` "cannot release un-acquired lock" (an RLock) or
    "release unlocked lock" (a Lock), the interrupt its ``__context__``.
    Only that shape: a RuntimeError whose context is a BaseException that
    is not an Exception (a program's own RuntimeError stays one)."""
    ctx = exc.__context__
    if (
        type(exc) is RuntimeError
        and isinstance(ctx, BaseException)
        and not isinstance(ctx, Exception)
    ):
        return ctx
    return None


def start_thread(t: threading.Thread) -> None:
    """``t.start()`` in the main thread: an interrupt that CPython turned
    into a RuntimeError in its wait for the thread (Event.wait: see
    :func:`interrupt_of`) is raised as itself."""
    try:
        t.start()
        return
    except RuntimeError as exc:
        interrupt = interrupt_of(exc)
        if interrupt is None:
            raise
    raise interrupt  # not in the except: the interrupt has no context


class _Job:
    """One call to start: ``make()`` on the starter thread, its outcome
    handed back through ``done`` (held until then)."""

    __slots__ = ("abandon", "abandoned", "done", "error", "finished", "lock", "make", "result")

    def __init__(self, make: Callable[[], object], abandon: Callable[[Any], object]) -> None:
        self.make = make
        self.abandon = abandon
        self.result: object = None
        self.error: BaseException | None = None
        self.lock = threading.Lock()  # finished against abandoned
        self.finished = False
        self.abandoned = False
        # a bare lock, not an Event: Event.wait is a Condition.wait, which a
        # handler raising at the wrong moment turns into a RuntimeError
        self.done = threading.Lock()
        self.done.acquire()

    def run(self) -> None:
        try:
            self.result = self.make()
        except BaseException as exc:
            self.error = exc
        with self.lock:
            self.finished = True
            abandoned = self.abandoned
        self.done.release()
        if abandoned and self.error is None:
            self.abandon(self.result)


class _Starter:
    """The thread that starts the main thread's calls: one per process,
    started with the first call, idle on its queue in between."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, job: _Job) -> None:
        with self._lock:
            if self._thread is None:
                # set once started: an interrupt inside start() (it runs
                # in the main thread) may leave no thread, or one more
                # (harmless: they share the queue), not one never started
                t = threading.Thread(target=self._run, name="kupclient-start", daemon=True)
                t.start()
                self._thread = t
        self._jobs.put(job)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                job.run()
            except BaseException:  # abandon() failed: the thread goes on
                pass
            del job

    def _after_fork(self) -> None:
        # the thread did not survive the fork
        self._lock = threading.Lock()
        self._jobs = queue.SimpleQueue()
        self._thread = None


_STARTER = _Starter()
_fork.at_fork_in_child(_STARTER._after_fork)


def start(make: Callable[[], T], abandon: Callable[[T], object]) -> T:
    """``make()`` -- which starts a gRPC call and returns it (a future, a
    stream) -- where no signal handler interrupts it: on the starter thread
    when called from the main thread, the main thread waiting.  What
    ``make()`` raises is raised here.  Interrupted while it waits (an
    exception a signal handler raises), the call may be started all the
    same: ``abandon(call)`` is called with it -- here, or on the starter
    thread once it is started -- and the interrupt propagates."""
    if threading.current_thread() is not threading.main_thread():
        return make()
    job = _Job(make, abandon)
    try:
        _STARTER.submit(job)  # may start the thread: Thread.start() waits on an Event
        job.done.acquire()
    except BaseException as exc:
        with job.lock:
            job.abandoned = not job.finished
        if not job.abandoned and job.error is None:  # it had started: ours to undo
            abandon(cast(T, job.result))
        interrupt = interrupt_of(exc)
        if interrupt is None:
            raise
    else:
        interrupt = None
    if interrupt is not None:
        raise interrupt  # here, not in the except: it has no context
    if job.error is not None:
        raise job.error
    return cast(T, job.result)


def ignore(_: object) -> None:
    """Nothing to undo (:func:`start`'s ``abandon`` of a call that is not
    one: a cancel, a close)."""


def cancel_call(call: Any) -> None:
    """Cancel an RPC (a future, a stream) whose start was given up on
    (:func:`start`'s ``abandon``)."""
    call.cancel()


def unary(
    rpc: Any,
    request: Any,
    timeout: float | None,
    given_up: Callable[[Any], object] | None = None,
) -> Any:
    """``rpc(request, timeout=timeout)`` -- a gRPC unary callable -- made
    safe against an interrupt anywhere in the main thread: through
    ``rpc.future()``, started by :func:`start`, and waited for on a bare
    lock that the future's done-callback releases.

    gRPC's blocking call registers its call with the channel in a ``with``
    on the channel's condition, and ``future.result()`` waits in a ``with``
    on the call's: an interrupt just as either lock was taken (CPython runs
    a handler as ``Condition.__enter__``'s call into C returns) left it
    held by the main thread, and gRPC's polling thread -- every call that
    thread completes -- waited on it for ever.  Here the future is asked
    only once it has completed (no wait).

    Raises what ``future.result()`` raises (``grpc.RpcError``,
    ``grpc.FutureCancelledError``), and ``ValueError`` from the start
    (gRPC's "Cannot invoke RPC on closed channel!").  Interrupted, the RPC
    is cancelled (once started) and ``given_up`` -- for an RPC that may have
    done something its caller will never learn of -- is called with its
    response when it had already succeeded, else None (it may have run:
    gRPC drops the answer of a cancelled call even when the server had
    written it); then the interrupt propagates, as itself also when CPython
    turned it into a RuntimeError (:func:`interrupt_of`)."""
    completed = threading.Lock()
    completed.acquire()

    def begin() -> Any:
        fut = rpc.future(request, timeout=timeout)
        fut.add_done_callback(lambda _: completed.release())
        return fut

    try:
        fut = start(begin, cancel_call)
    except ValueError:
        raise
    except BaseException:
        # interrupted while the starter thread started the RPC: it may run
        # all the same (cancelled once started, above)
        if given_up is not None:
            given_up(None)
        raise
    try:
        completed.acquire()
        return fut.result()  # completed: no wait
    except (grpc.RpcError, grpc.FutureCancelledError):
        raise
    except BaseException as exc:
        if fut.cancel():  # not completed: the server may have run it all the same
            if given_up is not None:
                given_up(None)
        elif given_up is not None:  # it had completed
            try:
                resp = fut.result(timeout=0)
            except (grpc.RpcError, grpc.FutureCancelledError):
                pass  # it failed: nothing to undo
            else:
                given_up(resp)
        interrupt = interrupt_of(exc)
        if interrupt is None:
            raise
    raise interrupt  # not in the except: the interrupt has no context
