"""The Call path after its cost cuts (bench issue 7): a Call that succeeds
binds no log context, so a failed one must still log and count with the same
context as before; kupclient's async Call keeps its error mapping and its
Message type; a reply the pool takes right after the send (try_exchange)
and one it waits for are the same reply."""

from __future__ import annotations

import asyncio
import json
import os
import urllib.request
from typing import Any

import pytest
from gateway_helpers import Kupd, StartKupd, call_in_flight, echo_sim

from kupclient import AsyncClient, Kind, Message
from kupd import errors
from kupd.testing import KupSim, wait_until, with_metrics_port


def _failed(log: str) -> list[dict[str, Any]]:
    """kupd's "rpc failed" records (kupd logs one JSON object per line)."""
    out = []
    for line in log.splitlines():
        if line.startswith("{") and '"rpc failed"' in line:
            rec: dict[str, Any] = json.loads(line)
            if rec.get("event") == "rpc failed":
                out.append(rec)
    return out


def test_failed_calls_log_and_count_with_their_context(sim: KupSim, start_kupd: StartKupd) -> None:
    k = with_metrics_port(lambda port: start_kupd(sim, "--metrics-port", str(port)))
    with k.client(caller="ctx-test") as c:
        big = c.devices("echo")[0].max_message_bytes + 1
        for i in range(2):
            assert c.call("echo", bytes([i, 1]), timeout=10).data == bytes([i, 1])
        with pytest.raises(errors.TooBig):
            c.call("echo", b"\x00" * big, timeout=10)  # refused inside the pool
        with pytest.raises(errors.NotFound):
            c.call("nosuch", b"x", timeout=10)  # refused before any device is known
        assert len(c.call("echo", b"\x01\x02", timeout=10).data) == 2  # still serving
        with pytest.raises(errors.Busy):
            c.attach("echo", 0)  # a Call pool channel
        with pytest.raises(errors.NotFound):
            c.attach("echo", 999)  # no such channel: not a label of its own
        with pytest.raises(errors.NotFound):
            c.attach("nosuch", 3)
        body = urllib.request.urlopen(k.metrics_url, timeout=10).read()
    text = body.decode()
    assert 'kupd_calls_total{code="OK",device="echo"} 3.0' in text
    assert 'kupd_calls_total{code="INVALID_ARGUMENT",device="echo"} 1.0' in text
    # the error counter takes the device from the bound log context
    assert 'kupd_errors_total{channel="",code="INVALID_ARGUMENT",device="echo"} 1.0' in text
    # refused attaches too, with the channel when the device has it
    assert 'kupd_errors_total{channel="0",code="FAILED_PRECONDITION",device="echo"} 1.0' in text
    assert 'kupd_errors_total{channel="",code="NOT_FOUND",device="echo"} 1.0' in text
    assert 'kupd_errors_total{channel="",code="NOT_FOUND",device=""} 2.0' in text
    assert k.terminate() == 0
    recs = _failed(k.log())
    calls = [r for r in recs if r["rpc"] == "Call"]
    too_big = [r for r in calls if r["code"] == "INVALID_ARGUMENT"]
    not_found = [r for r in calls if r["code"] == "NOT_FOUND"]
    assert len(too_big) == 1 and len(not_found) == 1, recs
    attaches = [
        (r["code"], r.get("device"), r.get("channel")) for r in recs if r["rpc"] == "Attach"
    ]
    assert attaches == [
        ("FAILED_PRECONDITION", "echo", 0),
        ("NOT_FOUND", "echo", None),
        ("NOT_FOUND", None, None),
    ], attaches
    r = too_big[0]
    assert (r["rpc"], r["device"], r["caller"], r["tenant"]) == (
        "Call",
        "echo",
        "ctx-test",
        "default",
    ), r
    assert isinstance(r["request"], int) and "EKU_TOOBIG" in r["error"]
    r = not_found[0]
    assert r["rpc"] == "Call" and isinstance(r["request"], int)
    assert "device" not in r and "caller" not in r  # no device was ready: none bound, as before


