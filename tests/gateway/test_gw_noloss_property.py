"""No message is lost or duplicated on an Attach lease, whatever the client
gives up on -- a randomized (seeded) property test of that promise.

docs/gateway.md: a lease receive or exchange its client gives up on (past
its deadline, its asyncio task cancelled, the sync client interrupted by a
signal handler that raises) leaves the kernel's message for the lease's next
receive -- kupd had not taken it yet, had taken it and not written the reply
(Lease.held), or had written the reply that gRPC then dropped on the
client's side (receive_id / again_of, Lease.delivered) -- and a Send, Pass
or exchange before that receive is NotYourTurn, nothing sent.

Each schedule takes a lease on echo (kupsim), then sends numbered messages
one at a time (lease_send, or lease_exchange) and gets each echo back,
giving up at random on the way: receive and exchange timeouts drawn around
the moment the echo comes (echo's "!stampN" answers N ms later), an asyncio
task cancelled / the sync call interrupted (SIGALRM, its handler raising)
at a delay drawn the same way, a reply kupd wrote that the client never
got (a proxy holds kupd's status after the reply until the client gives up:
:class:`ArmedStall`), and one kupd took the echo for as the client gave up
(kupd stopped -- SIGSTOP -- while the echo comes and the client gives up,
then continued: it sees both at once, Lease.held).  After a give-up the
program does what a real one might: receives again, or sends, passes,
exchanges the next message anyway, or does something else a while (the
echo comes meanwhile, unread).

What is checked, whatever the timing (every outcome the docs allow is
accepted, and none of them may lose or repeat a message):

* every echo comes back exactly once, in order, with its own payload;
* a receive while an echo is owed never says the turn is this side's
  (that echo would be lost), one while none is owed never returns one;
* a send, pass or exchange while an echo is owed is refused NotYourTurn
  with one of the texts the docs promise, and nothing is sent (kupd's
  ``kupd_messages_total`` to the kernel for the channel counts exactly the
  messages the schedule knows were sent);
* an exchange given up on either was sent (its echo comes, once) or was not
  (the counter says so, and the turn is still this side's);
* at the end the lease releases cleanly and ListDevices shows its channel
  free.

The sync client is interrupted anywhere in its wait for an owed RPC --
also while the RPC is being started (see :func:`_interrupt`); the default
schedules run in about 15 s per test.

A failure prints the seed and the steps run; ``KUP_NOLOSS_SEEDS=a,b,c``
runs those schedules instead of the default ones (``random:N`` in the list:
N random seeds), ``KUP_NOLOSS_VERBOSE=1`` prints every step (with -s).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random
import re
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import pytest
from gateway_helpers import StartKupd
from h2stall import (
    HEADERS,
    StallProxy,
)

from kupclient import AsyncClient, Client, Kind, Message
from kupd import errors
from kupd.testing import Kupd, KupSim, all_stopped, wait_until, with_metrics_port

#: far beyond the test: a lease must not idle out under it
IDLE_TIMEOUT = 600.0
#: messages per schedule
MESSAGES = 5
#: the default schedules of each test (seeds): sized so that the file runs
#: in well under a minute on a loaded 2-core machine
DEFAULT_SEEDS = range(8)

#: the NotYourTurn texts the docs promise for a send, pass or exchange over
#: an echo owed: the kernel still holds the turn; its message is unread in
#: the channel (keep_unread); kupd took it for a receive whose caller had
#: gone (Lease.held); kupd wrote it for a receive the client gave up on and
#: the operation names (again_of, Lease.delivered)
REFUSED_OWED = re.compile(
    r"kernel holds the turn"
    r"|the kernel's message is unread"
    r"|has not received the message of its receive [A-Za-z0-9_-]+ .*receive it first \(again_of\)"
)
#: a receive with no echo owed: the turn is this side's
REFUSED_IDLE = re.compile(r"already received")


class Interrupted(BaseException):
    """What the sync test's SIGALRM handler raises (a Ctrl-C's stand-in: a
    BaseException, as KeyboardInterrupt, which no ``except Exception``
    swallows)."""


#: set while the operation under way may be interrupted; cleared by the
#: one interrupt it gets
_ARMED = threading.Event()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """Raise, once, while the client is in an owed RPC -- waiting for its
    answer, or still starting it (kupclient starts it on a thread of its
    own and cancels it once started) -- the give-up under test.  A signal
    that comes after the operation returned (the program's own code, no
    library's), in an operation that is not an owed RPC (send, pass) or
    after the one interrupt (the client is handling it) is ignored."""
    f = frame
    while f is not None and _ARMED.is_set():
        if f.f_code.co_name == "_unary_owed":
            _ARMED.clear()
            raise Interrupted
        f = f.f_back


def _interrupt_main(main: int, stop: threading.Event, missed: threading.Event) -> None:
    """Interrupt the main thread's operation, which cannot end otherwise:
    signal it until the handler raised or it is over.  ``missed``: none of
    10 s of signals landed -- the handler looks for the client's RPC by
    name (kupclient.Client._unary_owed)."""
    deadline = time.monotonic() + 10
    while _ARMED.is_set() and not stop.is_set():
        if time.monotonic() > deadline:
            missed.set()
            return
        signal.pthread_kill(main, signal.SIGALRM)
        stop.wait(0.01)


class ArmedStall(StallProxy):
    """h2stall's proxy, transparent until :meth:`arm`: then kupd's next
    reply with a payload on a call started after the arm goes through and
    what follows it (the RPC's status) is held until the client resets that
    stream -- it gave up on the call, and gRPC dropped the reply -- after
    which everything flows again.  (Not the reply of an older call: kupd
    may write one for a call the client cancelled a step before.)
    :meth:`resume` (StallProxy's) disarms one that did not stall."""

    def __init__(self, path: str, upstream: str) -> None:
        self._newest = 0  # the client's newest stream
        self._armed_after = 0
        super().__init__(path, upstream)
        self.resume()

    def arm(self) -> None:
        with self._lock:
            self._stream = 0
            self._armed_after = self._newest
            self._held.clear()
            for ev in (self.stalled, self.status_held, self.reset_seen):
                ev.clear()
            self._resume.clear()

    def _client_frame(self, ftype: int, stream: int) -> None:
        if ftype == HEADERS:
            with self._lock:
                self._newest = max(self._newest, stream)

    def _stalls_on(self, ftype: int, stream: int, raw: bytes) -> bool:
        # armed, and a call started after the arm
        return (
            not self._resume.is_set()
            and super()._stalls_on(ftype, stream, raw)
            and stream > self._armed_after
        )


@pytest.fixture
def kupd(sim: KupSim, start_kupd: StartKupd) -> Kupd:
    return with_metrics_port(
        lambda port: start_kupd(
            sim, "--lease-idle-timeout", str(IDLE_TIMEOUT), "--metrics-port", str(port)
        )
    )


@pytest.fixture
def proxy(kupd: Kupd) -> Iterator[ArmedStall]:
    p = ArmedStall(kupd.socket + ".stall", kupd.socket)
    yield p
    p.close()


def _seeds() -> list[int]:
    spec = os.environ.get("KUP_NOLOSS_SEEDS", "")
    if not spec:
        return list(DEFAULT_SEEDS)
    seeds: list[int] = []
    for part in spec.split(","):
        if part.startswith("random:"):
            seeds += [random.randrange(1 << 30) for _ in range(int(part[len("random:") :]))]
        else:
            seeds.append(int(part))
    return seeds


def _sent_to_kernel(kupd: Kupd, chan: int) -> int:
    """kupd_messages_total to the kernel on echo's channel ``chan``."""
    assert kupd.metrics_url is not None
    text = urllib.request.urlopen(kupd.metrics_url, timeout=10).read().decode()
    for m in re.finditer(r"^kupd_messages_total\{([^}]*)\} (\S+)$", text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if labels == {"device": "echo", "channel": str(chan), "direction": "to_kernel"}:
            return int(float(m.group(2)))
    return 0


# -- the schedule ---------------------------------------------------------


@dataclass
class Step:
    """One operation of a schedule.  ``op``: recv, send, pass, exchange;
    ``timeout``: the receive's (or the exchange's reply's) timeout, None
    blocking, 0 non-blocking; ``giveup``: "" (none but the timeout),
    "cancel" (the asyncio task cancelled / the sync call interrupted
    ``after`` seconds in), "stall" (kupd's reply held from the client, which
    then gives up on it), "freeze" (kupd stopped -- SIGSTOP -- ``after``
    seconds in, for ``hold`` seconds, as the echo comes; the client gives
    up meanwhile and kupd, continued, sees the echo and the cancel at once:
    it may have taken the message for a call whose caller is gone,
    Lease.held)."""

    op: str
    n: int = -1  # the message sent (send, exchange)
    timeout: float | None = 30.0
    giveup: str = ""
    after: float = 0.0
    hold: float = 0.0

    def __str__(self) -> str:
        t = "block" if self.timeout is None else f"{self.timeout:.3f}"
        extra = {
            "cancel": f" cancel@{self.after:.3f}",
            "stall": " stall",
            "freeze": f" freeze@{self.after:.3f}+{self.hold:.3f}",
        }.get(self.giveup, "")
        return f"{self.op}{'' if self.n < 0 else f'#{self.n}'} t={t}{extra}"


#: what an operation came to: ("ok", message or None), ("gaveup", why) --
#: deadline / notready / cancelled / interrupted -- or ("refused", error)
Outcome = tuple[str, object]


def payload(n: int, delay_ms: int) -> bytes:
    """Message ``n``: echo answers it ``delay_ms`` later, its last 8 bytes
    replaced by a time stamp (!stamp)."""
    return f"!stamp{delay_ms}-msg-{n:04d}-".encode() + b"\0" * 8


def echo_of(msg: Message) -> int:
    """The number of the message ``msg`` echoes (-1: not an echo of ours)."""
    m = re.match(rb"!STAMP\d+-MSG-(\d{4})-", msg.data.upper())
    return int(m.group(1)) if m and msg.kind == Kind.DATA else -1


@dataclass
class Model:
    """What the schedule knows of the lease.  ``owed``: the message whose
    echo is owed (sent for sure); ``maybe``: an exchange given up on that
    may or may not have been sent; ``sent``: the messages known sent, in
    order; ``got``: the echoes received, in order."""

    rng: random.Random
    sent_base: int
    owed: int = -1
    maybe: int = -1
    next_n: int = 0
    sent: list[int] = field(default_factory=list)
    got: list[int] = field(default_factory=list)
    delays: dict[int, int] = field(default_factory=dict)
    since: float = 0.0  # when the owed (or maybe) message went
    log: list[str] = field(default_factory=list)
    running: str = ""  # the step under way

    @property
    def done(self) -> bool:
        return self.next_n >= MESSAGES and self.owed < 0 and self.maybe < 0

    def _near(self) -> float:
        """A delay around the moment the owed echo comes (seconds from now)."""
        pending = self.owed if self.owed >= 0 else self.maybe
        due = self.delays[pending] / 1000 - (time.monotonic() - self.since)
        return max(0.0, due + self.rng.uniform(-0.04, 0.04))

    def _new(self) -> int:
        n = self.next_n
        self.delays[n] = self.rng.choice((0, 20, 60, 150, 250))
        return n

    def next_step(self, can_stall: bool) -> Step:
        r = self.rng
        if self.owed >= 0 or self.maybe >= 0 or self.next_n >= MESSAGES:
            if self.owed < 0 and self.maybe < 0:  # the end: nothing owed
                return Step("recv", timeout=0)
            # a pass only over an echo owed for sure: one that went through
            # (an exchange given up on unsent) would be answered by a PASS
            op = r.choices(
                ("recv", "send", "pass", "exchange", "idle"),
                (60, 10, 8 if self.owed >= 0 else 0, 12, 10),
            )[0]
            if op == "idle":  # the program does something else: the echo comes meanwhile
                return Step("idle", after=self._near() + 0.05)
            if op in ("send", "exchange"):
                return Step(op, self._new(), timeout=30.0)
            if op == "pass":
                return Step(op)
            mode = r.choice(
                ("timeout", "timeout", "nonblock", "cancel", "cancel", "block", "stall", "freeze")
            )
            if mode == "freeze":
                after = r.uniform(0.005, 0.03)
                return Step(
                    "recv", timeout=30.0, giveup="freeze", after=after, hold=self._near() + 0.03
                )
            if mode == "stall" and not can_stall:
                mode = "block"
            if mode == "timeout":
                return Step("recv", timeout=self._near())
            if mode == "nonblock":
                return Step("recv", timeout=0)
            t = r.choice((None, 30.0))
            if mode == "cancel":
                return Step("recv", timeout=t, giveup="cancel", after=self._near())
            return Step("recv", timeout=t, giveup="stall" if mode == "stall" else "")
        # nothing owed: the next message, or a receive that must find nothing
        op = r.choices(("send", "exchange", "recv"), (45, 45, 10))[0]
        if op == "recv":
            return Step("recv", timeout=r.choice((0, 30.0)))
        n = self._new()
        if op == "send":
            return Step("send", n)
        mode = r.choice(("none", "timeout", "cancel", "stall", "freeze"))
        near = max(0.0, self.delays[n] / 1000 + r.uniform(-0.04, 0.04))
        if mode == "stall" and not can_stall:
            mode = "none"
        if mode == "timeout":
            return Step("exchange", n, timeout=near)
        if mode == "freeze":
            after = r.uniform(0.005, 0.03)
            return Step("exchange", n, giveup="freeze", after=after, hold=near + 0.03)
        if mode == "cancel":  # at once (nothing sent, maybe), or as the echo comes
            after = r.choice((0.0, r.uniform(0, near), near))
            return Step("exchange", n, timeout=30.0, giveup="cancel", after=after)
        return Step("exchange", n, timeout=30.0, giveup="stall" if mode == "stall" else "")

    def check(self, step: Step, outcome: Outcome, sent_now: Callable[[], int]) -> None:
        """Judge ``outcome`` of ``step`` and move on; AssertionError names
        the broken promise."""
        kind, what = outcome
        self.log.append(f"{step} -> {kind} {_show(what)}")
        if step.op == "idle":
            return
        if kind == "refused":
            assert isinstance(what, errors.NotYourTurn), what
        pending = self.owed if self.owed >= 0 else self.maybe
        if step.op == "recv":
            if kind == "ok":
                assert isinstance(what, Message)
                got = echo_of(what)
                assert pending >= 0, f"a receive with no echo owed returned {_show(what)}"
                assert got == pending, f"echo of #{got} while #{pending}'s was owed"
                if self.maybe >= 0:  # the exchange given up on was sent
                    self.sent.append(self.maybe)
                self.got.append(got)
                self.owed = self.maybe = -1
            elif kind == "refused":
                assert REFUSED_IDLE.search(str(what)), what
                assert self.owed < 0, f"#{self.owed}'s echo is lost: {what}"
                if self.maybe >= 0:  # not sent, says the turn: nor says kupd
                    assert sent_now() == len(self.sent), (
                        f"exchange #{self.maybe} was sent, its echo lost: {what}"
                    )
                    self.maybe = -1
            else:
                assert pending >= 0 or what in ("cancelled", "interrupted"), (
                    f"a receive with nothing owed gave {kind} {what} (expected NotYourTurn)"
                )
            return
        # send, pass, exchange
        if pending >= 0:
            if kind == "refused" and REFUSED_OWED.search(str(what)):
                if self.maybe >= 0:  # the kernel (or kupd) has something: it was sent
                    self.sent.append(self.maybe)
                    self.owed, self.maybe = self.maybe, -1
                assert sent_now() == len(self.sent), f"a refused {step.op} was sent: {what}"
                return
            assert self.maybe >= 0, f"{step.op} while #{pending}'s echo was owed: {kind} {what}"
            # the exchange given up on was not sent: the turn was this side's
            assert kind != "refused", what
            self.maybe = -1
        else:
            assert kind != "refused", f"{step.op} with nothing owed refused: {what}"
        assert step.op != "pass", f"pass while #{pending}'s echo was owed: {kind} {what}"
        n = step.n
        self.next_n = n + 1
        if kind == "ok":
            self.sent.append(n)
            assert sent_now() == len(self.sent), (
                f"{step.op} #{n}: the counter says {sent_now()} sent, the schedule "
                f"{len(self.sent)}: a message given up on was sent and its echo lost"
            )
            if step.op == "send":
                self.owed, self.since = n, time.monotonic()
            else:
                assert isinstance(what, Message)
                assert echo_of(what) == n, f"exchange #{n} got {_show(what)}"
                self.got.append(n)
            return
        assert step.op == "exchange", (kind, what)
        self.maybe, self.since = n, time.monotonic()

    def finish_checks(self, sent_now: Callable[[], int]) -> None:
        assert self.got == self.sent, f"sent {self.sent}, echoes {self.got}"
        # in order, each once (an exchange given up on unsent leaves a gap)
        assert self.sent == sorted(set(self.sent)), self.sent
        assert sent_now() == len(self.sent), "the kernel got more than was sent"


def _show(what: object) -> str:
    if isinstance(what, Message):
        return f"{what.kind.name} {what.data[:-8]!r}"
    if isinstance(what, errors.KupError):
        return f"{type(what).__name__}: {what}"
    return str(what)


# -- running it -----------------------------------------------------------


def _classify(exc: BaseException) -> Outcome:
    if isinstance(exc, errors.NotYourTurn):
        return ("refused", exc)
    if isinstance(exc, errors.DeadlineExceeded):
        return ("gaveup", "deadline")
    if isinstance(exc, errors.NotReady):
        return ("gaveup", "notready")
    raise exc


@contextlib.contextmanager
def _stopped(pid: int) -> Iterator[None]:
    """kupd stopped (SIGSTOP: every thread of it) for the body."""
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(lambda: all_stopped(pid), what="kupd to stop")
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _settle_proxy(proxy: ArmedStall) -> None:
    """After an operation: a stall the client gave up on ends once the proxy
    has seen the reset (it forwards what it held, in order: dropping it
    would break the connection's HPACK state); one that never stalled (the
    operation failed without a reply) is disarmed."""
    if proxy.stalled.is_set():
        assert proxy.reset_seen.wait(30), "the client did not reset the stalled call"
    else:
        proxy.resume()


def _run_sync(
    c: Client, proxy: ArmedStall, pid: int, lease_id: str, step: Step, m: Model
) -> Outcome:
    if step.op == "idle":
        time.sleep(step.after)
        return ("ok", None)
    main = threading.get_ident()
    stop = threading.Event()
    missed = threading.Event()
    watcher = None
    if step.giveup:
        _ARMED.set()
    if step.giveup == "stall":
        proxy.arm()

        def watch() -> None:  # give up once kupd's reply is in and its status held
            while not stop.is_set():
                if proxy.status_held.wait(0.01):
                    _interrupt_main(main, stop, missed)
                    return

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
    elif step.giveup == "freeze":

        def freeze() -> None:  # stop kupd, let the echo come, give up, continue it
            if stop.wait(step.after):
                return
            with _stopped(pid):
                time.sleep(step.hold)
                if not stop.is_set():  # it cannot end while kupd is stopped
                    _interrupt_main(main, stop, missed)
                    stop.wait(10)
                    time.sleep(0.02)  # the client's reset on its way to kupd

        watcher = threading.Thread(target=freeze, daemon=True)
        watcher.start()
    elif step.giveup == "cancel":
        signal.setitimer(signal.ITIMER_REAL, max(step.after, 0.0005))
    try:
        try:
            if step.op == "recv":
                return ("ok", c.lease_receive(lease_id, step.timeout))
            if step.op == "send":
                c.lease_send(lease_id, payload(step.n, m.delays[step.n]))
                return ("ok", None)
            if step.op == "pass":
                c.lease_pass(lease_id)
                return ("ok", None)
            data = payload(step.n, m.delays[step.n])
            return ("ok", c.lease_exchange(lease_id, data, step.timeout))
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            _ARMED.clear()
            stop.set()
            if watcher is not None:
                watcher.join()
    except Interrupted:
        # also one CPython turned into a RuntimeError in a Condition.wait:
        # kupclient raises the interrupt itself (kupclient._start)
        return ("gaveup", "interrupted")
    except errors.KupError as exc:
        return _classify(exc)
    finally:
        assert not missed.is_set(), "the interrupt did not reach the client's wait for its RPC"
        if step.giveup == "stall":
            _settle_proxy(proxy)


async def _run_async(
    c: AsyncClient, proxy: ArmedStall, pid: int, lease_id: str, step: Step, m: Model
) -> Outcome:
    if step.op == "idle":
        await asyncio.sleep(step.after)
        return ("ok", None)
    op: Coroutine[Any, Any, Message | None]
    if step.op == "recv":
        op = c.lease_receive(lease_id, step.timeout)
    elif step.op == "send":
        op = c.lease_send(lease_id, payload(step.n, m.delays[step.n]))
    elif step.op == "pass":
        op = c.lease_pass(lease_id)
    else:
        op = c.lease_exchange(lease_id, payload(step.n, m.delays[step.n]), step.timeout)
    if step.giveup == "stall":
        proxy.arm()
    task = asyncio.ensure_future(op)
    timer = None
    if step.giveup == "cancel":
        timer = asyncio.get_running_loop().call_later(step.after, task.cancel)
    elif step.giveup == "freeze":
        await asyncio.wait([task], timeout=step.after)
        if not task.done():
            with _stopped(pid):
                await asyncio.sleep(step.hold)
                task.cancel()
                await asyncio.wait([task])
                await asyncio.sleep(0.02)  # the client's reset on its way to kupd
    elif step.giveup == "stall":
        while not task.done():  # give up once kupd's reply is in and its status held
            if proxy.status_held.is_set():
                task.cancel()
                break
            await asyncio.sleep(0.01)
    try:
        return ("ok", await task)
    except asyncio.CancelledError:
        return ("gaveup", "cancelled")
    except errors.KupError as exc:
        return _classify(exc)
    finally:
        if timer is not None:
            timer.cancel()
        if step.giveup == "stall":
            await asyncio.to_thread(_settle_proxy, proxy)


#: the NotYourTurn texts, for the summary
_REFUSALS = {
    "kernel-holds-turn": "kernel holds the turn",
    "held": "a receive whose caller had gone",
    "unread": "message is unread",
    "again_of": r"receive it first \(again_of\)",
    "already-received": "already received",
}


def _summary(logs: list[list[str]]) -> None:
    """What the schedules ran into (pytest -s shows it; KUP_NOLOSS_VERBOSE=1
    the steps too): operation, give-up, outcome."""
    seen: collections.Counter[str] = collections.Counter()
    for log in logs:
        for line in log:
            step, _, outcome = line.partition(" -> ")
            op = step.split()[0].split("#")[0]
            how = next((g for g in ("stall", "cancel", "freeze") if f" {g}" in step), "")
            if "NotYourTurn" in outcome:
                outcome = "refused " + next(
                    (k for k, v in _REFUSALS.items() if re.search(v, outcome)), "?"
                )
            seen[f"{op:8} {how:6} {' '.join(outcome.split()[:2])[:40]}"] += 1
    print(f"\n{len(logs)} schedules, {sum(map(len, logs))} steps")
    for what, n in sorted(seen.items()):
        print(f"  {n:4}  {what}")
    if os.environ.get("KUP_NOLOSS_VERBOSE"):
        for log in logs:
            print("  --\n  " + "\n  ".join(log))


def _channel_free(direct: Client, chan: int) -> bool:
    return next(ch for ch in direct.devices("echo")[0].channels if ch.id == chan).state == "free"


def _failed(kupd: Kupd, seed: int, m: Model, exc: BaseException) -> AssertionError:
    """The failure, with what replays it, the steps run, and -- for an error
    the model did not expect -- the end of kupd's log."""
    steps = "\n  ".join([*m.log, f"{m.running} -> (this step)"])
    tail = "" if isinstance(exc, AssertionError) else "\nkupd:\n" + "\n".join(
        kupd.log().splitlines()[-30:]
    )
    return AssertionError(
        f"schedule {seed} (KUP_NOLOSS_SEEDS={seed} replays it): "
        f"{type(exc).__name__}: {exc}\n  {steps}{tail}"
    )


#: the last receive of a schedule: nothing is owed, it must find nothing
LAST = Step("recv", timeout=0)
#: bound on a schedule's steps (a model bug, not a timing)
MAX_STEPS = 300


def _schedule_sync(
    kupd: Kupd, direct: Client, c: Client, proxy: ArmedStall, seed: int
) -> list[str]:
    lease = c.attach("echo")
    lid = lease.lease_id
    assert c.lease_receive(lid, timeout=30).kind == Kind.PASS
    base = _sent_to_kernel(kupd, lease.channel)

    def sent_now() -> int:
        return _sent_to_kernel(kupd, lease.channel) - base

    m = Model(random.Random(seed), base)
    try:
        while not m.done:
            assert len(m.log) < MAX_STEPS, "the schedule does not end"
            step = m.next_step(can_stall=True)
            m.running = str(step)
            m.check(step, _run_sync(c, proxy, kupd.pid, lid, step, m), sent_now)
        m.check(LAST, _run_sync(c, proxy, kupd.pid, lid, LAST, m), sent_now)
        m.finish_checks(sent_now)
        c.release(lid)
        wait_until(lambda: _channel_free(direct, lease.channel), what="the channel to be free")
    except (AssertionError, errors.KupError, TimeoutError) as exc:
        raise _failed(kupd, seed, m, exc) from exc
    return m.log


async def _schedule_async(
    kupd: Kupd, direct: Client, c: AsyncClient, proxy: ArmedStall, seed: int
) -> list[str]:
    lease = await c.attach("echo")
    lid = lease.lease_id
    assert (await c.lease_receive(lid, timeout=30)).kind == Kind.PASS
    base = _sent_to_kernel(kupd, lease.channel)

    def sent_now() -> int:
        return _sent_to_kernel(kupd, lease.channel) - base

    m = Model(random.Random(seed), base)
    try:
        while not m.done:
            assert len(m.log) < MAX_STEPS, "the schedule does not end"
            step = m.next_step(can_stall=True)
            m.running = str(step)
            m.check(step, await _run_async(c, proxy, kupd.pid, lid, step, m), sent_now)
        m.check(LAST, await _run_async(c, proxy, kupd.pid, lid, LAST, m), sent_now)
        m.finish_checks(sent_now)
        await c.release(lid)
        await asyncio.to_thread(
            wait_until, lambda: _channel_free(direct, lease.channel), what="the channel to be free"
        )
    except (AssertionError, errors.KupError, TimeoutError) as exc:
        raise _failed(kupd, seed, m, exc) from exc
    return m.log


def test_the_sync_client_loses_no_echo_whatever_it_gives_up_on(
    kupd: Kupd, client: Client, proxy: ArmedStall
) -> None:
    old = signal.signal(signal.SIGALRM, _interrupt)
    try:
        with Client(proxy.path) as c:
            logs = [_schedule_sync(kupd, client, c, proxy, seed) for seed in _seeds()]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    _summary(logs)


def test_the_asyncio_client_loses_no_echo_whatever_it_gives_up_on(
    kupd: Kupd, client: Client, proxy: ArmedStall
) -> None:
    async def main() -> list[list[str]]:
        async with AsyncClient(proxy.path) as c:
            return [await _schedule_async(kupd, client, c, proxy, seed) for seed in _seeds()]

    _summary(asyncio.run(main()))
