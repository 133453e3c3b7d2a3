"""A stateful random probe of kupd through the public client library
(kupclient's sync Client): hypothesis drives random interleavings of
Sessions and Attach leases on a real kupd serving two tenants from a real
kupsim with the echo module, and checks every answer against a small
reference model:

* a channel someone holds is Busy to everyone else, one released is
  attachable again, a channel outside a tenant's grant is refused;
* the turn: a fresh channel's first hand-over is the kernel's PASS, a send
  needs the turn (NotYourTurn otherwise, nothing sent), every DATA message
  is answered by exactly one reply -- echo's transform of it (even
  channels: unchanged, odd ones: ASCII a-z upper-cased) -- received once,
  whatever timeouts and non-blocking receives came between (nothing lost,
  nothing duplicated), and a Call's reply is its own request transformed
  by the pool channel that carried it;
* a lease id works for its tenant only (another tenant gets the answer of
  an id that never existed), and after its release only says it ended;
* closing a Session, or releasing a lease, while an operation waits on it
  ends that operation with an error and frees the channel;
* an admin drain ends every lease, a reload that narrows a tenant's grant
  ends the leases outside it (and says which);
* every error is a class of the taxonomy with a message, never gRPC's
  UNKNOWN nor INTERNAL;
* after each example, everything closed: no lease listed by the admin, no
  channel held (ListDevices), kupd's gauges of held things back to zero,
  and every lease a tenant's Watch saw taken also seen released.

Bounded for the suite (a few dozen short examples, < 60 s);
KUPD_FUZZ_EXAMPLES=N runs N examples (KUPD_FUZZ_STEPS: steps each) for a
longer exploration by hand (its pytest timeout grows with it: TIMEOUT),
KUPD_FUZZ_SHRINK=0 without shrinking.

Each failing example's first report -- its exception and traceback, the
steps it ran (with their arguments and times), the model's state, and the
tails of kupd's and kupsim's logs -- is appended to a file (KUPD_FUZZ_REPORT,
else first-reports.txt in the pytest tmp dir; the path is printed and noted
on the failure) as it happens, before hypothesis replays the example: a
replay that goes differently (hypothesis's Flaky / FlakyStrategyDefinition)
cannot hide the failure it replays."""

from __future__ import annotations

import collections
import functools
import os
import random
import shutil
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule, run_state_machine_as_test
from tenancy_helpers import TenantKupd, socket_dir

from kupclient import Channel, Client, DeviceHandle, Kind, Watch
from kupd import errors
from kupd.testing import KupSim, in_background, kupsim, wait_until

T = TypeVar("T")

CHANNELS = 16  # echo's channels here (KUP_PARAM_ECHO_CHANNELS)
POOL = 2  # of them the Call pool's
NARROW = frozenset(range(8, 16))  # tenant t2's grant in the narrowed config

DEVICES = f"""
[[device]]
name = "echo"
call_channels = {POOL}
"""


def t2_socket(moved: bool) -> str:
    """The name of tenant t2's socket (a reload may move it)."""
    return "t2m" if moved else "t2"


#: with limits: tenant t1's max_sessions, tenant t2's max_message_bytes
T1_MAX_SESSIONS = 3
T2_MAX_BYTES = 64


def tenants(narrow: bool, moved: bool = False, limits: bool = False) -> str:
    """The tenants table: t2 ``narrow``ed to channels 8-15, its socket
    ``moved``, and ``limits`` on both."""
    t2 = '\nchannels = "8-15"' if narrow else ""
    t1_limit = f"max_sessions = {T1_MAX_SESSIONS}\n" if limits else ""
    t2_limit = f"max_message_bytes = {T2_MAX_BYTES}\n" if limits else ""
    return (
        f'[[tenant]]\nname = "t1"\nsocket = "@DIR@/t1.sock"\n{t1_limit}'
        '[[tenant.grant]]\ndevice = "echo"\n\n'
        f'[[tenant]]\nname = "t2"\nsocket = "@DIR@/{t2_socket(moved)}.sock"\n{t2_limit}'
        f'[[tenant.grant]]\ndevice = "echo"{t2}\n'
    )


#: the clients of an example: two of tenant t1, one of t2
CLIENT_TENANTS = ("t1", "t1", "t2")

#: gauges of things held, all back to zero once everything is closed
HELD_GAUGES = (
    "kupd_sessions",
    "kupd_leases",
    "kupd_sessions_unattached",
    "kupd_calls_queued",
    "kupd_tenant_leases",
    "kupd_tenant_calls_in_flight",
)

EXAMPLES = int(os.environ.get("KUPD_FUZZ_EXAMPLES", "40"))
STEPS = int(os.environ.get("KUPD_FUZZ_STEPS", "20"))
PHASES = (
    (Phase.explicit, Phase.generate) if os.environ.get("KUPD_FUZZ_SHRINK") == "0" else tuple(Phase)
)
#: pytest-timeout's bound on the whole probe: the suite's 300 s
#: (pyproject.toml), or 0.1 s a step for a long exploration (about ten
#: times what one takes on a loaded 2-core machine).  Under the suite's
#: bound a long run was cut off mid-example, and hypothesis's replay of
#: that example then ended FlakyStrategyDefinition (the second run stopped
#: drawing earlier).  What hangs is caught by the probe's own bounded
#: waits, each naming what it waited for.
TIMEOUT = max(300.0, EXAMPLES * STEPS * 0.1)
#: where failing examples' first reports go ("": the pytest tmp dir's)
REPORT = os.environ.get("KUPD_FUZZ_REPORT", "")
#: lines of kupd's and kupsim's logs in a report
LOG_TAIL = 120
#: failures reported in full; later ones (a shrink's replays) in one line
FULL_REPORTS = 5


def echoed(chan: int, data: bytes) -> bytes:
    """What echo answers ``data`` with on channel ``chan``."""
    return data if chan % 2 == 0 else data.upper()


def check_error(exc: errors.KupError) -> None:
    """An error of the taxonomy, with a message; never gRPC's UNKNOWN (an
    unmapped exception) nor INTERNAL (nothing here breaks the protocol)."""
    assert type(exc) is not errors.KupError, exc
    assert exc.message.strip(), type(exc)
    assert exc.grpc_code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), (
        type(exc).__name__,
        exc.grpc_code,
        exc.message,
    )


#: (operation, outcome) -> how many times: what the examples exercised
#: (printed at the end: pytest -s)
SEEN: collections.Counter[tuple[str, str]] = collections.Counter()


def attempt(fn: Callable[[], T]) -> tuple[T | None, errors.KupError | None]:
    op = sys._getframe(1).f_code.co_name
    try:
        got = fn()
    except errors.KupError as exc:
        check_error(exc)
        SEEN[op, type(exc).__name__] += 1
        return None, exc
    SEEN[op, "ok"] += 1
    return got, None


#: the reason a Session its client cancels ends with: the client half-closes
#: the stream as it cancels it, and kupd may see either first
CANCELLED = "stream cancelled|stream ended"

#: the reason of a lease the model lost track of (KupdMachine.chaos): any
ANY_REASON = "*"

#: a reply is late: a timed-out or non-blocking wait, nothing lost
LATE = (errors.NotReady, errors.DeadlineExceeded)


