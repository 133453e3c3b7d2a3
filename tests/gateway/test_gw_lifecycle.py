"""kupd as a process: dead clients, lease expiry, SIGTERM drain, the lock,
config errors and health, with real subprocesses and signals.

A SIGKILLed kupd restarting on its stale socket and lock, and a Call in
flight when the device's host dies, are tested once, in tests/faults
(test_kupd_sigkill_..._reattaches, test_device_goes_others_keep_serving)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from gateway_helpers import (
    LOCKHOLD,
    Kupd,
    StartKupd,
    call_in_flight,
    child_env,
    echo_sim,
    holding_client,
    live_watch,
)

from kupclient import Client, EventType, Kind
from kupd import errors
from kupd.channel import Device
from kupd.channel import Kind as ChannelKind
from kupd.testing import (
    KupdError,
    KupSim,
    all_stopped,
    echo_lock_holds,
    wait_until,
    with_metrics_port,
)


def test_sigkilled_client_frees_its_channel(sim: KupSim, start_kupd: StartKupd) -> None:
    """A SIGKILLed client's session ends when kupd sees its connection close.
    Keepalive is set far beyond every wait here, so nothing else can end it
    in time (this once asserted "within 1 s of the kill", a wall-clock bound
    a loaded machine can miss)."""
    k = start_kupd(sim, "--keepalive-time", "3600", "--keepalive-timeout", "3600")
    with k.client() as client, live_watch(client) as events:
        with holding_client(k.socket, 40) as child:
            with pytest.raises(errors.Busy):
                client.open("echo").channel(40)
            taken = next(events)
            assert (taken.type, taken.channel) == (EventType.LEASE_TAKEN, 40), taken
            child.kill()
            child.wait(10)
            wait_until(
                lambda: client.devices("echo")[0].channels[40].state == "free",
                timeout=60,
                what="kupd to end the killed client's session",
            )
            released = next(events)  # published when the lease ended
            assert (released.type, released.lease_id) == (
                EventType.LEASE_RELEASED,
                taken.lease_id,
            ), released
            assert released.reason in ("stream cancelled", "stream ended"), released
        # kupsim may still be renewing the channel: kupd waits for that
        ch = client.open("echo").channel(40)
        with ch:
            assert ch.receive().seq == 1  # a fresh conversation


def test_lease_idle_expiry(sim: KupSim, start_kupd: StartKupd) -> None:
    # long enough that the Receive right after the Attach is never late for
    # it on a loaded machine (at 0.3 s it could find the lease expired)
    k = start_kupd(sim, "--lease-idle-timeout", "2")
    with k.client() as c, live_watch(c) as events:
        lease = c.attach("echo", 50)
        assert c.lease_receive(lease.lease_id).kind == Kind.PASS  # use keeps it alive
        seen = []
        for ev in events:
            seen.append(ev)
            if ev.type == EventType.LEASE_RELEASED:
                break
        assert [e.type for e in seen] == [EventType.LEASE_TAKEN, EventType.LEASE_RELEASED]
        assert seen[1].lease_id == lease.lease_id and seen[1].reason == "expired"
        with pytest.raises(errors.NotFound, match="expired"):
            c.lease_send(lease.lease_id, b"late")
        c.attach("echo", 50)  # the channel is free again


def _draining(k: Kupd) -> list[dict[str, object]]:
    """kupd's "kupd draining" log records (one JSON object per line)."""
    out = []
    for line in k.log().splitlines():
        if line.startswith("{") and '"kupd draining"' in line:
            rec = json.loads(line)
            if rec.get("event") == "kupd draining":
                out.append(rec)
    return out


def test_sigterm_drain(sim: KupSim, start_kupd: StartKupd) -> None:
    """A Call in flight at SIGTERM finishes within the drain grace.  echo
    holds it ("!lockhold") until the test, having seen kupd start draining
    with the Call counted, releases it from a channel of its own straight
    on kupsim (kupd takes no new requests by then) -- rather than a 300 ms
    "!delay" that could end before the poll saw it in flight, or before
    the SIGTERM."""
    k = start_kupd(sim, "--drain-grace", "10")
    with k.client() as c:
        events = live_watch(c)
        ch = c.open("echo").channel()
        ch.receive()
        assert next(events).type == EventType.LEASE_TAKEN
        finish = call_in_flight(c, LOCKHOLD, timeout=60)
        wait_until(lambda: echo_lock_holds(sim) > 0, what="echo to hold the Call")
        k.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: bool(_draining(k)), what="kupd to start draining")
        assert _draining(k)[0]["calls"] == 1, _draining(k)
        with Device.open(sim.device_path("echo")) as dev, dev.channel() as free:
            assert free.receive(timeout=30).kind is ChannelKind.PASS
            assert free.exchange(b"!lockfree", 30).data.lower() == b"!lockfree"
        # The call in flight finished within the grace period.
        result = finish(30)
        assert not isinstance(result, Exception), result
        # The open session ends UNAVAILABLE with EKU_SHUTDOWN.
        with pytest.raises(errors.Shutdown, match="EKU_SHUTDOWN"):
            ch.send(b"x")
        rest = []
        with pytest.raises(errors.Shutdown):
            for ev in events:
                rest.append(ev.type)
        assert EventType.SERVER_SHUTTING_DOWN in rest
        assert EventType.LEASE_RELEASED in rest
    assert k.proc.wait(30) == 0
    assert not os.path.exists(k.socket)
    assert not os.path.exists(k.socket + ".pid")
    assert "kupd stopped" in k.log()


