"""channel_ops_per_second: a tenant's send / exchange / receive / pass
operations on its Sessions and leases wait for their turn beyond the rate
(kupd.policy.Guard.pace), so that one tenant's busy Sessions cannot take the
event loop from every other tenant; a wait beyond the RPC's deadline (or
kupd's PACE_LIMIT) is refused instead, in-band on a Session."""

from __future__ import annotations

import itertools
import re
import threading
import time
import urllib.request
from typing import Any

import pytest
from tenancy_helpers import DEVICES, OWNER, StartTenants, TenantKupd

from kupd import errors
from kupd.policy import PACE_LIMIT, shown_ms
from kupd.testing import in_background, wait_until, with_metrics_port

#: dave: 20 operations a second (a burst of 20); erin: one each 10 s, so
#: that her second operation would wait beyond any deadline a test uses;
#: frank: no rate.  Each on channels of his own.
PACED = f"""
[[tenant]]
name = "dave"
socket = "@DIR@/dave.sock"
owner = {OWNER}
channel_ops_per_second = 20
[[tenant.grant]]
device = "echo"
channels = "4-7"

[[tenant]]
name = "erin"
socket = "@DIR@/erin.sock"
owner = {OWNER}
channel_ops_per_second = 0.1
[[tenant.grant]]
device = "echo"
channels = "8-11"

[[tenant]]
name = "frank"
socket = "@DIR@/frank.sock"
owner = {OWNER}
[[tenant.grant]]
device = "echo"
channels = "12-15"
"""


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        body: bytes = r.read()
    return body.decode()


def _sample(body: str, name: str) -> float | None:
    for line in body.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def _session_ops(k: TenantKupd, tenant: str, n: int) -> float:
    """``n`` operations on a Session of ``tenant`` (a receive, then
    exchanges); the seconds they took."""
    with k.client(tenant) as c, c.open("echo").channel() as ch:
        t0 = time.monotonic()
        ch.receive(timeout=30)
        for i in range(n - 1):
            assert ch.exchange(b"m%d" % i, timeout=30).data.lower() == b"m%d" % i
        return time.monotonic() - t0


def test_a_tenants_session_operations_are_paced_and_counted(start_tenants: StartTenants) -> None:
    ports: list[int] = []

    def start(port: int) -> TenantKupd:
        ports.append(port)
        return start_tenants(f"metrics_port = {port}\n" + DEVICES + PACED)

    k = with_metrics_port(start)
    port = ports[-1]
    # 50 operations at 20 a second after a burst of 20: the 50th is due 1.5 s
    # after the first, however fast kupd and the module are (a lower bound,
    # which a slow machine can only exceed)
    took = _session_ops(k, "dave", 50)
    assert took >= 1.4, took
    body = _scrape(port)
    paced = _sample(body, 'kupd_tenant_paced_total{tenant="dave"}')
    waited = _sample(body, 'kupd_tenant_paced_seconds_total{tenant="dave"}')
    assert paced is not None and paced >= 1, body
    assert waited is not None and waited > 0.5, body
    # another tenant, without a rate, is not paced: no series of his
    _session_ops(k, "frank", 50)
    assert 'tenant="frank"' not in "".join(
        line for line in _scrape(port).splitlines() if "kupd_tenant_paced" in line
    )


def test_a_wait_beyond_the_deadline_is_refused_and_audited(start_tenants: StartTenants) -> None:
    k = start_tenants(DEVICES + PACED)
    with k.client("erin") as e:
        lease = e.attach("echo")
        e.lease_receive(lease.lease_id, timeout=30)  # her one operation of the next 10 s
        t0 = time.monotonic()
        with pytest.raises(errors.ResourceExhausted) as info:
            e.lease_exchange(lease.lease_id, b"late", timeout=0.5)
        # refused at once, not after waiting out its deadline
        assert time.monotonic() - t0 < 5.0
        msg = str(info.value)
        assert "tenant erin: rule channel_ops_per_second" in msg, msg
        assert "channel_ops_per_second=0.1" in msg, msg
        assert "more than its deadline or timeout allows (0.5 s)" in msg, msg
        # without a deadline of its own a unary Send has the client's 30 s;
        # kupd waits at most PACE_LIMIT
        kupds = f"more than kupd's limit of {PACE_LIMIT:g} s"
        with pytest.raises(errors.ResourceExhausted, match=kupds):
            e.lease_send(lease.lease_id, b"later")
        e.release(lease.lease_id)
    audited = [a for a in k.audit_lines() if a.get("rule") == "channel_ops_per_second"]
    assert len(audited) == 2 and all(a["tenant"] == "erin" for a in audited), audited