def test_async_call_maps_errors_and_returns_messages(sim: KupSim, start_kupd: StartKupd) -> None:
    k = start_kupd(sim)

    async def run() -> list[Message]:
        async with AsyncClient(k.socket) as c:
            got = [await c.call("echo", bytes([i]) * 64, timeout=10) for i in range(1, 4)]
            big = (await c.devices("echo"))[0].max_message_bytes + 1
            with pytest.raises(errors.TooBig):
                await c.call("echo", b"\x00" * big, timeout=10)
            with pytest.raises(errors.NotFound):
                await c.call("nosuch", b"x")
            # many at once: more Calls than pool channels, each gets its own echo
            many = await asyncio.gather(
                *(c.call("echo", f"{i:04d}".encode(), timeout=30) for i in range(40))
            )
            assert [m.data for m in many] == [f"{i:04d}".encode() for i in range(40)]
            return got

    got = asyncio.run(run())
    for i, m in enumerate(got, start=1):
        assert isinstance(m, Message)
        assert m == Message(bytes([i]) * 64, Kind.DATA, m.seq)  # frozen dataclass equality
        assert m.kind is Kind.DATA and m.seq >= 1
        with pytest.raises(AttributeError):
            m.data = b"changed"  # type: ignore[misc]


def test_queued_call_deadline_and_queue_accounting(sim: KupSim, start_kupd: StartKupd) -> None:
    """With the one pool channel held by an unanswered Call, the next Call
    waits in the queue and fails DeadlineExceeded from there (the queue's
    own deadline timer); the queue count goes back to zero and the held
    channel is quarantined, never handed to the queued caller."""
    k = start_kupd(sim, devices=("echo:1",))
    with k.client(caller="queue-test") as c:
        # never answered; its deadline is the window for the checks below
        # (a ListDevices poll, a 0.2 s queued Call, a ListDevices): ample
        # even on a loaded machine, where 3 s once was most of it
        held = call_in_flight(c, b"!hold the turn", timeout=6.0)
        with pytest.raises(errors.DeadlineExceeded, match="no pool channel became free"):
            c.call("echo", b"\x01queued", timeout=0.2)
        info = c.devices("echo")[0]
        assert info.calls_queued == 0 and info.calls_in_flight == 1
        assert isinstance(held(30.0), errors.DeadlineExceeded)
        info = c.devices("echo")[0]
        assert [ch.state for ch in info.channels if ch.state == "quarantined"] == ["quarantined"]
        assert info.calls_queued == 0 and info.calls_in_flight == 0


def test_call_timeout_is_the_request_s_capped_by_the_rpc_deadline() -> None:
    """A Call waits for the request's timeout_ms (0: kupd's call_timeout),
    never past the RPC's deadline; once that has passed, kupd must not send
    the request at all (its caller has been told the Call failed).  A
    deadline left at exactly 0 once meant the full call_timeout, and a
    passed one a negative wait after the request was sent."""
    from kupd.calls import call_timeout

    assert call_timeout(0, 30.0, None) == 30.0
    assert call_timeout(250, 30.0, None) == 0.25
    assert call_timeout(250, 30.0, 0.1) == 0.1
    assert call_timeout(0, 30.0, 2.0) == 2.0
    assert call_timeout(250, 30.0, 5.0) == 0.25
    for remaining in (0.0, -0.5):
        with pytest.raises(errors.DeadlineExceeded, match=r"deadline passed .*not sent"):
            call_timeout(0, 30.0, remaining)


def test_a_call_refused_before_its_exchange_counts_under_its_device(
    sim: KupSim, start_kupd: StartKupd
) -> None:
    """A Call to a served device that is not reachable was counted as an
    error of device "" and not at all in kupd_calls_total; a name kupd does
    not serve still never becomes a label."""

    def start(port: int) -> Kupd:
        # ghost is never reachable: kupd answers, NOT_SERVING
        k = start_kupd(
            sim, "--metrics-port", str(port), devices=("echo:4", "ghost"), wait=False
        )
        k.wait_up()
        return k

    k = with_metrics_port(start)
    with k.client() as c:
        with pytest.raises(errors.Unavailable, match="ghost"):
            c.call("ghost", b"x", timeout=10)
        with pytest.raises(errors.NotFound):
            c.call("nosuch", b"x", timeout=10)
        body = urllib.request.urlopen(k.metrics_url, timeout=10).read().decode()
    assert 'kupd_calls_total{code="UNAVAILABLE",device="ghost"} 1.0' in body, body
    assert 'kupd_errors_total{channel="",code="UNAVAILABLE",device="ghost"} 1.0' in body
    assert 'kupd_errors_total{channel="",code="NOT_FOUND",device=""} 1.0' in body
    assert "nosuch" not in body
    failed = [r for r in _failed(k.log()) if r.get("device") == "ghost"]
    assert failed and failed[0]["rpc"] == "Call" and failed[0]["tenant"] == "default", failed
    assert k.terminate() == 0