def test_second_kupd_on_the_same_socket_refuses(sim: KupSim, start_kupd: StartKupd) -> None:
    first = start_kupd(sim)
    second = start_kupd(sim, socket=first.socket, wait=False)
    assert second.proc.wait(30) == 1
    assert "lock" in second.log() and str(first.pid) in second.log()
    with first.client() as c:  # the first one still serves its socket
        assert c.call("echo", b"7", timeout=10).data == b"7"
    assert first.terminate() == 0


def test_pidfile_and_socket_mode(sim: KupSim, start_kupd: StartKupd) -> None:
    k = start_kupd(sim)
    assert Path(k.socket + ".pid").read_text().strip() == str(k.pid)
    assert os.stat(k.socket).st_mode & 0o777 == 0o660
    assert k.terminate() == 0


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        (
            'socket = "/tmp/x.sock"\ncall_timeout = "soon"\n[[device]]\nname = "echo"\n',
            "call_timeout",
        ),
        ('[[device]]\nname = "echo"\ncall_channels = -1\n', "device[0].call_channels"),
        ('[[device]]\nname = "echo"\n[[device]]\nname = "echo"\n', "device[1].name"),
        ('bogus = 1\n[[device]]\nname = "echo"\n', "bogus"),
        ('metrics_address = "0.0.0.0"\n[[device]]\nname = "echo"\n', "metrics_address"),
        ('socket_mode = "0400"\n[[device]]\nname = "echo"\n', "socket_mode"),
        ("socket = \n", "--config"),
    ],
)
def test_config_error_names_its_key(tmp_path: Path, toml: str, key: str) -> None:
    cfg = tmp_path / "kupd.toml"
    cfg.write_text(toml)
    r = subprocess.run(
        [sys.executable, "-m", "kupd.daemon", "--config", str(cfg)],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    # a flag's own value as the flag; a key in quotes; the file either way
    assert (f"flag {key}:" if key.startswith("--") else f"'{key}'") in r.stderr, r.stderr
    assert str(cfg) in r.stderr, r.stderr


@pytest.mark.parametrize(
    ("flag", "needle"),
    [
        ("echo:4x", "flag --device: 'echo:4x': CALL_CHANNELS after the ':' must be a number >= 0"),
        ("echo:-1", "flag --device: 'echo:-1': CALL_CHANNELS after the ':' must be a number >= 0"),
        ("bad name", "'device[0].name': 'bad name' is not a device name"),
    ],
)
def test_device_flag_error_names_it(flag: str, needle: str) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "kupd.daemon", "--socket", "/nonexistent/x.sock", "--device", flag],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr, r.stderr