#: the kernel hand-over owed: (kind, data, its sequence number)
Owed = tuple[Kind, bytes, int]
State = tuple[Owed | None, bool, int]  # Holding.owed, .hold, .n


def lease_step(chan: int, state: State, op: tuple[str, bytes, float], res: Any) -> list[State]:
    """The states a lease in ``state`` may be in after ``op`` (kind, data,
    timeout) gave ``res`` ((value, None) or (None, error)), alongside another
    operation on it; [] when that outcome is impossible from ``state``."""
    owed, hold, n = state
    kind, data, timeout = op
    got, exc = res
    no_turn = hold or (owed is not None and owed[0] is Kind.DATA)
    if timeout == 0 and kind in ("recv", "exch") and isinstance(exc, errors.NotReady):
        if kind == "recv":  # nothing there, or another operation under way
            return [state]
    if kind in ("send", "pass", "exch"):
        if exc is not None and isinstance(exc, errors.NotYourTurn):
            return [state] if (no_turn or owed is not None) else []
        if no_turn:
            return []
        if kind == "pass":
            return [((Kind.PASS, b"", n + 1), False, n + 1)] if exc is None else []
        after: State = (
            (None, True, n + 1)
            if data.startswith(b"!hold")
            else ((Kind.DATA, echoed(chan, data), n + 1), False, n + 1)
        )
        if kind == "send":
            return [after] if exc is None else []
        if exc is not None:  # sent; the reply is owed
            return [after] if isinstance(exc, LATE) else []
        return lease_step(chan, after, ("recv", b"", timeout), res)
    if exc is None:
        return [(None, False, n)] if not hold and owed == (got.kind, got.data, got.seq) else []
    if isinstance(exc, LATE):
        return [state] if (hold or owed is not None) else []
    if isinstance(exc, errors.NotYourTurn):
        return [state] if (owed is None and not hold) else []
    return []


@dataclass
class Holding:
    """A channel held through a Session or an Attach lease, as the model sees it."""

    kind: str  # "session" | "lease"
    tenant: str
    client: int
    channel: int
    lease_id: str
    session: Channel | None = None
    #: the kernel's hand-over not yet received: (kind, data); None when this
    #: side holds the turn and has read it
    owed: Owed | None = (Kind.PASS, b"", 1)
    #: the kernel's hand-overs so far, counting those owed (their seq)
    n: int = 1
    hold: bool = False  # "!hold" sent: the kernel keeps the turn for good
    dead: str = ""  # why kupd ended it (drain, reload)

    def __str__(self) -> str:
        return f"{self.kind} {self.lease_id} ch {self.channel} of {self.tenant}"


@dataclass
class Model:
    narrow: bool = False
    moved: bool = False  # t2's socket moved by a reload
    limits: bool = False  # the config file's limits (T1_MAX_SESSIONS, T2_MAX_BYTES)
    #: t2's max_message_bytes in force (0: none): a reload that keeps its
    #: socket does not raise it (docs/gateway.md, "Reload"), a new socket does
    t2_bytes: int = 0
    drained: bool = False
    pool: frozenset[int] = frozenset()
    holdings: list[Holding] = field(default_factory=list)
    #: (lease id, tenant, the reason it ended)
    ended: list[tuple[str, str, str]] = field(default_factory=list)
    seq: int = 0

    def alive(self) -> list[Holding]:
        return [h for h in self.holdings if not h.dead]

    def held(self) -> set[int]:
        return {h.channel for h in self.alive()}

    def max_bytes(self, tenant: str) -> int:
        return (self.t2_bytes or 4096) if tenant == "t2" else 4096

    def at_limit(self, tenant: str, more: int = 0) -> bool:
        """``tenant`` has (with ``more`` being taken) all its max_sessions."""
        mine = sum(1 for h in self.alive() if h.tenant == tenant) + more
        return self.limits and tenant == "t1" and mine >= T1_MAX_SESSIONS

    def allowed(self, tenant: str, chan: int) -> bool:
        return not (self.narrow and tenant == "t2" and chan not in NARROW)


class Watcher:
    """A tenant's Watch, collecting LEASE_TAKEN / LEASE_RELEASED in a thread."""

    def __init__(self, client: Client) -> None:
        self.taken: set[str] = set()
        self.released: dict[str, str] = {}  # lease id -> the reason it ended
        self.error: BaseException | None = None
        self.watch: Watch = client.watch("echo")
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for ev in self.watch:
                if ev.type.name == "LEASE_TAKEN":
                    self.taken.add(ev.lease_id)
                elif ev.type.name == "LEASE_RELEASED":
                    self.released[ev.lease_id] = ev.reason
        except BaseException as exc:  # looked at by the teardown
            self.error = exc


payload_kinds = st.sampled_from(
    ["plain", "plain", "plain", "delay", "locked", "hold", "mid", "big"]
)
receive_timeouts = st.sampled_from([0, 0, 0.05, 2.0, 10.0])
picks = st.integers(0, 1000)
#: operations of lease_race: (op, payload kind or timeout, timeout)
lease_ops = st.one_of(
    st.tuples(st.just("send"), st.sampled_from(["plain", "delay", "hold"]), st.just(0)),
    st.tuples(st.just("pass"), st.just(""), st.just(0)),
    st.tuples(st.just("recv"), st.just(""), st.sampled_from([0, 0.3, 2.0])),
    st.tuples(st.just("exch"), st.sampled_from(["plain", "delay"]), st.sampled_from([0, 2.0])),
)

#: the admin's actions end what the tenants hold: one draw in four acts
rare = st.integers(0, 3).map(lambda n: n == 0)


def tail(text: str, lines: int = LOG_TAIL) -> str:
    return "\n".join(text.splitlines()[-lines:])


class FirstReports:
    """Writes each failing example's report to ``path`` the moment it fails:
    hypothesis prints a failure only from its replay of the example, and a
    replay whose timing differs may fail elsewhere or not at all."""

    def __init__(self, path: Path, k: TenantKupd) -> None:
        self.path = path
        self.k = k
        self.examples = 0  # examples started
        self.failures = 0
        path.write_text("")

    def record(self, where: str, exc: BaseException, trace: list[str], model: object) -> None:
        self.failures += 1
        head = f"=== failure {self.failures}: example {self.examples}, in {where}: {exc!r:.300}"
        with self.path.open("a") as f:
            if self.failures > FULL_REPORTS:
                f.write(head + "\n")
                return
            kupd_log, sim_log = self.k.log(), self.k.sim.output()
            f.write(
                f"{head}\n--- traceback\n{''.join(traceback.format_exception(exc))}"
                f"--- steps ({len(trace)})\n" + "\n".join(trace) + "\n"
                f"--- model\n{model}\n"
                f"--- kupd log (last {LOG_TAIL} lines)\n{tail(kupd_log)}\n"
                f"--- kupsim output (last {LOG_TAIL} lines)\n{tail(sim_log)}\n\n"
            )