def test_a_refusal_on_a_session_is_in_band_and_a_reload_lifts_the_rate(
    start_tenants: StartTenants,
) -> None:
    k = start_tenants(DEVICES + PACED)
    with k.client("erin") as e, e.open("echo").channel() as ch:
        ch.receive(timeout=30)
        with pytest.raises(errors.ResourceExhausted, match="rule channel_ops_per_second"):
            ch.exchange(b"too soon", timeout=30)
        # the Session goes on: with the rate lifted by a reload, the same
        # stream exchanges at once (its tenant is looked up again)
        k.write_config(DEVICES + PACED.replace("channel_ops_per_second = 0.1\n", ""))
        with k.admin() as adm:
            adm.reload()
        wait_until(lambda: "config reloaded" in k.log(), what="the reload")
        for i in range(5):
            assert ch.exchange(b"n%d" % i, timeout=30).data.lower() == b"n%d" % i


def test_a_refusal_says_when_to_retry_on_a_session_and_a_lease(
    start_tenants: StartTenants,
) -> None:
    """erin may run one operation each 10 s: an operation refused for
    channel_ops_per_second carries when the same one would have its turn
    within what it may wait -- in-band on a Session (Error.retry_after_ms),
    as trailing metadata on a unary lease RPC (kup-retry-after-ms) -- both
    ending in the error's retry_after_ms, which the message says too."""
    k = start_tenants(DEVICES + PACED)

    def told(exc: errors.KupError, most: int) -> int:
        ms = exc.retry_after_ms
        assert ms is not None and 0 < ms <= most, (ms, str(exc))
        assert f"retry in {shown_ms(ms)} at the earliest" in str(exc), str(exc)
        return ms

    with k.client("erin") as e:
        with e.open("echo").channel() as ch:
            ch.receive(timeout=30)  # her one operation of the next 10 s
            # non-blocking: its whole wait; blocking: that less PACE_LIMIT
            with pytest.raises(errors.ResourceExhausted) as info:
                ch.receive(timeout=0)
            told(info.value, 10_000)
            with pytest.raises(errors.ResourceExhausted) as info:
                ch.exchange(b"too soon", timeout=30)
            told(info.value, 10_000 - int(PACE_LIMIT * 1000))
        lease = e.attach("echo")
        with pytest.raises(errors.ResourceExhausted) as info:
            e.lease_exchange(lease.lease_id, b"late", timeout=0.5)
        told(info.value, 9_500)
        with pytest.raises(errors.ResourceExhausted) as info:
            e.lease_receive(lease.lease_id, timeout=0)
        told(info.value, 10_000)
        e.release(lease.lease_id)


def test_a_pace_refusal_names_the_wait_less_what_it_may_wait() -> None:
    """Guard.pace's refusal: retry_after_ms is the wait for the turn less
    the time the operation may wait (its limit, at most PACE_LIMIT),
    rounded up as calls_per_second's, and the message says it."""
    guard, dave = _guard(0.1)  # a burst of one, then one each 10 s
    assert guard.pace(dave, "lease", "echo", 0) == 0.0
    for limit, most in ((0.0, 10_000), (2.5, 7_500), (None, 10_000 - int(PACE_LIMIT * 1000))):
        with pytest.raises(errors.ResourceExhausted) as info:
            guard.pace(dave, "lease", "echo", 0, limit=limit)
        wait = _told_wait(info.value)
        ms = info.value.retry_after_ms
        assert ms is not None and 0 < ms <= most, (limit, ms)
        # the told wait is rounded to 3 digits: within its rounding of ms
        cap = PACE_LIMIT if limit is None else limit
        assert abs(ms - (wait - cap) * 1000) <= 50 + 1, (limit, wait, ms)
        assert f"; retry in {shown_ms(ms)} at the earliest" in info.value.message