def test_a_socket_that_cannot_be_bound_is_named_and_nothing_is_left(tmp_path: Path) -> None:
    lock = tmp_path / "kupd.lock"
    r = subprocess.run(
        [sys.executable, "-m", "kupd.daemon", "--socket", "/proc/kupd-test.sock",
         "--lock-file", str(lock), "--pid-file", "-", "--device", "echo"],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1, r.stderr
    assert "kupd: cannot bind unix socket /proc/kupd-test.sock (tenant default)" in r.stderr
    assert "Traceback" not in r.stderr
    # in kupd's log too (a service manager's journal), not only the plain line
    (refused,) = [
        json.loads(line) for line in r.stderr.splitlines() if '"refusing to start"' in line
    ]
    assert "cannot bind unix socket /proc/kupd-test.sock" in refused["error"], refused
    # the lock file stays (by design: see Server._cleanup), but nobody holds it
    with open(lock, "rb") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_metrics_port_in_use_is_named(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))  # held (listening) for the whole run
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run(
            [sys.executable, "-m", "kupd.daemon", "--socket", str(tmp_path / "k.sock"),
             "--device", "echo", "--metrics-port", str(port)],
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert r.returncode == 1, r.stderr
    assert (f"kupd: cannot serve metrics on 127.0.0.1:{port} (metrics_port): "
            "Address already in use") in r.stderr, r.stderr
    assert not (tmp_path / "k.sock").exists()


def test_files_kupd_cannot_open_at_start_are_named(tmp_path: Path) -> None:
    """Each said "[Errno 2] No such file or directory: PATH", naming neither
    the key nor what kupd wanted the file for (and the audit log exited 1
    where every other config error exits 2)."""
    missing = tmp_path / "no-such-dir"
    cfg = tmp_path / "k.toml"
    cfg.write_text(f'audit_log = "{missing}/audit.log"\n[[device]]\nname = "echo"\n')
    cases = [
        (["--config", str(cfg)], 2, f"config key 'audit_log': cannot open {missing}/audit.log"),
        (["--device", "echo", "--lock-file", f"{missing}/k.lock"], 1,
         f"kupd: cannot open lock_file {missing}/k.lock: No such file or directory"),
        (["--device", "echo", "--pid-file", f"{missing}/k.pid"], 1,
         f"kupd: cannot write pid_file {missing}/k.pid: No such file or directory"),
    ]  # fmt: skip
    for args, rc, said in cases:
        r = subprocess.run(
            [sys.executable, "-m", "kupd.daemon", "--socket", str(tmp_path / "k.sock"), *args],
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == rc, (args, r.stderr)
        assert said in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr
        assert not (tmp_path / "k.sock").exists()
        # and in kupd's log (the journal), not only the plain line
        (refused,) = [
            json.loads(line) for line in r.stderr.splitlines() if '"refusing to start"' in line
        ]
        assert said.removeprefix("kupd: ") in refused["error"], (args, refused)


def test_with_metrics_port_tries_another_port_when_one_is_taken(
    sim: KupSim, start_kupd: StartKupd
) -> None:
    """The testing helper's answer to a port taken between its choice and
    kupd's bind: kupd refuses it (as above), the helper starts it again on
    another port; any other failure is not tried again."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        tried: list[int] = []

        def start(port: int) -> Kupd:
            tried.append(port)
            # the first try gets the port someone else holds
            return start_kupd(sim, "--metrics-port", str(taken if len(tried) == 1 else port))

        k = with_metrics_port(start)
    assert len(tried) == 2 and k.metrics_url == f"http://127.0.0.1:{tried[1]}/metrics"
    body = urllib.request.urlopen(k.metrics_url, timeout=10).read().decode()
    assert "kupd_sessions" in body
    assert k.terminate() == 0

    bad: list[int] = []

    def start_bad(port: int) -> Kupd:
        bad.append(port)
        return start_kupd(sim, "--metrics-port", str(port), "--max-sessions", "-1")

    with pytest.raises(KupdError, match="max_sessions"):
        with_metrics_port(start_bad)
    assert len(bad) == 1


def test_kupd_outlives_its_log_reader(sim: KupSim, tmp_path: Path) -> None:
    """stderr is a pipe whose reader goes away (a supervisor's logger
    restarted): kupd once died on its next log line, and a drain that logged
    into the closed pipe never finished.  It drops the lines and serves on."""
    sock = tmp_path / "k.sock"
    r, w = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kupd.daemon", "--socket", str(sock),
         "--kupsim-dir", str(sim.rundir), "--device", "echo:2", "--log-level", "debug"],
        stdin=subprocess.DEVNULL, stdout=w, stderr=w, env=child_env(sim),
    )
    os.close(w)
    try:
        os.read(r, 100)  # kupd has started logging
        os.close(r)  # ... and its reader is gone
        with Client(str(sock)) as c:
            wait_until(lambda: sock.exists() and c.health() == "SERVING", what="SERVING")
            for i in range(20):  # every Call logs at debug: each line hits the closed pipe
                assert c.call("echo", b"%d" % i, timeout=10).data == b"%d" % i
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_flags_override_config(tmp_path: Path, sim: KupSim, start_kupd: StartKupd) -> None:
    cfg = tmp_path / "kupd.toml"
    cfg.write_text('socket = "/nonexistent/dir/x.sock"\n[[device]]\nname = "other"\n')
    k = start_kupd(sim, "--config", str(cfg))  # --socket and --device from the fixture win
    with k.client() as c:
        assert [d.name for d in c.devices()] == ["echo"]
    assert k.terminate() == 0


def test_health_reflects_a_device_going_away(start_kupd: StartKupd, tmp_path: Path) -> None:
    rundir = tmp_path / "sim"
    with echo_sim(rundir=rundir) as sim:
        k = start_kupd(sim)
        c = k.client()
        events = live_watch(c)
        sim.stop(check=False)
        wait_until(lambda: c.health() == "NOT_SERVING", what="NOT_SERVING")
        assert c.health("kup.v1.Kup/echo") == "NOT_SERVING"
        (dev,) = c.devices()
        assert not dev.reachable and dev.error
        types = []
        for ev in events:
            types.append(ev.type)
            if ev.type == EventType.DEVICE_GONE:
                break
        assert EventType.DEVICE_GONE in types
    # the device comes back: kupd finds it again
    with echo_sim(rundir=rundir):
        wait_until(lambda: c.health() == "SERVING", what="SERVING again")
        for ev in events:
            if ev.type == EventType.DEVICE_APPEARED:
                break
        assert c.call("echo", b"99", timeout=10).data == b"99"
        events.cancel()
        c.close()
        assert k.terminate() == 0


def test_sample_config_is_valid() -> None:
    from kupd.config import load_config
    from kupd.testing import REPO_ROOT

    cfg = load_config(REPO_ROOT / "deploy" / "kupd.sample.toml")
    assert [(d.name, d.call_channels) for d in cfg.devices] == [("echo", 4)]
    assert cfg.socket_mode == 0o660 and cfg.metrics_port == 0
    assert cfg.lock_path == cfg.socket + ".lock"


def test_sigterm_again_while_kupd_exits_still_exits_0(sim: KupSim, start_kupd: StartKupd) -> None:
    """A second SIGTERM (a service manager's, a test helper's stop) that
    lands after the drain, while the interpreter and gRPC's threads wind
    down, used to kill kupd (exit status -15, seen in a fresh-clone run):
    the drain's handler was gone with the loop.  SIGTERMs are sent here
    from the first until kupd has exited, so some land in that window."""
    k = start_kupd(sim)
    with k.client() as c:
        assert c.call("echo", b"before").data.lower() == b"before"
    k.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "kupd stopped" in k.log(), what="kupd to finish its drain")
    while k.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            k.proc.send_signal(signal.SIGTERM)
        time.sleep(0.001)
    assert k.proc.returncode == 0, k.log()


def test_sigterm_ends_every_stream_with_shutdown(sim: KupSim, start_kupd: StartKupd) -> None:
    """Many open streams at SIGTERM: each Watch and each Session ends with
    kupd's Shutdown status (not a CANCELLED left by the server's stop), since
    kupd waits for the handlers to hand their status over before it stops."""
    k = start_kupd(sim, "--drain-grace", "10")
    watchers, sessions = 32, 8
    with k.client() as c:
        watches = [live_watch(c) for _ in range(watchers)]
        chans = [c.open("echo").channel() for _ in range(sessions)]
        for ch in chans:
            ch.receive()
        ended: list[BaseException] = []
        lock = threading.Lock()

        def drain(w: Iterator[object]) -> None:
            try:
                for _ in w:
                    pass
                exc: BaseException = AssertionError("watch ended without an error")
            except BaseException as e:  # recorded and checked below
                exc = e
            with lock:
                ended.append(exc)

        threads = [threading.Thread(target=drain, args=(w,)) for w in watches]
        for t in threads:
            t.start()
        k.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
            assert not t.is_alive(), "a watch did not end after SIGTERM"
        assert len(ended) == watchers
        for exc in ended:
            assert isinstance(exc, errors.Shutdown), repr(exc)
        for ch in chans:
            with pytest.raises(errors.Shutdown, match="EKU_SHUTDOWN"):
                ch.send(b"x")
    assert k.proc.wait(30) == 0
    assert "streams still open" not in k.log()


def test_a_short_call_pool_fills_up_once_a_channel_is_free(start_kupd: StartKupd) -> None:
    """Another user of the device holds all but three channels when kupd
    starts: the pool of four gets three.  When that user lets one go, the
    pool takes it within a health round or two -- a freed channel makes no
    event of its own, and the pool used to stay short for good."""
    env = {**os.environ, "KUP_PARAM_ECHO_CHANNELS": "8"}
    with echo_sim(env=env) as sim:
        dev = Device.open(sim.device_path("echo"))
        try:
            other = [dev.channel(i) for i in range(5)]
            k = start_kupd(sim, devices=("echo:4",))
            with k.client() as c:
                wait_until(lambda: c.devices("echo")[0].call_channels == 3, what="3 pool channels")
                other.pop().close()
                wait_until(
                    lambda: c.devices("echo")[0].call_channels == 4,
                    timeout=20,
                    what="the pool to take the freed channel",
                )
                for i in range(8):
                    assert c.call("echo", b"%d" % i, timeout=10).data.lower() == b"%d" % i
            log = k.log()
            assert log.count("call pool not full yet") == 1, log[-3000:]
            assert "call pool full again" in log
        finally:
            for ch in other:
                ch.close()
            dev.close()


def test_a_hung_host_makes_its_device_not_serving_in_time(
    sim: KupSim, start_kupd: StartKupd
) -> None:
    """echo's kupsim is stopped (SIGSTOP: it accepts nothing and answers
    nothing, as a hung host would).  A health check and ListDevices answer
    within a few seconds all the same -- echo NOT_SERVING and marked as not
    answering, rot13 (another kupsim) SERVING -- where they waited out
    libkup's 30 s RPC timeout for echo before answering anything."""
    from kupd.testing import kupsim

    with kupsim("rot13", check_exit=False, ready_timeout=60.0) as sim2:
        rot13 = str(sim2.device_path("rot13"))
        k = start_kupd(sim, devices=("echo:2", f"{rot13}:2"))
        with k.client() as c:
            assert c.health() == "SERVING"
            os.kill(sim.pid, signal.SIGSTOP)
            try:
                # a stop takes effect as each of kupsim's threads next runs:
                # one may still answer a request sent just before it
                wait_until(lambda: all_stopped(sim.pid), what="kupsim stopped")
                t0 = time.monotonic()
                assert c.health() == "NOT_SERVING"
                assert c.health(f"kup.v1.Kup/{rot13}") == "SERVING"
                assert c.health("kup.v1.Kup/echo") == "NOT_SERVING"
                devs = {d.name: d for d in c.devices()}
                took = time.monotonic() - t0
                assert took < 15.0, f"health and ListDevices took {took:.1f} s"
                # known stalled: later checks do not wait for echo again, and a
                # check of rot13 alone does not wait for echo at all (a probe
                # with grpc_health_probe's 1 s deadline)
                for service in ("", f"kup.v1.Kup/{rot13}"):
                    t1 = time.monotonic()
                    c.health(service)
                    assert time.monotonic() - t1 < 1.5, (service, time.monotonic() - t1)
                assert "has not answered for" in devs["echo"].error, devs["echo"]
                assert devs[rot13].error == "" and devs[rot13].reachable
                assert c.call(rot13, b"abc", timeout=10).data == b"nop"
            finally:
                os.kill(sim.pid, signal.SIGCONT)
            wait_until(lambda: c.health() == "SERVING", timeout=60, what="echo answering again")
            assert c.devices("echo")[0].error == ""
            assert c.call("echo", b"back", timeout=10).data.lower() == b"back"
        log = k.log()
        assert "device not answering" in log and "device answering again" in log, log[-3000:]


