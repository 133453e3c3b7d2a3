"""Limits and liveness: the largest KUP message through gRPC both ways,
hung clients detected by keepalive, metrics on an opt-in loopback port."""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import grpc
import pytest
from gateway_helpers import Kupd, StartKupd, child_env, echo_sim, holding_client

from kupapi import kup_pb2, kup_pb2_grpc
from kupclient import Client, Kind, Lease
from kupd import errors
from kupd.abi import KUP_MAX_PAGES
from kupd.config import Config
from kupd.testing import KupSim, wait_until, with_metrics_port


def test_largest_channel_fits_through_grpc(start_kupd: StartKupd) -> None:
    env = dict(os.environ, KUP_PARAM_ECHO_CHANNELS="4", KUP_PARAM_ECHO_PAGES=str(KUP_MAX_PAGES))
    with echo_sim(env=env) as sim:
        k = start_kupd(sim, devices=("echo:2",))
        with k.client() as c:
            (dev,) = c.devices()
            big = dev.max_message_bytes
            assert big == KUP_MAX_PAGES * dev.page_size  # 4 MiB with 4 KiB pages
            # No ASCII a-z: the Call may land on an odd pool channel, where echo
            # upper-cases; every other byte value is covered.
            alphabet = bytes(b for b in range(256) if not 0x61 <= b <= 0x7A)
            payload = (alphabet * (big // len(alphabet) + 1))[:big]
            assert c.call("echo", payload, timeout=60).data == payload
            with pytest.raises(errors.TooBig, match=str(big)):
                c.call("echo", payload + b"!", timeout=60)
            with c.open("echo").channel(2) as ch:
                assert ch.receive().kind == Kind.PASS
                ch.send(payload)
                assert ch.receive(timeout=60).data == payload
        assert k.terminate() == 0


@pytest.mark.parametrize("settings", ["1s", "default"])
def test_hung_client_is_detected_by_keepalive(
    sim: KupSim, start_kupd: StartKupd, settings: str
) -> None:
    """A SIGSTOPped client holding a session (alive, socket open, answering
    nothing) is dropped by keepalive and its channel freed: with 1 s
    settings (the mechanism), and with kupd's DEFAULT settings, whose sum
    (ping every keepalive_time, drop after keepalive_timeout) is what bounds
    the detection time: issue 4 asks for 5 s.  The wait itself is generous
    because the machine is shared."""
    if settings == "default":
        cfg = Config()
        assert cfg.keepalive_time + cfg.keepalive_timeout <= 5.0
        k = start_kupd(sim)
    else:
        k = start_kupd(sim, "--keepalive-time", "1", "--keepalive-timeout", "1")
    with holding_client(k.socket, 44) as child, k.client() as c:
        child.send_signal(signal.SIGSTOP)

        def free() -> bool:
            try:
                c.open("echo").channel(44).close()
                return True
            except errors.Busy:
                return False

        wait_until(free, timeout=60, what="hung client dropped by keepalive")


def test_metrics_on_loopback(sim: KupSim, start_kupd: StartKupd) -> None:
    k = with_metrics_port(lambda port: start_kupd(sim, "--metrics-port", str(port)))
    with k.client() as c:
        for i in range(3):
            c.call("echo", f"{i}".encode(), timeout=10)
        with pytest.raises(errors.NotFound):
            c.call("nosuch", b"x")
        with c.open("echo").channel(9) as ch:
            ch.receive()
            text = urllib.request.urlopen(k.metrics_url, timeout=10).read()
    body = text.decode()
    assert 'kupd_calls_total{code="OK",device="echo"} 3.0' in body
    assert 'kupd_sessions{device="echo"} 1.0' in body
    assert "kupd_turn_wait_seconds_bucket" in body
    assert 'kupd_messages_total{channel="9",device="echo",direction="from_kernel"} 1.0' in body
    assert 'kupd_errors_total{channel="",code="NOT_FOUND",device=""}' in body
    assert k.terminate() == 0


def test_the_metrics_endpoint_spends_a_bounded_number_of_threads(
    sim: KupSim, start_kupd: StartKupd
) -> None:
    """Any local user can connect to the metrics port: idle connections
    used to cost kupd a thread each (31 -> 482 threads in a probe).  Now at
    most 8 are served at once; the rest are closed, and scraping works again
    once the idle ones are gone."""
    k = with_metrics_port(lambda port: start_kupd(sim, "--metrics-port", str(port)))
    url = urlparse(k.metrics_url)
    urllib.request.urlopen(k.metrics_url, timeout=10).read()

    def threads() -> int:
        return len(os.listdir(f"/proc/{k.pid}/task"))

    before = threads()
    idle = [socket.create_connection((url.hostname, url.port), timeout=10) for _ in range(40)]
    try:
        time.sleep(1.0)  # each accepted one would have its thread by now
        assert threads() <= before + 8, (before, threads())
    finally:
        for conn in idle:
            conn.close()
    def scraped() -> bool:
        try:
            return b"kupd_sessions" in urllib.request.urlopen(k.metrics_url, timeout=10).read()
        except (OSError, http.client.HTTPException):  # a slot not free yet
            return False

    wait_until(scraped, what="a scrape once the idle connections are gone")
    assert k.terminate() == 0


def test_session_limit_is_resource_exhausted(sim: KupSim, start_kupd: StartKupd) -> None:
    k = start_kupd(sim, "--max-sessions", "2")
    with k.client() as c:
        h = c.open("echo")
        with h.channel(), h.channel():
            with pytest.raises(errors.ResourceExhausted, match="max_sessions=2"):
                h.channel()
            with pytest.raises(errors.ResourceExhausted):
                c.attach("echo")
        with h.channel() as ch:  # freed again
            assert ch.receive().kind == Kind.PASS
    assert k.terminate() == 0


def _attach_together(k: Kupd, n: int) -> tuple[list[Lease], list[BaseException]]:
    """n clients attach at the same moment: (leases held, refusals)."""
    barrier = threading.Barrier(n)
    held: list[Lease] = []
    refused: list[BaseException] = []
    lock = threading.Lock()
    clients = [k.client() for _ in range(n)]

    def take(c: Client) -> None:
        barrier.wait()
        try:
            lease = c.attach("echo")
        except errors.ResourceExhausted as exc:
            with lock:
                refused.append(exc)
        else:
            with lock:
                held.append(lease)

    try:
        threads = [threading.Thread(target=take, args=(c,)) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for lease in held:
            clients[0].release(lease.lease_id)
    finally:
        for c in clients:
            c.close()
    return held, refused


def test_concurrent_attaches_never_exceed_max_sessions(
    sim: KupSim, start_kupd: StartKupd
) -> None:
    """max_sessions was checked before an attach awaited the host and the
    lease counted only after: attaches arriving together all passed the
    check (15 held against a limit of 10).  Twenty at once, three rounds:
    never more than the limit, the rest ResourceExhausted naming it."""
    k = start_kupd(sim, "--max-sessions", "3")
    for _ in range(3):
        held, refused = _attach_together(k, 20)
        assert len(held) <= 3 and len(held) + len(refused) == 20, (len(held), refused)
        assert all("limit max_sessions=3" in str(e) for e in refused), refused[:2]
    assert k.terminate() == 0


def test_no_free_channel_says_who_holds_them(start_kupd: StartKupd) -> None:
    """With every channel taken, "any channel" is Busy naming the device and
    who holds its channels -- not libkup's "channel held by another user",
    which reads as if someone else were in the way."""
    env = {**os.environ, "KUP_PARAM_ECHO_CHANNELS": "8"}
    with echo_sim(env=env) as sim:
        k = start_kupd(sim, devices=("echo:2",))
        with k.client() as c:
            wait_until(lambda: c.devices("echo")[0].call_channels == 2, what="the Call pool")
            sessions = [c.open("echo").channel() for _ in range(5)]
            lease = c.attach("echo")
            want = (
                "device echo has no free channel: of its 8 channels, "
                "1 by leases, 5 by sessions, 2 by the Call pool"
            )
            with pytest.raises(errors.Busy) as ei:
                c.open("echo").channel()
            assert str(ei.value).endswith(want), ei.value
            with pytest.raises(errors.Busy) as ei:
                c.attach("echo")
            assert str(ei.value).endswith(want), ei.value
            c.release(lease.lease_id)
            for ch in sessions:
                ch.close()
            c.open("echo").channel().close()  # free again


def test_no_free_channel_of_a_one_channel_device_says_channel(start_kupd: StartKupd) -> None:
    """The count in the Busy text is a count: "of its 1 channel"."""
    env = {**os.environ, "KUP_PARAM_ECHO_CHANNELS": "1"}
    with echo_sim(env=env) as sim:
        k = start_kupd(sim, devices=("echo:0",))
        with k.client() as c:
            held = c.open("echo").channel()
            with pytest.raises(errors.Busy) as ei:
                c.open("echo").channel()
            assert str(ei.value).endswith(
                "device echo has no free channel: of its 1 channel, 1 by sessions"
            ), ei.value
            held.close()


def test_running_out_of_descriptors_is_warned_of_and_named(sim: KupSim, tmp_path: Path) -> None:
    """kupd under a small RLIMIT_NOFILE: its log warns when 90 % of the
    descriptors are in use (at the limit nobody connects, the admin socket
    included), a session it can no longer receive a channel for is
    ResourceExhausted naming the cause (not 'the peer broke the protocol'),
    and the log says when usage is back down."""
    from kupd import testing

    prlimit = shutil.which("prlimit")
    if prlimit is None:
        pytest.skip("prlimit (util-linux) is not installed")
    k = testing.start_kupd(
        log=tmp_path / "kupd.log",
        socket=tmp_path / "kupd.sock",
        sim=sim,
        devices=("echo:1",),
        command=[prlimit, "--nofile=80:80", sys.executable, "-m", "kupd.daemon"],
    )
    try:
        with Client(str(tmp_path / "kupd.sock")) as c:
            held = []
            with pytest.raises(errors.ResourceExhausted) as ei:
                for _ in range(100):
                    held.append(c.open("echo").channel())
            assert "kupd has run out of file descriptors" in str(ei.value), ei.value
            assert held, "not one session before the limit"
            wait_until(
                lambda: "file descriptors nearly used up" in k.log(),
                timeout=30,
                what="kupd's warning",
            )
            for ch in held:
                ch.close()
            wait_until(
                lambda: "file descriptors back under the warning level" in k.log(),
                timeout=30,
                what="kupd's all-clear",
            )
            assert c.open("echo").channel().id >= 0  # serving as before
    finally:
        k.stop()


def test_descriptor_count_at_the_limit_is_the_limit() -> None:
    """kupd.server.fd_usage at RLIMIT_NOFILE: listing /proc/self/fd needs a
    descriptor of its own and fails with EMFILE -- which means every one is
    in use, not that they cannot be counted (the watch gave up for good)."""
    script = (
        "import os, resource\n"
        "from kupd.server import fd_usage\n"
        "used, _ = fd_usage()\n"
        "lim = used + 4\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (lim, lim))\n"
        "held = []\n"
        "try:\n"
        "    while True:\n"
        "        held.append(os.open('/dev/null', os.O_RDONLY))\n"
        "except OSError:\n"
        "    pass\n"
        "u, l = fd_usage()\n"
        "os.close(held.pop())\n"
        "os.close(held.pop())\n"
        "u2, l2 = fd_usage()\n"
        "print(lim, u, l, u2, l2)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
        env=child_env(),
    )
    assert out.returncode == 0, out.stderr
    lim, at_used, at_limit, below_used, below_limit = map(int, out.stdout.split())
    assert (at_used, at_limit) == (lim, lim), out.stdout  # at the limit: all in use
    assert below_limit == lim and below_used < lim, out.stdout  # counted again


def _silent_sessions(k: Kupd, n: int) -> tuple[grpc.Channel, list[Any], threading.Event]:
    """n raw Session streams that send nothing (not even their attach)
    until the event is set, then end their side."""
    chan = grpc.insecure_channel("unix:" + k.socket)
    stub = kup_pb2_grpc.KupStub(chan)
    done = threading.Event()

    def nothing() -> Iterator[kup_pb2.SessionRequest]:
        done.wait()
        yield from ()

    return chan, [stub.Session(nothing()) for _ in range(n)], done


def _unattached(k: Kupd) -> float:
    """kupd_sessions_unattached, from kupd's metrics endpoint."""
    assert k.metrics_url is not None
    text = urllib.request.urlopen(k.metrics_url, timeout=10).read().decode()
    (line,) = [x for x in text.splitlines() if x.startswith("kupd_sessions_unattached ")]
    return float(line.split()[-1])


def test_sessions_not_attached_yet_count_against_max_sessions(
    sim: KupSim, start_kupd: StartKupd
) -> None:
    """A Session stream costs kupd memory before its first request: streams
    that never attach count against max_sessions like the leases they
    would take (Sessions and unary Attach alike), so a client cannot hold
    an unbounded number of them, and the refusal names them.  Once they
    end, their room is back."""
    k = with_metrics_port(
        lambda port: start_kupd(sim, "--metrics-port", str(port), "--max-sessions", "3")
    )
    chan, streams, done = _silent_sessions(k, 2)
    try:
        wait_until(lambda: _unattached(k) == 2, what="kupd counting both silent streams")
        with k.client() as c:
            with c.open("echo").channel() as ch:  # the third
                assert ch.receive(timeout=10).kind == Kind.PASS
                want = (
                    r"3 sessions and leases open \(1 held, 2 Sessions not attached yet; "
                    r"limit max_sessions=3\)"
                )
                with pytest.raises(errors.ResourceExhausted, match=want):
                    c.open("echo").channel()
                with pytest.raises(errors.ResourceExhausted, match=want):
                    c.attach("echo")
            done.set()
            for s in streams:
                assert list(s) == []  # ended before an attach: nothing to answer
            assert _unattached(k) == 0
            held = [c.open("echo").channel() for _ in range(3)]
            for h in held:
                h.close()
    finally:
        done.set()
        chan.close()
    assert k.terminate() == 0


def test_operations_waiting_for_one_lease_are_bounded(sim: KupSim, start_kupd: StartKupd) -> None:
    """Unary operations on one Attach lease run one at a time; those that
    wait for it each cost kupd memory, so at most 64 may wait: the next is
    ResourceExhausted naming the bound.  The waiting ones are unharmed."""
    from kupd.sessions import MAX_WAITING_OPS

    k = start_kupd(sim)
    with k.client() as c:
        lease = c.attach("echo", 40)
        assert c.lease_receive(lease.lease_id, timeout=10).kind == Kind.PASS
        c.lease_send(lease.lease_id, b"!hold")  # never answered: receives wait
        chan = grpc.insecure_channel("unix:" + k.socket)
        try:
            stub = kup_pb2_grpc.KupStub(chan)
            req = kup_pb2.ReceiveRequest(
                lease_id=lease.lease_id, mode=kup_pb2.RECEIVE_MODE_DEADLINE, timeout_ms=20000
            )
            # one of them holds the lease (20 s), 64 queue behind it, and
            # the 8 beyond those are refused -- whatever order kupd takes
            # them in
            extra = 8
            calls = [
                stub.Receive.future(req, timeout=30) for _ in range(1 + MAX_WAITING_OPS + extra)
            ]
            wait_until(lambda: sum(f.done() for f in calls) >= extra, what="the refusals")
            time.sleep(0.5)  # and no more than those
            done = [f for f in calls if f.done()]
            assert len(done) == extra, [f.exception() for f in done]
            for f in done:
                exc = f.exception()
                assert exc is not None and exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                assert f"at most {MAX_WAITING_OPS} wait" in str(exc.details()), exc
            for f in calls:
                f.cancel()
        finally:
            chan.close()
        c.release(lease.lease_id)
    assert k.terminate() == 0


def test_a_nonblocking_receive_does_not_wait_behind_a_blocking_one(
    sim: KupSim, start_kupd: StartKupd
) -> None:
    """A non-blocking Receive on a lease whose blocking Receive is waiting
    answers not ready at once, instead of waiting behind it."""
    k = start_kupd(sim)
    with k.client() as c:
        lease = c.attach("echo", 42)
        assert c.lease_receive(lease.lease_id, timeout=10).kind == Kind.PASS
        c.lease_send(lease.lease_id, b"!hold")  # never answered
        chan = grpc.insecure_channel("unix:" + k.socket)
        try:
            stub = kup_pb2_grpc.KupStub(chan)
            blocked = stub.Receive.future(
                kup_pb2.ReceiveRequest(
                    lease_id=lease.lease_id, mode=kup_pb2.RECEIVE_MODE_DEADLINE, timeout_ms=5000
                ),
                timeout=30,
            )
            time.sleep(0.5)
            t0 = time.monotonic()
            with pytest.raises(errors.NotReady):
                c.lease_receive(lease.lease_id, timeout=0)
            assert time.monotonic() - t0 < 2.5  # not the 5 s of the blocking one
            assert blocked.exception() is not None  # its own deadline
        finally:
            chan.close()
        c.release(lease.lease_id)
    assert k.terminate() == 0


def test_the_stream_within_max_sessions_keeps_its_room(sim: KupSim, start_kupd: StartKupd) -> None:
    """max_sessions = 1: a Session stream that has not attached yet holds
    the room; a second stream is refused at its start, and the first one's
    attach, later, is served."""
    k = with_metrics_port(
        lambda port: start_kupd(sim, "--metrics-port", str(port), "--max-sessions", "1")
    )
    chan = grpc.insecure_channel("unix:" + k.socket)
    go = threading.Event()

    def first() -> Iterator[kup_pb2.SessionRequest]:
        go.wait()
        yield kup_pb2.SessionRequest(
            request_id=1, attach=kup_pb2.SessionAttach(device="echo", channel=20)
        )

    try:
        stub = kup_pb2_grpc.KupStub(chan)
        a = stub.Session(first())
        wait_until(lambda: _unattached(k) == 1, what="kupd counting the first stream")
        with pytest.raises(grpc.RpcError) as e:
            next(stub.Session(iter([kup_pb2.SessionRequest(request_id=1)])))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "1 Sessions not attached yet; limit max_sessions=1" in str(e.value.details())
        go.set()
        assert next(a).WhichOneof("result") == "attached"
        a.cancel()
    finally:
        go.set()
        chan.close()
    assert k.terminate() == 0