def test_the_client_reads_an_in_band_retry_after_ms() -> None:
    """kupclient's in-band mapping ends where the status mapping does: an
    Error's retry_after_ms is the exception's, as kup-retry-after-ms would
    be; one out of range (0, more than RETRY_AFTER_MAX_MS) is ignored, and
    none is None."""
    import grpc

    from kupapi import kup_pb2
    from kupclient._errors import error_from_pb, error_from_status

    def pb(**kw: Any) -> errors.KupError:
        return error_from_pb(
            kup_pb2.Error(
                grpc_code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
                message="limit",
                kind="ResourceExhausted",
                **kw,
            )
        )

    got = pb(retry_after_ms=340)
    st = error_from_status(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "limit",
        [("kup-error", "ResourceExhausted"), ("kup-retry-after-ms", "340")],
    )
    assert type(got) is type(st) is errors.ResourceExhausted
    assert (got.retry_after_ms, got.grpc_code) == (st.retry_after_ms, st.grpc_code) == (
        340,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    assert pb(retry_after_ms=errors.RETRY_AFTER_MAX_MS).retry_after_ms == errors.RETRY_AFTER_MAX_MS
    for bad in (0, errors.RETRY_AFTER_MAX_MS + 1):
        assert pb(retry_after_ms=bad).retry_after_ms is None, bad
    assert pb().retry_after_ms is None


def _guard(rate: float) -> tuple[Any, Any]:
    from kupd.config import parse_config
    from kupd.policy import Guard, Policy

    t = {"name": "dave", "socket": "/run/kupd/dave.sock", "channel_ops_per_second": rate}
    cfg = parse_config({"device": [{"name": "echo"}], "tenant": [t]})
    (tenant,) = cfg.tenants
    return Guard(Policy(cfg.tenants)), tenant


def test_pace_a_burst_then_one_each_interval_in_order() -> None:
    guard, dave = _guard(4.0)  # a burst of 4, then one each 0.25 s
    waits = [guard.pace(dave, "session", "echo", 0) for _ in range(7)]
    assert waits[:4] == [0.0] * 4
    # each later one waits a quarter second longer than the one before: the
    # waiters hold their slots in the order they asked
    steps = [b - a for a, b in itertools.pairwise(waits[3:])]
    assert all(0.2 < s <= 0.25 for s in steps), waits
    assert guard.paced == {"dave": 3}


def test_pace_refusal_takes_no_slot() -> None:
    guard, dave = _guard(1.0)  # a burst of one, then one a second
    assert guard.pace(dave, "lease", "echo", 0) == 0.0
    for _ in range(3):
        with pytest.raises(errors.ResourceExhausted, match="its deadline or timeout allows"):
            guard.pace(dave, "lease", "echo", 0, limit=0.1)
    # the refused ones did not push the next one back: its wait is still
    # under a second, as if they had never asked
    assert 0.0 < guard.pace(dave, "lease", "echo", 0, limit=2.0) <= 1.0
    assert guard.denials == {("dave", "channel_ops_per_second"): 3}


def test_a_rate_too_small_to_divide_by_is_refused() -> None:
    from kupd.config import ConfigError

    with pytest.raises(ConfigError, match=r"channel_ops_per_second.*at least 0\.001"):
        _guard(1e-310)


def test_pace_below_one_a_second_has_a_burst_of_one() -> None:
    guard, dave = _guard(0.5)
    assert guard.pace(dave, "lease", "echo", 0) == 0.0
    assert 1.9 < guard.pace(dave, "lease", "echo", 0) <= 2.0


#: grace: one operation each 2 s (a burst of one); each wait for a turn stays
#: under PACE_LIMIT, so it is waited, not refused
GRACE = f"""
[[device]]
name = "echo"
call_channels = 1

[[tenant]]
name = "grace"
socket = "@DIR@/grace.sock"
owner = {OWNER}
channel_ops_per_second = 0.5
[[tenant.grant]]
device = "echo"
"""


def test_a_wait_for_a_turn_ends_when_a_reload_moves_the_socket(
    start_tenants: StartTenants,
) -> None:
    """A reload that moves the socket ends every RPC waiting there at once,
    and counts it: one waiting for its turn too (it used to carry on, on
    the retired socket, once its turn came)."""
    k = start_tenants(GRACE)
    with k.client("grace") as g:
        lease = g.attach("echo", 8)
        g.lease_receive(lease.lease_id, timeout=10)  # the burst
        send = in_background(lambda: g.lease_send(lease.lease_id, b"after the move"))
        wait_until(
            lambda: _paced_count(k, "grace") >= 1, what="the Send waiting for its turn"
        )
        k.write_config(GRACE.replace("grace.sock", "grace2.sock"))
        with k.admin() as adm:
            r = adm.reload()
        assert r.rpcs_ended == {"Send": 1}, r.rpcs_ended
        out = send.outcome(30)
        assert isinstance(out, errors.Unavailable), out
        assert "grace2.sock" in str(out), out


def test_a_non_blocking_operation_over_the_rate_is_refused_not_made_to_wait(
    start_tenants: StartTenants,
) -> None:
    k = start_tenants(GRACE)
    with k.client("grace") as g:
        lease = g.attach("echo", 8)
        g.lease_receive(lease.lease_id, timeout=10)  # the burst
        with pytest.raises(errors.ResourceExhausted, match="a non-blocking one does not wait"):
            g.lease_receive(lease.lease_id, timeout=0)  # RECEIVE_MODE_NONBLOCK


def test_an_ended_lease_takes_no_turn_and_ends_a_wait_for_one(
    start_tenants: StartTenants,
) -> None:
    """The admin revokes a lease whose Send waits for its turn: the Send
    ends with the revocation, and the ended lease's later operations get
    its error without spending the tenant's rate."""
    # one operation each 4.8 s: the Send's turn is that far off, under PACE_LIMIT
    k = start_tenants(GRACE.replace("= 0.5", "= 0.21"))
    with k.client("grace") as g:
        lease = g.attach("echo", 8)
        g.lease_receive(lease.lease_id, timeout=10)  # the burst
        turn = time.monotonic() + 1 / 0.21
        send = in_background(lambda: g.lease_send(lease.lease_id, b"x"))
        wait_until(lambda: _paced_count(k, "grace") >= 1, what="the Send waiting")
        with k.admin() as adm:
            adm.revoke(lease.lease_id, "test")
        out = send.outcome(30)
        # ended by the revocation, before its turn came (it used to wait
        # for its turn, then fail on the ended lease)
        assert time.monotonic() < turn, "the Send waited for its turn"
        assert isinstance(out, errors.PermissionDenied), out
        for _ in range(3):  # no turn taken: each is answered, none waits or is refused
            with pytest.raises(errors.PermissionDenied):
                g.lease_send(lease.lease_id, b"y")
        assert _paced_count(k, "grace") == 1


def _paced_count(k: TenantKupd, tenant: str) -> int:
    """Operations of ``tenant`` paced so far, from kupd's audit-free
    counters as the admin's metrics show them."""
    with k.admin() as adm:
        body = adm.metrics("kupd_tenant_paced_total")
    n = _sample(body, f'kupd_tenant_paced_total{{tenant="{tenant}"}}')
    return int(n or 0)


def test_an_unused_turn_goes_to_the_next_arrival_and_waiters_keep_theirs() -> None:
    guard, dave = _guard(4.0)  # a burst of 4, then one each 0.25 s
    for _ in range(4):
        assert guard.pace(dave, "session", "echo", 0) == 0.0
    first, second = (guard.pace(dave, "session", "echo", 0) for _ in range(2))
    # the first waiter gives its turn back (not the last one: the second
    # still waits, its slot its own)
    guard.turn_over(dave, 0.01, used=False)
    third = guard.pace(dave, "session", "echo", 0)
    # the next to ask takes the slot the second would have had without the
    # first: not before the second (no waiter is overtaken), not a quarter
    # second after it (the turn is not lost)
    assert second - 0.05 < third <= second, (first, second, third)
    # then the rate goes on from there
    assert 0.2 < guard.pace(dave, "session", "echo", 0) - third <= 0.25
    # the seconds counted are those waited: the unused wait's 0.01, and
    # nothing yet for the waits not over
    assert guard.paced_seconds == {"dave": 0.01}
    assert guard.paced == {"dave": 4}


def _told_wait(exc: BaseException) -> float:
    """The wait for its turn a refusal under channel_ops_per_second names."""
    m = re.search(r"would wait ([0-9.e+-]+) s for its turn", str(exc))
    assert m, exc
    return float(m.group(1))


def _probe(g: Any, lease_id: str) -> float | None:
    """The wait grace's next operation would have (a non-blocking Receive,
    refused when it would wait, taking no turn); None: none, it ran."""
    try:
        g.lease_receive(lease_id, timeout=0)
    except errors.ResourceExhausted as exc:
        return _told_wait(exc)
    except errors.KupError:  # ran: no message there
        return None
    return None


def _paced_seconds(k: TenantKupd, tenant: str) -> float:
    with k.admin() as adm:
        body = adm.metrics("kupd_tenant_paced_seconds_total")
    return _sample(body, f'kupd_tenant_paced_seconds_total{{tenant="{tenant}"}}') or 0.0


@pytest.mark.parametrize("how", ["unary Send cancelled", "Session stream cancelled"])
def test_a_cancelled_wait_gives_its_turn_to_the_next_operation(
    start_tenants: StartTenants, how: str
) -> None:
    """An operation cancelled while it waits for its turn gives the turn
    back: the tenant's next operation is told a wait one interval shorter
    than before the cancel (it used to wait for the turn nobody used)."""
    import grpc

    from kupapi import kup_pb2, kup_pb2_grpc

    rate = 0.21  # one operation each 4.76 s: the cancelled one's wait is under PACE_LIMIT
    k = start_tenants(GRACE.replace("= 0.5", f"= {rate}"))
    with (
        k.client("grace") as g,
        grpc.insecure_channel(f"unix:{k.sock('grace')}") as raw,
    ):
        lease = g.attach("echo", 8)
        g.lease_receive(lease.lease_id, timeout=10)  # the burst
        stub = kup_pb2_grpc.KupStub(raw)
        hold = threading.Event()
        call: Any
        if how == "unary Send cancelled":
            req = kup_pb2.SendRequest(lease_id=lease.lease_id, data=b"never")
            call = stub.Send.future(req, timeout=60)
        else:

            def requests() -> Any:
                yield kup_pb2.SessionRequest(
                    request_id=1, attach=kup_pb2.SessionAttach(device="echo", channel=9)
                )
                yield kup_pb2.SessionRequest(
                    request_id=2, send=kup_pb2.SessionSend(data=b"never")
                )
                hold.wait(60)

            call = stub.Session(requests(), timeout=60)
            assert next(call).HasField("attached")
        wait_until(lambda: _paced_count(k, "grace") >= 1, what="the operation waiting")
        before = _probe(g, lease.lease_id)  # the turn after the waiting one's
        assert before is not None
        assert _paced_seconds(k, "grace") == 0.0  # no wait over yet
        call.cancel()
        hold.set()
        wait_until(lambda: _paced_seconds(k, "grace") > 0.0, what="the wait to end")
        after = _probe(g, lease.lease_id)
        # the cancelled one's turn: one interval sooner than before (less
        # the time between the two probes); or, if that has come, none
        assert after is None or after <= before - 1 / rate + 0.02, (before, after)
        assert _paced_seconds(k, "grace") < 1 / rate  # counted: what it waited
        g.release(lease.lease_id)