def test_a_call_pool_as_large_as_the_device_is_warned_about(start_kupd: StartKupd) -> None:
    """call_channels at or above the device's channel count is valid, but
    its pool takes every channel it can and leaves sessions none: kupd
    says so when the device appears, naming both numbers."""
    env = {**os.environ, "KUP_PARAM_ECHO_CHANNELS": "8"}
    with echo_sim(env=env) as sim:
        k = start_kupd(sim, devices=("echo:1000",))
        with k.client() as c:
            wait_until(lambda: c.devices("echo")[0].call_channels == 8, what="8 pool channels")
            with pytest.raises(errors.Busy):
                c.open("echo").channel()
        assert k.terminate() == 0
    recs = [json.loads(x) for x in k.log().splitlines() if x.startswith("{")]
    (warned,) = [r for r in recs if r["event"].startswith("call_channels is not below")]
    assert (warned["call_channels"], warned["channels"], warned["level"]) == (1000, 8, "warning")


def test_an_unreachable_device_is_logged_with_where_kupd_looked(
    tmp_path: Path, start_kupd: StartKupd
) -> None:
    """A kupsim_dir with a typo (or a module not loaded) showed only as
    'EKU_NOENT: no such device or channel': the log line now names the
    paths libkup tried, so the operator sees the wrong one."""
    missing = tmp_path / "no-such-sim"
    k = start_kupd(None, "--kupsim-dir", str(missing), wait=False)  # never SERVING
    wait_until(lambda: '"device not reachable"' in k.log(), what="the unreachable device logged")
    (line,) = [
        json.loads(x) for x in k.log().splitlines() if '"device not reachable"' in x
    ]
    assert line["device"] == "echo", line
    assert line["looked_for"] == f"/dev/kup/echo, then {missing}/echo.sock (kupsim)", line