def test_a_call_its_client_cancels_is_counted_cancelled_not_ok(
    sim: KupSim, start_kupd: StartKupd
) -> None:
    k = with_metrics_port(lambda port: start_kupd(sim, "--metrics-port", str(port)))

    def count(code: str) -> float:
        body = urllib.request.urlopen(k.metrics_url, timeout=10).read().decode()
        key = f'kupd_calls_total{{code="{code}",device="echo"}} '
        line = [x for x in body.splitlines() if x.startswith(key)]
        return float(line[0].split()[-1]) if line else 0.0

    async def go() -> None:
        async with AsyncClient(k.socket) as c:
            assert (await c.call("echo", b"ok", timeout=10)).data.lower() == b"ok"  # odd: "OK"
            task = asyncio.ensure_future(c.call("echo", b"!delay", timeout=10))
            await asyncio.sleep(0.1)  # in flight: echo answers after 300 ms
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(go())
    wait_until(lambda: count("CANCELLED") == 1.0, what="the cancelled Call counted")
    assert count("OK") == 1.0
    assert k.terminate() == 0


def test_a_call_before_the_module_announces_waits_and_says_why(start_kupd: StartKupd) -> None:
    """A Call before the module has announced a channel waits for the Call
    pool to get one; at its deadline the error says the pool has none yet
    (it used to say "no pool channel became free ... (0 channels ...)")."""
    env = dict(os.environ, KUP_PARAM_ECHO_ANNOUNCE_DELAY_MS="8000")
    with echo_sim(env=env) as sim:
        k = start_kupd(sim)
        with k.client() as c:
            with pytest.raises(errors.DeadlineExceeded, match="Call pool got no channel within"):
                c.call("echo", b"early", timeout=0.5)
            # once the module announces, the pool fills and the same call works
            reply = c.call("echo", b"later", timeout=30)
            assert reply.data.lower() == b"later"
    assert k.terminate() == 0


def test_a_call_whose_pool_waits_for_the_modules_first_pass_says_so(
    start_kupd: StartKupd,
) -> None:
    """Pool channels whose module has not made the session's first call
    (kupdev_pass) serve no Call: at its deadline the error counts them and
    names the call the module owes, where it used to say only that no pool
    channel became free -- a module that forgot its first pass looked busy.
    (echo's start_delay_ms: each worker sleeps before its first pass.)"""
    env = dict(os.environ, KUP_PARAM_ECHO_START_DELAY_MS="5000", KUP_PARAM_ECHO_CHANNELS="4")
    with echo_sim(env=env) as sim:
        k = start_kupd(sim, devices=("echo:2",))
        with k.client() as c:
            wait_until(
                lambda: sum(ch.state == "calls" for ch in c.devices("echo")[0].channels) == 2,
                what="the Call pool attached its 2 channels",
            )
            with pytest.raises(errors.DeadlineExceeded) as exc:
                c.call("echo", b"early", timeout=0.5)
            assert "(2 channels, 2 of them still waiting for the module's first hand-over" in str(
                exc.value
            ), exc.value
            assert "kupdev_pass" in str(exc.value), exc.value
            # once the workers pass, the same call works
            assert c.call("echo", b"later", timeout=30).data.lower() == b"later"
    assert k.terminate() == 0


def test_a_call_with_an_overlong_caller_is_refused_and_logged_short(
    sim: KupSim, start_kupd: StartKupd
) -> None:
    """The caller key is kept per queued Call and logged with a failed
    one: kupd takes at most 256 bytes of it, and refuses a longer one with
    InvalidArgument naming the key -- its log line stays short."""
    k = start_kupd(sim)
    with k.client(caller="é" * 128) as c:  # 256 bytes: the most there is
        # case-blind: echo upper-cases on odd channels, and the pool may pick one
        assert c.call("echo", b"ok", timeout=10).data.lower() == b"ok"
    with k.client(caller="x" * (1 << 20)) as c:
        with pytest.raises(errors.InvalidArgument, match=r"caller of 1048576 bytes.* at most 256"):
            c.call("echo", b"x", timeout=10)
    assert k.terminate() == 0
    (r,) = [r for r in _failed(k.log()) if r["rpc"] == "Call"]
    assert r["code"] == "INVALID_ARGUMENT" and r["caller"].startswith("'xxx"), r
    assert len(k.log()) < 100_000