def step(**arguments: Any) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """hypothesis's ``@rule(**arguments)``, the step written to the
    example's trace before it runs and its failure reported as it happens
    (:class:`FirstReports`)."""

    def decorate(fn: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(fn)
        def run(self: KupdMachine, *a: Any, **kw: Any) -> None:
            # (a rule may call another: end_while_waiting its drain, reload)
            args = ", ".join([*map(repr, a), *(f"{k}={v!r}" for k, v in kw.items())])
            self.trace.append(f"{time.monotonic() - self.t0:8.3f}s {fn.__name__}({args})")
            try:
                fn(self, *a, **kw)
            except BaseException as exc:
                self.report(fn.__name__, exc)
                raise

        return rule(**arguments)(run)

    return decorate


class KupdMachine(RuleBasedStateMachine):
    #: an example set t2's max_message_bytes on its socket: the next starts
    #: from a socket without it
    t2_limited = False

    def __init__(self, k: TenantKupd, pool: frozenset[int], reports: FirstReports) -> None:
        super().__init__()
        self.k = k
        self.reports = reports
        reports.examples += 1
        self.t0 = time.monotonic()
        #: the steps run so far, for the first report (step)
        self.trace: list[str]
        start = time.strftime("%H:%M:%S", time.gmtime())
        self.trace = [f"example {reports.examples}, started {start} UTC (step times from then)"]
        self.reported = False
        self.m = Model(pool=pool)
        try:
            self._start()
        except BaseException as exc:
            self.report("__init__", exc)
            raise

    def report(self, where: str, exc: BaseException) -> None:
        """Record ``exc``, the example's first failure, before hypothesis replays it."""
        if not self.reported:
            self.reported = True
            self.reports.record(where, exc, self.trace, self.m)

    def _start(self) -> None:
        #: t1's ended leases: the reason their LEASE_RELEASED must give
        self.reasons: dict[str, str] = {}
        self.rng = random.Random(0)
        self.admin = self.k.admin()
        # each example starts from the configuration the model assumes,
        # whatever the one before left (a failed example's teardown may not
        # have got as far as restoring it)
        self.reset_config()
        self.clients, self.devs = self.connect_all()
        # t1's Watch, on a client of its own (the examples close theirs)
        self.watch_client = self.k.client("t1")
        self.watcher = Watcher(self.watch_client)
        # the Watch is subscribed once it sees a lease taken after it started
        wait_until(self._watch_subscribed, what="the Watch subscribed")

    def connect(self, path: str) -> tuple[Client, DeviceHandle]:
        """A new client of the socket at ``path``, with echo opened.

        Its first RPC may fail to connect, for a while: gRPC shares a
        connection between the channels of one target, and when a reload
        moved the socket away under a client still open (an old one of the
        tenant's), that connection failed its reconnect and waits out a
        backoff -- at most kupclient's RECONNECT_MAX_MS -- before the next
        try, even though the socket is back.  kupd promises a reconnect
        to the path (docs/gateway.md, "Reload"), not one at once; so only
        that failure, gRPC's connect failure, is retried, bounded.

        Not retried: a refusal by a retired server.  When a reload moved
        the socket away and the next one (reset_config) moved it back at
        once, the old client's connection to the retired server can still
        be open, and gRPC gives the new client that connection too; kupd
        serves it there as the tenant's again (kupd.tenants,
        SocketSet._reinstate) -- once refused "a reload moved its socket
        ... connect there", naming a path that served nobody (a CI run)."""
        c = Client(path)
        dev: list[DeviceHandle] = []

        def opened() -> bool:
            try:
                dev.append(c.open("echo"))
            except errors.Unavailable as exc:
                if "failed to connect" not in exc.message:
                    raise
                return False
            return True

        wait_until(opened, what=f"a new client of {path} connected")
        return c, dev[0]

    def connect_all(self) -> tuple[list[Client], list[DeviceHandle]]:
        """New clients of CLIENT_TENANTS, on their first configuration's sockets."""
        pairs = [self.connect(self.k.sock(t)) for t in CLIENT_TENANTS]
        return [c for c, _ in pairs], [d for _, d in pairs]

    def reset_config(self) -> None:
        """Back to the first configuration, undrained."""
        if KupdMachine.t2_limited:
            # t2's socket keeps a max_message_bytes through a reload that
            # lifts it: a new socket for t2 (moved there and back) has none
            self.k.write_config(DEVICES + tenants(False, moved=True))
            self.admin.reload()
            KupdMachine.t2_limited = False
        self.k.write_config(DEVICES + tenants(False))
        self.admin.reload()
        self.admin.drain("echo", undo=True)

    def _watch_subscribed(self) -> bool:
        lid = self.clients[0].attach("echo").lease_id
        self.clients[0].release(lid)
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            if lid in self.watcher.released:
                return True
            time.sleep(0.02)
        return False

    # -- helpers -------------------------------------------------------------------
    def payload(self, kind: str) -> bytes:
        self.m.seq += 1
        n = self.m.seq
        if kind == "delay":
            return b"!delay %d abc" % n
        if kind == "hold":
            return b"!hold %d" % n
        if kind == "locked":  # answered once the module held it locked 200 ms
            return b"!lockhold200 %d" % n
        if kind == "big":
            return b"b" * 5000
        if kind == "mid":  # over T2_MAX_BYTES
            return b"q%d:" % n + b"q" * 100
        letters = "".join(self.rng.choice("aBcxYz09 -") for _ in range(self.rng.randint(0, 40)))
        return b"m%d:%s" % (n, letters.encode())

    def pick(self, i: int, alive: bool = True) -> Holding:
        hs = self.m.alive() if alive else self.m.holdings
        return hs[i % len(hs)]

    def client_of(self, h: Holding, i: int) -> Client:
        """A client of the holding's tenant (for a lease: any of them)."""
        if h.kind == "session":
            return self.clients[h.client]
        mine = [c for c, t in zip(self.clients, CLIENT_TENANTS, strict=True) if t == h.tenant]
        return mine[i % len(mine)]

    def foreign(self, h: Holding) -> Client:
        return next(c for c, t in zip(self.clients, CLIENT_TENANTS, strict=True) if t != h.tenant)

    def gone(self, h: Holding, reason: str = "") -> None:
        """``h`` ended: ``reason``, the reason its LEASE_RELEASED gives, unless
        kupd ended it before (h.dead) -- by default its release's or close's."""
        self.m.holdings.remove(h)
        why = h.dead or reason or ("stream ended" if h.kind == "session" else "released")
        self.m.ended.append((h.lease_id, h.tenant, why))
        if h.tenant == "t1":
            self.reasons[h.lease_id] = why

    def expect_attach(self, tenant: str, chan: int | None) -> type[errors.KupError] | None:
        """The error an attach must get (None: it must succeed)."""
        if self.m.drained:
            return errors.KupError
        if chan is not None and not self.m.allowed(tenant, chan):
            return errors.PermissionDenied
        if self.m.at_limit(tenant):
            return errors.ResourceExhausted
        if chan is None:
            free = [
                c
                for c in range(CHANNELS)
                if c not in self.m.held() and c not in self.m.pool and self.m.allowed(tenant, c)
            ]
            return None if free else errors.KupError
        if not self.m.allowed(tenant, chan):
            return errors.PermissionDenied
        if chan in self.m.held() or chan in self.m.pool:
            return errors.Busy
        return None

    def take(self, ci: int, chan: int | None, session: bool) -> Holding | errors.KupError:
        tenant = CLIENT_TENANTS[ci]
        if session:
            ch, exc = attempt(lambda: self.devs[ci].channel(chan))
            if ch is None:
                assert exc is not None
                return exc
            return Holding("session", tenant, ci, ch.id, ch.lease.lease_id, session=ch)
        lease, exc = attempt(lambda: self.clients[ci].attach("echo", chan))
        if lease is None:
            assert exc is not None
            return exc
        return Holding("lease", tenant, ci, lease.channel, lease.lease_id)

    def settle_attach(
        self, ci: int, chan: int | None, got: Holding | errors.KupError, want: Any
    ) -> None:
        tenant = CLIENT_TENANTS[ci]
        what = f"attach of {'any' if chan is None else chan} by {tenant}"
        if want is None:
            assert isinstance(got, Holding), f"{what}: {type(got).__name__}: {got}"
        elif isinstance(got, Holding):
            raise AssertionError(f"{what} got {got}, wanted {want.__name__}")
        else:
            assert isinstance(got, want), f"{what}: {type(got).__name__}: {got}"
            if want is errors.Busy:
                assert not isinstance(got, errors.Releasing), f"{what}: {got}"
            return
        assert isinstance(got, Holding)
        if chan is not None:
            assert got.channel == chan, (what, got)
        assert got.channel not in self.m.held(), (what, got, self.m.holdings)
        assert got.channel not in self.m.pool, (what, got, self.m.pool)
        assert self.m.allowed(tenant, got.channel), (what, got)
        self.m.holdings.append(got)

    # -- the operations ------------------------------------------------------------
    def do_receive(self, h: Holding, ci: int, timeout: float) -> Any:
        if h.kind == "session":
            assert h.session is not None
            s = h.session
            return attempt(lambda: s.receive(timeout))
        c = self.client_of(h, ci)
        return attempt(lambda: c.lease_receive(h.lease_id, timeout))

    def settle_receive(self, h: Holding, got: Any, exc: errors.KupError | None) -> None:
        what = f"receive on {h}"
        if h.dead:
            assert exc is not None, f"{what}: ended ({h.dead}) but got {got}"
            return
        if h.hold:
            assert isinstance(exc, LATE), f"{what} (held by the kernel): {got} {exc!r}"
        elif h.owed is None:
            assert isinstance(exc, errors.NotYourTurn), f"{what} (turn here, read): {got} {exc!r}"
        elif exc is None:
            assert (got.kind, got.data, got.seq) == h.owed, f"{what}: got {got}, owed {h.owed}"
            h.owed = None
        else:
            assert isinstance(exc, LATE), f"{what}: {exc!r}"

    def settle_send(self, h: Holding, data: bytes, exc: errors.KupError | None) -> bool:
        """Whether the send went out (the model updated)."""
        what = f"send of {data[:20]!r} on {h}"
        if h.dead:
            assert exc is not None, f"{what}: ended ({h.dead}) but sent"
            return False
        limit = self.m.max_bytes(h.tenant)
        if h.session is not None:  # the client's own check: the limit at its attach
            limit = min(limit, h.session.max_msg)
        if len(data) > limit:
            assert isinstance(exc, errors.TooBig), f"{what} (limit {limit}): {exc!r}"
            return False
        if h.hold or (h.owed is not None and h.owed[0] is Kind.DATA):
            assert isinstance(exc, errors.NotYourTurn), f"{what} (no turn / unread): {exc!r}"
            return False
        if h.owed is not None and exc is not None:  # the PASS not back yet
            assert isinstance(exc, errors.NotYourTurn), f"{what}: {exc!r}"
            return False
        assert exc is None, f"{what}: {exc!r}"
        h.n += 1
        if data.startswith(b"!hold"):
            h.hold, h.owed = True, None
        else:
            h.owed = (Kind.DATA, echoed(h.channel, data), h.n)
        return True

    @step(
        ci=st.integers(0, len(CLIENT_TENANTS) - 1),
        chan=st.one_of(st.none(), st.integers(0, CHANNELS - 1)),
        session=st.booleans(),
    )
    def attach(self, ci: int, chan: int | None, session: bool) -> None:
        if len(self.m.alive()) >= 8:
            return
        want = self.expect_attach(CLIENT_TENANTS[ci], chan)
        self.settle_attach(ci, chan, self.take(ci, chan, session), want)

    @step(i=picks, ci=picks, timeout=receive_timeouts)
    def receive(self, i: int, ci: int, timeout: float) -> None:
        if not self.m.holdings:
            return
        h = self.pick(i, alive=False)
        if h.hold and timeout > 1:
            timeout = 0.05  # it would wait its whole timeout
        got, exc = self.do_receive(h, ci, timeout)
        self.settle_receive(h, got, exc)

    @step(i=picks, ci=picks, kind=payload_kinds)
    def send(self, i: int, ci: int, kind: str) -> None:
        if not self.m.holdings:
            return
        h = self.pick(i, alive=False)
        data = self.payload(kind)
        if h.kind == "session":
            assert h.session is not None
            s = h.session
            _, exc = attempt(lambda: s.send(data))
        else:
            c = self.client_of(h, ci)
            _, exc = attempt(lambda: c.lease_send(h.lease_id, data))
        self.settle_send(h, data, exc)

    @step(i=picks, ci=picks, kind=payload_kinds, timeout=receive_timeouts)
    def exchange(self, i: int, ci: int, kind: str, timeout: float) -> None:
        if not self.m.holdings:
            return
        h = self.pick(i, alive=False)
        data = self.payload(kind)
        if kind == "hold" and timeout > 1:
            timeout = 0.05
        if h.kind == "session":
            assert h.session is not None
            s = h.session
            got, exc = attempt(lambda: s.exchange(data, timeout))
        else:
            c = self.client_of(h, ci)
            got, exc = attempt(lambda: c.lease_exchange(h.lease_id, data, timeout))
        what = f"exchange of {data[:20]!r} on {h}"
        if h.dead:
            assert exc is not None, f"{what}: ended ({h.dead}) but got {got}"
            return
        # the send half: refused (nothing sent), or out, and then its reply
        # came (got), or is owed (a late error)
        sent_exc = exc if isinstance(exc, (errors.NotYourTurn, errors.TooBig)) else None
        before = (h.owed, h.hold)
        if not self.settle_send(h, data, sent_exc):
            return
        if exc is None:
            assert before != (None, True)
            self.settle_receive(h, got, None)
        else:
            assert isinstance(exc, LATE), f"{what}: {exc!r}"

    @step(i=picks, ci=picks)
    def pass_turn(self, i: int, ci: int) -> None:
        if not self.m.holdings:
            return
        h = self.pick(i, alive=False)
        if h.kind == "session":
            assert h.session is not None
            s = h.session
            _, exc = attempt(s.pass_)
        else:
            c = self.client_of(h, ci)
            _, exc = attempt(lambda: c.lease_pass(h.lease_id))
        what = f"pass on {h}"
        if h.dead:
            assert exc is not None, f"{what}: ended ({h.dead}) but passed"
        elif h.hold or (h.owed is not None and h.owed[0] is Kind.DATA):
            assert isinstance(exc, errors.NotYourTurn), f"{what}: {exc!r}"
        elif h.owed is not None and exc is not None:
            assert isinstance(exc, errors.NotYourTurn), f"{what}: {exc!r}"
        else:
            assert exc is None, f"{what}: {exc!r}"
            h.n += 1
            h.owed = (Kind.PASS, b"", h.n)

    @step(i=picks, ci=picks)
    def release(self, i: int, ci: int) -> None:
        if not self.m.holdings:
            return
        h = self.pick(i, alive=False)
        if h.kind == "session":
            assert h.session is not None
            h.session.close()  # never raises
        else:
            c = self.client_of(h, ci)
            _, exc = attempt(lambda: c.release(h.lease_id))
            if h.dead:
                # "has ended (drained)"; a reload's end names the rule
                want = errors.PermissionDenied if h.dead == "policy reload" else errors.NotFound
                assert isinstance(exc, want), f"release of {h} ({h.dead}): {exc!r}"
            else:
                assert exc is None, f"release of {h}: {exc!r}"
        self.gone(h)

    @step(i=picks, op=st.sampled_from(["send", "receive", "pass", "release", "exchange"]))
    def foreign_lease_id(self, i: int, op: str) -> None:
        """Another tenant's use of a lease id: the answer of an unknown id, no effect."""
        leases = [h for h in self.m.holdings if h.kind == "lease"]
        if not leases:
            return
        h = leases[i % len(leases)]
        c = self.foreign(h)
        fns: dict[str, Callable[[], object]] = {
            "send": lambda: c.lease_send(h.lease_id, b"x"),
            "receive": lambda: c.lease_receive(h.lease_id, 0),
            "pass": lambda: c.lease_pass(h.lease_id),
            "release": lambda: c.release(h.lease_id),
            "exchange": lambda: c.lease_exchange(h.lease_id, b"x", 0.05),
        }
        _, exc = attempt(fns[op])
        assert isinstance(exc, errors.NotFound), f"{op} of {h} by the other tenant: {exc!r}"
        assert "released, expired, or never taken" in exc.message, exc.message

    @step(i=picks, foreign=st.booleans())
    def ended_lease_id(self, i: int, foreign: bool) -> None:
        if not self.m.ended:
            return
        lid, tenant, why = self.m.ended[i % len(self.m.ended)]
        ci = next(j for j, t in enumerate(CLIENT_TENANTS) if (t == tenant) != foreign)
        _, exc = attempt(lambda: self.clients[ci].lease_receive(lid, 0))
        # its own tenant is told how it ended: the policy's or the admin's
        # refusal, or that it has ended; another tenant as for any unknown id
        denied = not foreign and why in ("policy reload", "revoked")
        want = errors.PermissionDenied if denied else errors.NotFound
        if why == ANY_REASON and not foreign:  # the chaos may have revoked it
            assert isinstance(exc, (errors.NotFound, errors.PermissionDenied)), repr(exc)
            return
        assert type(exc) is want, f"receive on {lid}, ended ({why}), foreign {foreign}: {exc!r}"

    @step(
        i=picks,
        ci=picks,
        how=st.sampled_from(["close", "close", "client", "drain", "revoke", "reload", "move"]),
        pause=st.sampled_from([0.0, 0.05, 0.3]),
        exchange=st.booleans(),
    )
    def end_while_waiting(self, i: int, ci: int, how: str, pause: float, exchange: bool) -> None:
        """End a Session or a lease while a receive (or an exchange) waits on
        it: its close or release, its client's close, an admin drain or
        revocation, a reload that takes its channel or moves its socket."""
        hs = [h for h in self.m.alive() if h.owed is None or h.hold]
        if not hs:
            return
        h = hs[i % len(hs)]
        if how == "reload" and (h.tenant != "t2" or self.m.narrow or h.channel in NARROW):
            how = "close"
        if how == "move" and h.tenant != "t2":
            how = "close"
        data = self.payload("hold")
        c = self.client_of(h, ci)
        s = h.session
        wait: Callable[[], object]
        if h.hold or not exchange:
            if not h.hold:
                if s is not None:
                    s.send(data)
                else:
                    c.lease_send(h.lease_id, data)
            wait = (lambda: s.receive()) if s is not None else (lambda: c.lease_receive(h.lease_id))
        else:
            wait = (
                (lambda: s.exchange(data))
                if s is not None
                else (lambda: c.lease_exchange(h.lease_id, data))
            )
        if not h.hold:
            h.n += 1
        h.hold, h.owed = True, None
        waiting = in_background(wait)
        time.sleep(pause)
        want: tuple[type[errors.KupError], ...]
        ends = True  # the holding ends (a lease outlives its client and socket)
        if how == "close":
            if s is not None:
                s.close()  # cancels the stream under the waiting operation
                h.dead = CANCELLED
                want = (errors.InvalidArgument,)
                # close() does not wait for kupd then (kupclient.Channel.close)
                self.wait_ended({h.lease_id}, f"the end of {h}, closed under a receive")
            else:
                _, exc = attempt(lambda: self.client_of(h, ci + 1).release(h.lease_id))
                assert exc is None, f"release of {h} under a receive: {exc!r}"
                want = (errors.NotFound,)
        elif how == "client":
            idx = h.client if s is not None else self.clients.index(c)
            self.renew_client(idx)
            want = (errors.InvalidArgument,)
            ends = s is not None
        elif how == "drain":
            self.drain(False, True)
            want = (errors.Shutdown, errors.NotFound)
        elif how == "revoke":
            self.admin.revoke(h.lease_id, "fuzz revoke")
            h.dead = "revoked"
            want = (errors.PermissionDenied,)
        elif how == "reload":
            self.reload(True, self.m.moved, self.m.limits, True)
            want = (errors.PermissionDenied,)
        else:  # move t2's socket
            self.reload(self.m.narrow, not self.m.moved, self.m.limits, True, renew=False)
            want = (errors.Unavailable,)
            ends = s is not None
        out = waiting.outcome(timeout=60)
        if how == "move":
            self.renew_t2()
        assert isinstance(out, errors.KupError), f"wait under {how} of {h}: {out!r}"
        check_error(out)
        assert isinstance(out, want), f"wait under {how} of {h}: {out!r}"
        if how == "revoke":
            assert "fuzz revoke" in out.message, out.message
        if ends:
            self.gone(h)

    def renew_client(self, idx: int) -> None:
        """Close client ``idx`` and put a new one of its tenant in its place:
        its Sessions end with it, its tenant's leases live on."""
        old = self.clients[idx]
        tenant = CLIENT_TENANTS[idx]
        path = self.k.sock(t2_socket(self.m.moved) if tenant == "t2" else tenant)
        self.clients[idx], self.devs[idx] = self.connect(path)
        old.close()
        closed = set()
        for h in self.m.alive():
            if h.kind == "session" and h.client == idx:
                h.dead = CANCELLED
                closed.add(h.lease_id)
        # kupd sees the streams cancelled on its own time: their channels
        # are the model's free ones once it has let go of them
        self.wait_ended(closed, "the closed client's Sessions ended")

    def wait_ended(self, ids: set[str], what: str) -> None:
        """Wait until kupd holds none of the leases ``ids`` (bounded)."""
        wait_until(lambda: not ids & {x.lease_id for x in self.admin.list_leases()}, what=what)

    @step(
        chan=st.one_of(st.none(), st.integers(0, CHANNELS - 1)),
        sessions=st.tuples(st.booleans(), st.booleans()),
        same=st.booleans(),
    )
    def attach_race(self, chan: int | None, sessions: tuple[bool, bool], same: bool) -> None:
        """Two clients -- of both tenants, or two of t1 -- attach the same
        channel (or any) at once: one wins at most (any: both, if they can)."""
        if len(self.m.alive()) >= 7:
            return
        who = (0, 1) if same else (0, 2)
        wants = [self.expect_attach(CLIENT_TENANTS[ci], chan) for ci in who]
        start = threading.Barrier(2)

        def go(ci: int, session: bool) -> Callable[[], Holding | errors.KupError]:
            def run() -> Holding | errors.KupError:
                start.wait(10)
                return self.take(ci, chan, session)

            return run

        runs = [in_background(go(ci, s)) for ci, s in zip(who, sessions, strict=True)]
        got = [r.outcome(timeout=60) for r in runs]
        for g in got:
            assert isinstance(g, (Holding, errors.KupError)), repr(g)
        won = [g for g in got if isinstance(g, Holding)]
        free = min(
            sum(
                1
                for c in range(CHANNELS)
                if c not in self.m.held() and c not in self.m.pool and self.m.allowed(t, c)
            )
            for t in (CLIENT_TENANTS[ci] for ci in who)
        )
        if chan is None and len(won) == 2:
            assert won[0].channel != won[1].channel, f"both attaches got the same channel: {won}"
            for ci, g, want in zip(who, got, wants, strict=True):
                self.settle_attach(ci, chan, g, want)
            # the second must have been allowed too
            assert not self.m.at_limit(CLIENT_TENANTS[who[1]], -1), won
            return
        assert len(won) <= 1 or chan is None, f"both attaches of channel {chan} won: {won}"
        if wants == [None, None]:
            assert won, f"neither attach of free channel {chan} won: {got}"
            loser = next(g for g in got if not isinstance(g, Holding))
            # Busy for the channel taken; at a tenant's max_sessions, that
            # limit (the other attach counted as it was under way)
            limited = same and self.m.at_limit(CLIENT_TENANTS[who[0]], 1)
            if chan is None:
                assert limited or free < 2, f"any attach lost to the other: {loser!r}"
            if limited or chan is None:
                assert isinstance(loser, (errors.Busy, errors.ResourceExhausted)), repr(loser)
                assert not isinstance(loser, errors.Releasing), repr(loser)
            else:
                assert type(loser) is errors.Busy, f"the loser for channel {chan}: {loser!r}"
        for ci, g, want in zip(who, got, wants, strict=True):
            if wants == [None, None] and not isinstance(g, Holding):
                continue
            if (
                want is errors.Busy
                and same
                and self.m.at_limit(CLIENT_TENANTS[ci], 1)
                and isinstance(g, errors.ResourceExhausted)
            ):
                # kupd checks max_sessions before it looks at the channel,
                # counting the other attach while it is under way: with
                # that one, the tenant is at its limit (docs/gateway.md)
                continue
            self.settle_attach(ci, chan, g, want)

    @step(i=picks, kind=st.sampled_from(["plain", "delay"]))
    def receive_race(self, i: int, kind: str) -> None:
        """Two clients of the lease's tenant receive its reply at once: one gets it."""
        hs = [h for h in self.m.alive() if h.kind == "lease" and h.tenant == "t1"]
        if not hs:
            return
        h = hs[i % len(hs)]
        if h.owed is None and not h.hold:
            data = self.payload(kind)
            _, exc = attempt(lambda: self.clients[0].lease_send(h.lease_id, data))
            assert self.settle_send(h, data, exc)
        start = threading.Barrier(2)

        def go(c: Client) -> Callable[[], Any]:
            def run() -> Any:
                start.wait(10)
                return attempt(lambda: c.lease_receive(h.lease_id, 1.0))

            return run

        runs = [in_background(go(c)) for c in self.clients[:2]]
        results = [r.outcome(timeout=60) for r in runs]
        got = [g for g, _ in results if g is not None]
        assert len(got) <= 1, f"both receives on {h} got a message: {got}"
        for g, _ in results:
            if g is not None:
                self.settle_receive(h, g, None)
        for g, exc in results:
            if g is None:
                assert isinstance(exc, (*LATE, errors.NotYourTurn)), f"{h}: {exc!r}"

    @step(i=picks, ci=picks)
    def kicked(self, i: int, ci: int) -> None:
        """The module ends a session or lease itself (echo's "!kick"): kupd
        lets go of the channel, and the holder is told so."""
        hs = [h for h in self.m.alive() if h.owed is None and not h.hold]
        if not hs:
            return
        h = hs[i % len(hs)]
        s = h.session
        if s is not None:
            _, exc = attempt(lambda: s.send(b"!kick"))
        else:
            c = self.client_of(h, ci)
            _, exc = attempt(lambda: c.lease_send(h.lease_id, b"!kick"))
        assert exc is None, f"!kick on {h}: {exc!r}"
        h.n += 1
        h.hold = True
        # an idle holder's page is read once a round (docs/gateway.md, Errors)
        self.wait_ended({h.lease_id}, f"the end of {h}, which the module disconnected")
        h.dead = "ended by the module"

    @step(i=picks, ops=st.tuples(lease_ops, lease_ops))
    def lease_race(self, i: int, ops: tuple[tuple[Any, ...], tuple[Any, ...]]) -> None:
        """Two operations at once on one lease, from two clients of its
        tenant: the outcomes are those of one order or the other."""
        hs = [h for h in self.m.alive() if h.kind == "lease"]
        if not hs:
            return
        h = hs[i % len(hs)]
        mine = [c for c, t in zip(self.clients, CLIENT_TENANTS, strict=True) if t == h.tenant]
        start = threading.Barrier(2)
        datas = [self.payload(op[1]) if op[0] in ("send", "exch") else b"" for op in ops]

        def go(j: int) -> Callable[[], Any]:
            c = mine[j % len(mine)]
            op, data = ops[j], datas[j]

            def run() -> Any:
                start.wait(10)
                if op[0] == "send":
                    return attempt(lambda: c.lease_send(h.lease_id, data))
                if op[0] == "pass":
                    return attempt(lambda: c.lease_pass(h.lease_id))
                if op[0] == "recv":
                    return attempt(lambda: c.lease_receive(h.lease_id, op[2]))
                return attempt(lambda: c.lease_exchange(h.lease_id, data, op[2]))

            return run

        runs = [in_background(go(j)) for j in (0, 1)]
        res = [r.outcome(timeout=60) for r in runs]
        steps = [(ops[j][0], datas[j], ops[j][-1]) for j in (0, 1)]
        state = (h.owed, h.hold, h.n)
        ends = set()
        for a, b in ((0, 1), (1, 0)):
            for s1 in lease_step(h.channel, state, steps[a], res[a]):
                ends.update(lease_step(h.channel, s1, steps[b], res[b]))
        assert ends, f"{h} from {state}: {steps} gave {res}: no order explains it"
        if len(ends) == 1:
            h.owed, h.hold, h.n = ends.pop()
        else:  # the outcomes do not tell the order: the model lets go of it
            self.clients[h.client].release(h.lease_id)
            self.gone(h)

    @step(
        i=picks, op=st.sampled_from(["send", "receive", "pass", "release"]), foreign=st.booleans()
    )
    def session_id_as_lease(self, i: int, op: str, foreign: bool) -> None:
        """A Session's lease id in the lease RPCs: Busy to its tenant (it
        belongs to a stream), the answer of an unknown id to the other."""
        hs = [h for h in self.m.alive() if h.kind == "session"]
        if not hs:
            return
        h = hs[i % len(hs)]
        c = self.foreign(h) if foreign else self.clients[h.client]
        fns: dict[str, Callable[[], object]] = {
            "send": lambda: c.lease_send(h.lease_id, b"x"),
            "receive": lambda: c.lease_receive(h.lease_id, 0),
            "pass": lambda: c.lease_pass(h.lease_id),
            "release": lambda: c.release(h.lease_id),
        }
        _, exc = attempt(fns[op])
        want = errors.NotFound if foreign else errors.Busy
        assert type(exc) is want, f"{op} with the id of {h} (foreign {foreign}): {exc!r}"

    @step(ci=st.integers(0, len(CLIENT_TENANTS) - 1))
    def list_devices(self, ci: int) -> None:
        """ListDevices, as a tenant sees it, says what the model holds."""
        tenant = CLIENT_TENANTS[ci]
        (dev,) = self.clients[ci].devices("echo")
        seen = {ch.id: (ch.state, ch.lease_id) for ch in dev.channels}
        visible = [c for c in range(CHANNELS) if self.m.allowed(tenant, c)]
        assert sorted(seen) == visible, (tenant, sorted(seen))
        assert dev.drained == self.m.drained, dev
        held = {h.channel: h for h in self.m.alive()}
        for c in visible:
            state, lid = seen[c]
            h = held.get(c)
            if h is not None:
                want = (h.kind, h.lease_id if h.tenant == tenant else "")
                assert (state, lid) == want, (tenant, c, state, lid, h)
            elif c in self.m.pool:
                assert state in ("calls", "quarantined"), (tenant, c, state)
            else:
                # its last user gone, its module may not have let go yet
                assert state in ("free", "module"), (tenant, c, state, lid)

    @step(
        ci=st.integers(0, len(CLIENT_TENANTS) - 1), kind=st.sampled_from(["plain", "late", "mid"])
    )
    def call(self, ci: int, kind: str) -> None:
        data = self.payload({"late": "delay"}.get(kind, kind))
        timeout = 0.05 if kind == "late" else 20.0
        got, exc = attempt(lambda: self.clients[ci].call("echo", data, timeout))
        what = f"call of {data!r} by {CLIENT_TENANTS[ci]}"
        if self.m.drained:
            assert exc is not None, f"{what} on a drained device: {got}"
        elif len(data) > self.m.max_bytes(CLIENT_TENANTS[ci]):
            assert isinstance(exc, errors.TooBig), f"{what}: {got} {exc!r}"
        elif kind == "late":
            assert isinstance(exc, errors.DeadlineExceeded), f"{what}: {got} {exc!r}"
        else:
            assert got is not None, f"{what}: {exc!r}"
            assert got.channel in self.m.pool, (what, got)
            assert got.data == echoed(got.channel, data), (what, got)

    @step(narrow=st.booleans(), moved=st.booleans(), limits=st.booleans(), now=rare)
    def reload(
        self, narrow: bool, moved: bool, limits: bool, now: bool, renew: bool = True
    ) -> None:
        """``renew``: replace the clients of a moved socket at once."""
        if not now:
            return
        self.k.write_config(DEVICES + tenants(narrow, moved, limits))
        r = self.admin.reload()
        move = moved != self.m.moved
        self.m.narrow, self.m.moved, self.m.limits = narrow, moved, limits
        if limits or move:
            self.m.t2_bytes = T2_MAX_BYTES if limits else 0
        KupdMachine.t2_limited |= limits
        doomed = {h.lease_id for h in self.m.alive() if not self.m.allowed(h.tenant, h.channel)}
        for h in self.m.alive():
            if h.lease_id in doomed:
                h.dead = "policy reload"
        # Sessions on the moved socket end with it; leases live on
        moved_away = {
            h.lease_id for h in self.m.alive() if move and h.tenant == "t2" and h.kind == "session"
        }
        assert set(r.sessions_ended) == doomed | moved_away, (r, doomed, moved_away)
        for h in self.m.alive():
            if h.lease_id in moved_away:
                h.dead = "socket moved by reload"
        if move and renew:
            self.renew_t2()

    def renew_t2(self) -> None:
        for idx, t in enumerate(CLIENT_TENANTS):
            if t == "t2":
                self.renew_client(idx)

    @step(undo=st.booleans(), now=rare)
    def drain(self, undo: bool, now: bool) -> None:
        if not now and not (undo and self.m.drained):
            return
        ended = self.admin.drain("echo", undo)
        if undo:
            assert ended == [], ended
            self.m.drained = False
            return
        want = set() if self.m.drained else {h.lease_id for h in self.m.alive()}
        assert set(ended) == want, (ended, want)
        for h in self.m.alive():
            h.dead = "drained"
        self.m.drained = True

    @step(
        acts=st.lists(
            st.one_of(
                st.tuples(
                    st.just("attach"),
                    st.integers(0, len(CLIENT_TENANTS) - 1),
                    st.one_of(st.none(), st.integers(0, CHANNELS - 1)),
                    st.booleans(),
                ),
                st.tuples(st.just("release"), picks),
                st.tuples(st.just("exchange"), picks, st.sampled_from(["plain", "delay"])),
                st.tuples(st.just("drain"), st.booleans()),
                st.tuples(st.just("reload"), st.booleans(), st.booleans()),
                st.tuples(st.just("revoke"), picks),
                st.tuples(st.just("client"), st.integers(0, len(CLIENT_TENANTS) - 1)),
                st.tuples(st.just("call"), st.integers(0, len(CLIENT_TENANTS) - 1)),
            ),
            min_size=2,
            max_size=4,
        ),
        now=st.booleans(),
    )
    def chaos(self, acts: list[tuple[Any, ...]], now: bool) -> None:
        """A few actions at once -- attaches, releases, exchanges, a drain,
        a reload, a revocation, a client closed -- whose interleaving the
        model does not predict.  Each answer is still one of the taxonomy;
        then everything is released and nothing may be left held: no lease,
        no channel, no gauge above zero (check_all_free)."""
        if not now:
            return
        # one reload at most: the config file is written once
        reloads = [i for i, a in enumerate(acts) if a[0] == "reload"]
        acts = [a for i, a in enumerate(acts) if a[0] != "reload" or i == reloads[0]]
        # an Attach whose client is closed as kupd's reply arrives leaves a
        # lease no one knows until it idles out: a documented window
        # (docs/gateway.md, "Python client"), not raced here
        closed = {a[1] for a in acts if a[0] == "client"}
        acts = [a for a in acts if not (a[0] == "attach" and a[1] in closed)]
        if len(acts) < 2:
            return
        holdings = list(self.m.holdings)
        taken: list[Holding] = []
        start = threading.Barrier(len(acts))

        def act(a: tuple[Any, ...]) -> Callable[[], None]:
            def run() -> None:
                start.wait(10)
                self._chaos_act(a, holdings, taken)

            return run

        runs = [in_background(act(a)) for a in acts]
        for r in runs:
            out = r.outcome(timeout=90)
            assert out is None, f"chaos {acts}: {out!r}"
        # back to the first configuration, with fresh clients (the chaos may
        # have closed one, or moved t2's socket)
        self.reset_config()
        self.m.drained = self.m.narrow = self.m.moved = self.m.limits = False
        self.m.t2_bytes = 0
        old = list(self.clients)
        self.clients, self.devs = self.connect_all()
        # let go of everything, whatever happened to it
        self.m.holdings.extend(h for h in taken if h not in self.m.holdings)
        for h in list(self.m.holdings):
            if h.session is not None:
                h.session.close()
            else:
                attempt(functools.partial(self.clients[h.client].release, h.lease_id))
            h.dead = ANY_REASON
            self.gone(h)
        for c in old:
            c.close()
        self.check_all_free()

    def _chaos_act(self, a: tuple[Any, ...], holdings: list[Holding], taken: list[Holding]) -> None:
        """One action of :meth:`chaos`; its answer is only checked to be of
        the taxonomy (attempt)."""
        name = a[0]
        if name == "attach":
            got = self.take(a[1], a[2], a[3])
            if isinstance(got, Holding):
                taken.append(got)
        elif name in ("release", "exchange", "revoke") and holdings:
            h = holdings[a[1] % len(holdings)]
            c = self.clients[h.client]
            s = h.session
            if name == "revoke":
                attempt(lambda: self.admin.revoke(h.lease_id, "chaos"))
            elif name == "release":
                attempt(s.close if s is not None else lambda: c.release(h.lease_id))
            else:
                data = self.payload(a[2])
                if s is not None:
                    attempt(lambda: s.exchange(data, 2.0))
                else:
                    attempt(lambda: c.lease_exchange(h.lease_id, data, 2.0))
        elif name == "drain":
            attempt(lambda: self.admin.drain("echo", undo=a[1]))
        elif name == "reload":
            self.k.write_config(DEVICES + tenants(a[1], a[2]))
            attempt(self.admin.reload)
        elif name == "client":
            c = self.clients[a[1]]
            attempt(c.close)
        elif name == "call":
            attempt(lambda: self.clients[a[1]].call("echo", b"chaos", 20.0))

    # -- the end of an example ------------------------------------------------------
    def teardown(self) -> None:
        self.trace.append(f"{time.monotonic() - self.t0:8.3f}s teardown()")
        try:
            self._teardown()
        except BaseException as exc:
            self.report("teardown", exc)
            raise

    def _teardown(self) -> None:
        try:
            for h in list(self.m.holdings):
                if h.kind == "session":
                    assert h.session is not None
                    h.session.close()
                elif not h.dead:
                    self.clients[h.client].release(h.lease_id)
                self.gone(h)
            self.admin.drain("echo", undo=True)
            if self.m.narrow or self.m.moved or self.m.limits:
                self.k.write_config(DEVICES + tenants(False))
                self.admin.reload()
            self.check_all_free()
        finally:
            self.watcher.watch.cancel()
            for c in (*self.clients, self.watch_client):
                c.close()
            self.admin.close()
        assert self.watcher.error is None, repr(self.watcher.error)

    def check_all_free(self) -> None:
        assert self.k.proc.poll() is None, self.k.log()
        wait_until(lambda: self.admin.list_leases() == [], what="no lease listed")
        with Client(self.k.admin_socket) as c:

            def channels_free() -> bool:
                (dev,) = c.devices("echo")
                states = {ch.id: ch.state for ch in dev.channels}
                return (
                    all(s == ("calls" if i in self.m.pool else "free") for i, s in states.items())
                    and dev.calls_in_flight == 0
                    and dev.calls_queued == 0
                )

            wait_until(channels_free, what="every channel free (ListDevices)")
        wait_until(self.gauges_zero, what="kupd's gauges of held things at zero")
        lost = set()

        def every_release_seen() -> bool:
            nonlocal lost
            lost = self.watcher.taken - set(self.watcher.released)
            return not lost and self.watcher.error is None

        wait_until(every_release_seen, what="a LEASE_RELEASED for every LEASE_TAKEN")
        # t1's Watch tells t1 why each of its leases ended
        for lid, reason in self.reasons.items():
            got = self.watcher.released.get(lid)
            if reason != ANY_REASON:
                assert got in reason.split("|"), f"{lid} ended with reason {got!r}, not {reason!r}"

    def gauges_zero(self) -> bool:
        text = self.admin.metrics()
        for line in text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in HELD_GAUGES and float(line.rsplit(" ", 1)[1]) != 0:
                return False
        return True


# -- fixtures --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ssim() -> Iterator[KupSim]:
    env = dict(os.environ, KUP_PARAM_ECHO_CHANNELS=str(CHANNELS))
    with kupsim("echo", env=env, check_exit=False, ready_timeout=60.0) as s:
        yield s


@pytest.fixture(scope="module")
def sk(ssim: KupSim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TenantKupd]:
    log = tmp_path_factory.mktemp("fuzz-stateful") / "kupd.log"
    k = TenantKupd(socket_dir(), ssim, DEVICES + tenants(False), log)
    yield k
    k.stop()
    shutil.rmtree(k.dir, ignore_errors=True)


def pool_channels(k: TenantKupd) -> frozenset[int]:
    with Client(k.admin_socket) as c:
        wait_until(
            lambda: sum(ch.state == "calls" for ch in c.devices("echo")[0].channels) == POOL,
            what="the Call pool",
        )
        return frozenset(ch.id for ch in c.devices("echo")[0].channels if ch.state == "calls")


@pytest.mark.timeout(TIMEOUT)
def test_stateful_probe(sk: TenantKupd) -> None:
    pool = pool_channels(sk)
    reports = FirstReports(Path(REPORT) if REPORT else sk.log_path.parent / "first-reports.txt", sk)
    print(f"first reports of failing examples: {reports.path}")
    try:
        run_state_machine_as_test(
            lambda: KupdMachine(sk, pool, reports),
            settings=settings(
                max_examples=EXAMPLES,
                stateful_step_count=STEPS,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
                # KUPD_FUZZ_SHRINK=0: report a failure as found (a long run's
                # shrinking replays examples whose timing differs, for minutes)
                phases=PHASES,
            ),
        )
    except BaseException as exc:
        exc.add_note(f"{reports.failures} failing examples' first reports: {reports.path}")
        raise
    for (op, outcome), n in sorted(SEEN.items()):
        print(f"seen: {op} {outcome} {n}")
    assert sk.proc.poll() is None, sk.log()
    # the pool was never replaced: the model's pool channels stayed right
    assert pool_channels(sk) == pool
