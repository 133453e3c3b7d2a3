"""A reload applies every key a running kupd can change (kupd.config's
RELOADED_KEYS), each shown here by its effect on a real kupd after SIGHUP or
Admin.Reload; a bad value is refused naming the key and the old value stays
in effect; the reply names what was applied and what waits for a restart."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import stat
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest
from tenancy_helpers import DEVICES, LOCKHOLD, TENANTS, StartTenants, TenantKupd

from kupclient import Client, Kind
from kupd import errors
from kupd.config import RELOADED_KEYS, RESTART_KEYS, Config, parse_config, reloaded
from kupd.testing import (
    echo_lock_holds,
    in_background,
    kupd_env,
    kupsim,
    start_kupd,
    wait_until,
)

#: echo with a single Call pool channel: one held Call fills the pool.
ONE_POOL_CHANNEL = """
[[device]]
name = "echo"
call_channels = 1
"""


def log_records(k: TenantKupd, event: str) -> list[dict[str, Any]]:
    """kupd's JSON log lines whose event is ``event``."""
    out = []
    for line in k.log().splitlines():
        if f'"{event}"' not in line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == event:
            out.append(rec)
    return out


def hup_and_wait(k: TenantKupd) -> dict[str, Any]:
    """SIGHUP, then the "config reloaded" log line it produced."""
    before = len(log_records(k, "config reloaded"))
    k.hup()
    wait_until(lambda: len(log_records(k, "config reloaded")) > before, what="SIGHUP reload logged")
    return log_records(k, "config reloaded")[-1]


def test_every_key_is_either_live_or_restart_only() -> None:
    keys = {f.name for f in dataclasses.fields(Config)} - {"extra"}
    assert not set(RELOADED_KEYS) & set(RESTART_KEYS)
    assert set(RELOADED_KEYS) | set(RESTART_KEYS) == keys
    assert all(why for why in RESTART_KEYS.values())


def test_the_running_config_keeps_restart_only_values() -> None:
    """kupd.config.reloaded: the config kupd runs with after a reload has the
    file's live values and the running restart-only ones."""
    running = parse_config({"socket": "/run/a.sock", "device": [{"name": "echo"}]})
    new = parse_config(
        {
            "socket": "/run/b.sock",
            "call_timeout": 2.5,
            "metrics_port": 9999,
            "device": [{"name": "echo"}, {"name": "rot13"}],
        }
    )
    cfg, applied, needs_restart = reloaded(running, new)
    assert (applied, needs_restart) == (["call_timeout"], ["socket", "devices", "metrics_port"])
    assert (cfg.call_timeout, cfg.socket, cfg.metrics_port) == (2.5, "/run/a.sock", 0)
    assert [d.name for d in cfg.devices] == ["echo"]


def test_socket_mode_is_not_applied_where_no_plain_socket_is_served() -> None:
    """With [[tenant]] tables each tenant's mode applies; the top-level
    socket_mode changes nothing, and a reload does not say it applied it."""
    tenant = {"name": "a", "socket": "/run/kupd/a.sock"}
    base = {"device": [{"name": "echo"}], "tenant": [tenant]}
    running = parse_config(base)
    new = parse_config({**base, "socket_mode": "0640"})
    assert reloaded(running, new)[1:] == ([], [])
    plain = {"device": [{"name": "echo"}]}
    _, applied, _ = reloaded(parse_config(plain), parse_config({**plain, "socket_mode": "0640"}))
    assert applied == ["socket_mode"]


def test_call_timeout(start_tenants: StartTenants) -> None:
    """A Call with no deadline of its own gets the reloaded call_timeout
    (the DEADLINE_EXCEEDED message names it); a refused reload -- even one
    with a good call_timeout next to the bad key -- leaves the old one."""
    head = "call_timeout = 30\ncall_quarantine = 1\n"
    k = start_tenants(head + DEVICES)
    with k.client("kupd") as c, k.admin() as adm:
        k.write_config(head.replace("30", "0.5") + DEVICES)
        r = adm.reload()
        assert (r.applied, r.needs_restart) == (("call_timeout",), ()), r
        with pytest.raises(errors.DeadlineExceeded, match=r"within 0\.500s"):
            c.call("echo", b"!hold")
        # a good call_timeout and a bad max_queued_calls: nothing applied
        k.write_config(head.replace("30", "0.25") + "max_queued_calls = 0\n" + DEVICES)
        with pytest.raises(errors.InvalidArgument, match="max_queued_calls"):
            adm.reload()
        with pytest.raises(errors.DeadlineExceeded, match=r"within 0\.500s"):
            c.call("echo", b"!hold")
        # SIGHUP applies it too
        k.write_config(head.replace("30", "0.25") + DEVICES)
        rec = hup_and_wait(k)
        assert rec["applied"] == ["call_timeout"], rec
        with pytest.raises(errors.DeadlineExceeded, match=r"within 0\.250s"):
            c.call("echo", b"!hold")
        assert c.call("echo", b"fine", timeout=30).data.lower() == b"fine"


def test_max_sessions_and_lease_idle_timeout(start_tenants: StartTenants) -> None:
    """A lowered max_sessions refuses the next session (open ones stay); a
    new lease_idle_timeout is what the next Attach announces and gets, while
    a lease taken before keeps the timeout its Attach announced."""
    head = "lease_idle_timeout = 60\nmax_sessions = 100\n"
    k = start_tenants(head + DEVICES)
    with k.client("kupd") as c, k.admin() as adm:
        old = c.attach("echo")
        assert old.idle_timeout_ms == 60000
        k.write_config(head.replace("100", "1") + DEVICES)
        assert adm.reload().applied == ("max_sessions",)
        with pytest.raises(errors.ResourceExhausted, match="limit max_sessions=1"):
            c.open("echo").channel()
        k.write_config(head.replace("100", "0") + DEVICES)
        with pytest.raises(errors.InvalidArgument, match="max_sessions"):
            adm.reload()
        with pytest.raises(errors.ResourceExhausted, match="limit max_sessions=1"):
            c.open("echo").channel()  # the old limit still applies
        k.write_config(head.replace("60", "0.5") + DEVICES)
        rec = hup_and_wait(k)
        assert rec["applied"] == ["lease_idle_timeout", "max_sessions"], rec
        new = c.attach("echo")
        assert new.idle_timeout_ms == 500
        wait_until(
            lambda: new.lease_id not in [x.lease_id for x in adm.list_leases()],
            what="the new lease expired after 0.5 s idle",
        )
        with pytest.raises(errors.NotFound):
            c.lease_send(new.lease_id, b"late")
        # the older lease, idle as long, is still held: it keeps its 60 s
        assert old.lease_id in [x.lease_id for x in adm.list_leases()]
        c.lease_receive(old.lease_id, timeout=10)  # the kernel's opening hand-over
        reply = c.lease_exchange(old.lease_id, b"still mine", timeout=10)
        assert reply.data.lower() == b"still mine"
        c.release(old.lease_id)


def test_log_level(start_tenants: StartTenants) -> None:
    """kupd logs each health check at debug: only while log_level is debug."""
    k = start_tenants(DEVICES)
    with k.client("kupd") as c, k.admin() as adm:

        def checks_logged() -> int:
            assert c.health() == "SERVING"
            return len(log_records(k, "health check"))

        assert checks_logged() == 0
        k.write_config('log_level = "loud"\n' + DEVICES)
        with pytest.raises(errors.InvalidArgument, match="log_level"):
            adm.reload()
        assert checks_logged() == 0
        k.write_config('log_level = "debug"\n' + DEVICES)
        assert hup_and_wait(k)["applied"] == ["log_level"]
        n = checks_logged()
        assert n >= 1
        assert checks_logged() > n  # each one logged before its reply
        k.write_config('log_level = "warning"\n' + DEVICES)
        assert adm.reload().applied == ("log_level",)
        n = checks_logged()
        assert checks_logged() == n
        # and the info line of the next reload is not written either
        reloaded = len(log_records(k, "config reloaded"))
        adm.reload()
        assert len(log_records(k, "config reloaded")) == reloaded


def test_audit_log(start_tenants: StartTenants) -> None:
    """After a reload naming a new audit_log the next denial lands in the
    new file; a path that cannot be opened is refused naming audit_log and
    the file in use stays."""
    k = start_tenants(DEVICES + TENANTS)
    first = k.audit

    def denied() -> list[dict[str, Any]]:
        with k.client("bob") as b, pytest.raises(errors.PermissionDenied, match="rule ops"):
            b.open("echo").channel()
        return [x for x in k.audit_lines() if x["event"] == "denied"]

    with k.admin() as adm:
        assert len(denied()) == 1
        k.audit = k.dir / "audit-2.log"
        k.write_config(DEVICES + TENANTS)
        r = adm.reload()
        assert r.applied == ("audit_log",), r
        assert len(denied()) == 1  # the new file's first
        (line,) = [x for x in k.audit_lines() if x["event"] == "admin"]
        assert line["action"] == "reload" and line["applied"] == ["audit_log"], line
        k.audit = k.dir / "no-such-dir" / "audit.log"
        k.write_config(DEVICES + TENANTS)
        with pytest.raises(errors.InvalidArgument, match=r"audit_log.*no-such-dir"):
            adm.reload()
        k.audit = k.dir / "audit-2.log"
        assert len(denied()) == 2  # still the file in use
        # logrotate: the file renamed, a reload re-opens the path afresh
        os.rename(k.audit, k.dir / "audit-2.log.1")
        k.write_config(DEVICES + TENANTS)
        assert adm.reload().applied == ()
        assert len(denied()) == 1
    k.audit = first
    assert len([x for x in k.audit_lines() if x["event"] == "denied"]) == 1
    assert os.stat(k.dir / "audit-2.log").st_mode & 0o777 == 0o600


def test_call_pool_limits(start_tenants: StartTenants) -> None:
    """call_quarantine: a held Call's pool channel is replaced after the
    reloaded 1 s instead of 600 s (the next Call gets the fresh channel);
    max_queued_calls: with the pool busy and one Call queued, the next is
    refused naming the reloaded limit."""
    head = "call_timeout = 0.5\ncall_quarantine = 600\n"
    k = start_tenants(head + ONE_POOL_CHANNEL)
    with k.client("kupd") as c, k.admin() as adm:
        k.write_config(head.replace("600", "1") + ONE_POOL_CHANNEL)
        assert adm.reload().applied == ("call_quarantine",)
        with pytest.raises(errors.DeadlineExceeded):
            c.call("echo", b"!hold")
        # with 600 s this would fail: the only pool channel stays quarantined
        assert c.call("echo", b"after", timeout=30).data.lower() == b"after"
        replaced = log_records(k, "pool channel replaced: its reply did not come")
        assert [x["waited_s"] for x in replaced] == [1.0], replaced

        k.write_config(head + "max_queued_calls = 0\n" + ONE_POOL_CHANNEL)
        with pytest.raises(errors.InvalidArgument, match="max_queued_calls"):
            adm.reload()
        k.write_config(head.replace("600", "1") + "max_queued_calls = 1\n" + ONE_POOL_CHANNEL)
        assert hup_and_wait(k)["applied"] == ["max_queued_calls"]
        results: dict[bytes, BaseException | bytes] = {}

        def call(cl: Client, data: bytes) -> None:
            try:
                results[data] = cl.call("echo", data, timeout=60).data
            except errors.KupError as exc:
                results[data] = exc

        # the held Call is its own client's, so that the test ends it (closing
        # that client: its caller gone) once the checks below are done, not
        # after a deadline long enough for them on a loaded machine
        holder = k.client("kupd")
        try:
            hold = threading.Thread(target=call, args=(holder, b"!hold"))
            hold.start()
            wait_until(lambda: c.open("echo").info().calls_in_flight == 1, what="the pool busy")
            queued = threading.Thread(target=call, args=(c, b"queued"))
            queued.start()
            wait_until(lambda: c.open("echo").info().calls_queued == 1, what="one Call queued")
            with pytest.raises(errors.ResourceExhausted, match="limit max_queued_calls=1"):
                c.call("echo", b"one too many", timeout=30)
        finally:
            holder.close()
        hold.join(60)
        queued.join(60)
        assert not hold.is_alive() and not queued.is_alive()
        # the held Call was given up on; its channel, still owing the reply,
        # was replaced after the reloaded 1 s and served the queued one
        assert isinstance(results[b"!hold"], errors.InvalidArgument), results
        assert "closed while the operation waited" in str(results[b"!hold"]), results
        got = results[b"queued"]
        assert isinstance(got, bytes) and got.lower() == b"queued", results
        replaced = log_records(k, "pool channel replaced: its reply did not come")
        assert [x["waited_s"] for x in replaced] == [1.0, 1.0], replaced


def test_reattach_grace(start_tenants: StartTenants) -> None:
    """An attach of a channel whose user left while its module keeps it
    locked gives up after the reloaded reattach_grace, not the 600 s kupd
    started with: Releasing, saying how long kupd waited."""
    k = start_tenants("reattach_grace = 600\n" + DEVICES)
    chan = 10  # not one of echo's 4 Call pool channels
    with k.client("kupd") as c, k.admin() as adm:
        k.write_config("reattach_grace = 0.5\n" + DEVICES)
        assert adm.reload().applied == ("reattach_grace",)
        with c.open("echo").channel(chan) as ch:
            assert ch.receive(timeout=10).kind is Kind.PASS
            ch.send(LOCKHOLD)
            wait_until(lambda: echo_lock_holds(k.sim, chan) > 0, what="echo holding it locked")
        attach = in_background(lambda: c.attach("echo", chan))
        try:
            got = attach.outcome(60)  # a bound far below 600 s
            assert isinstance(got, errors.Releasing), got
            m = re.search(r"channel 10 is still held by the module .*waited ([0-9.]+) s", str(got))
            assert m is not None and float(m.group(1)) >= 0.5, got
        finally:
            assert c.call("echo", b"!lockfree", timeout=30).data.lower() == b"!lockfree"


def test_drain_grace(start_tenants: StartTenants) -> None:
    """At SIGTERM kupd waits the reloaded drain_grace for a Call in flight
    (held 60 s by the module), not the 600 s it started with."""
    k = start_tenants("drain_grace = 600\n" + DEVICES)
    with k.client("kupd") as c, k.admin() as adm:
        k.write_config("drain_grace = 0.5\n" + DEVICES)
        assert adm.reload().applied == ("drain_grace",)
        failed: list[BaseException] = []

        def held() -> None:
            try:
                c.call("echo", b"!hold", timeout=60)
            except errors.KupError as exc:
                failed.append(exc)

        t = threading.Thread(target=held)
        t.start()
        wait_until(lambda: c.open("echo").info().calls_in_flight == 1, what="a Call in flight")
        k.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: bool(log_records(k, "kupd draining")), what="kupd draining")
        # a reload now would bind sockets only to answer EKU_SHUTDOWN: refused
        with pytest.raises(errors.Shutdown, match="shutting down: reload refused"):
            adm.reload()
        t.join(60)
        # kupd's own answer, not gRPC's "Cancelling all calls"
        assert not t.is_alive() and len(failed) == 1, failed
        assert isinstance(failed[0], errors.Shutdown), failed
        assert "did not finish within drain_grace (0.5 s)" in str(failed[0]), failed
        k.stop()
    (draining,) = log_records(k, "kupd draining")
    assert draining["grace"] == 0.5, draining
    assert log_records(k, "calls still in flight after the grace period"), k.log()


def test_socket_mode_and_health_interval(start_tenants: StartTenants) -> None:
    """socket_mode is applied to the served socket in place; health_interval
    is reported applied (the device monitor reads it each round)."""
    k = start_tenants(DEVICES)
    assert stat.S_IMODE(os.stat(k.socket).st_mode) == 0o660
    k.health_interval = 0.3
    k.write_config('socket_mode = "0600"\n' + DEVICES)
    with k.admin() as adm:
        r = adm.reload()
    assert r.applied == ("socket_mode", "health_interval"), r
    assert stat.S_IMODE(os.stat(k.socket).st_mode) == 0o600
    with k.client("kupd") as c:  # the same server, still serving
        assert c.call("echo", b"x", timeout=30).data.lower() == b"x"


def test_restart_only_keys_are_named_and_not_applied(start_tenants: StartTenants) -> None:
    """A changed socket and metrics_port are named in needs_restart (reply,
    log and audit line) next to the applied call_timeout; kupd keeps its
    socket; a tenant granted a device the running kupd does not serve is
    refused, the message saying the devices change only at a restart."""
    k = start_tenants(DEVICES)
    old_socket = k.socket
    k.socket = k.dir / "moved.sock"
    k.write_config("metrics_port = 9999\ncall_timeout = 3\n" + DEVICES)
    with k.admin() as adm:
        r = adm.reload()
        assert r.needs_restart == ("socket", "metrics_port"), r
        assert r.applied == ("call_timeout",), r
        assert os.path.exists(old_socket) and not os.path.exists(k.socket)
        with k.client("kupd") as c:
            assert c.call("echo", b"x", timeout=30).data.lower() == b"x"
        rec = log_records(k, "config reloaded")[-1]
        assert (rec["applied"], rec["needs_restart"]) == (
            ["call_timeout"],
            ["socket", "metrics_port"],
        )
        k.socket = old_socket
        extra = '\n[[device]]\nname = "spare"\n'
        grant = (
            '[[tenant]]\nname = "eve"\nsocket = "@DIR@/eve.sock"\n'
            '[[tenant.grant]]\ndevice = "spare"\n'
        )
        k.write_config(DEVICES + extra + grant)
        refused = r"tenant\[name=eve\]\.grant.*only at a restart"
        with pytest.raises(errors.InvalidArgument, match=refused):
            adm.reload()
    reloads = [x for x in k.audit_lines() if x["event"] == "admin" and x["action"] == "reload"]
    assert reloads[0]["needs_restart"] == ["socket", "metrics_port"], reloads
    assert reloads[1]["ok"] is False and "spare" in reloads[1]["error"], reloads


def test_health_interval_applies_at_once(tmp_path: Path) -> None:
    """A device that appears while the monitor waits out a long
    health_interval is found right after a reload shortens it: the wait under
    way ends (it used to run out on the old interval, here an hour).  Seen in
    kupd's log, not through the health check, which probes by itself."""
    rundir = tmp_path / "later"
    rundir.mkdir()
    sock = tmp_path / "kupd.sock"
    conf = tmp_path / "kupd.toml"

    def write(interval: float) -> None:
        conf.write_text(
            f'socket = "{sock}"\nkupsim_dir = "{rundir}"\nhealth_interval = {interval}\n'
            '[[device]]\nname = "echo"\n'
        )

    write(3600)
    log = tmp_path / "kupd.log"
    k = start_kupd(
        config=conf, log=log, env=kupd_env(None), health_interval=None, wait=False
    )
    try:
        wait_until(lambda: "device not reachable" in k.log(), what="kupd started, echo absent")
        with kupsim("echo", rundir=rundir):
            write(0.2)
            os.kill(k.pid, signal.SIGHUP)
            wait_until(
                lambda: '"device appeared"' in k.log(),
                timeout=30,
                what="echo found after the reload shortened health_interval",
            )
            (rec,) = [
                json.loads(line)
                for line in k.log().splitlines()
                if '"config reloaded"' in line
            ]
            assert rec["applied"] == ["health_interval"], rec
    finally:
        k.stop()


def test_a_socket_that_cannot_be_served_refuses_the_whole_reload(
    start_tenants: StartTenants,
) -> None:
    """A reload adding a tenant whose socket directory anyone could write (so
    anyone could replace the socket) is refused as a whole: no socket of it
    is left, the call_timeout changed next to it is not applied (the next,
    good reload still finds it changed), and the running tenants still serve."""
    head = "call_timeout = 30\n"
    k = start_tenants(head + DEVICES + TENANTS)
    unsafe = Path(tempfile.mkdtemp(prefix="kupd-unsafe-"))
    try:
        unsafe.chmod(0o777)
        dave = (
            f'[[tenant]]\nname = "dave"\nsocket = "{unsafe}/dave.sock"\n'
            '[[tenant.grant]]\ndevice = "echo"\n'
        )
        with k.admin() as adm:
            k.write_config(head.replace("30", "0.5") + DEVICES + TENANTS + dave)
            # refused like a bad value: InvalidArgument (kupctl exit 8), not INTERNAL
            refused_re = (
                r"reload refused: config key 'tenant\[name=dave\]\.socket': "
                r".*writable by nobody else"
            )
            with pytest.raises(errors.InvalidArgument, match=refused_re):
                adm.reload()
            assert not (unsafe / "dave.sock").exists()
            with k.client("bob") as c:
                assert c.call("echo", b"still", timeout=30).data.lower() == b"still"
            (refused,) = [x for x in k.audit_lines() if x.get("action") == "reload"]
            assert refused["ok"] is False, refused
            k.write_config(head.replace("30", "0.5") + DEVICES + TENANTS)
            r = adm.reload()
            assert r.applied == ("call_timeout",), r
            assert "dave" not in r.tenants
    finally:
        shutil.rmtree(unsafe, ignore_errors=True)


def test_a_reload_of_grpcs_server_options_rebuilds_every_sockets_server(
    start_tenants: StartTenants,
) -> None:
    """keepalive_* and the bounds gRPC takes from max_sessions and
    max_queued_calls (max_concurrent_streams, the RPCs waiting for kupd)
    are options every socket's server is built with: a reload that changes
    them gives every socket a new server -- the plain one and the admin one
    this very Reload came in on -- and needs no restart (it used to keep
    the bound as started, and say so in needs_restart).  A client connected
    before goes on being answered; a reload that changes none of them
    rebuilds nothing."""
    k = start_tenants("max_queued_calls = 100\n" + DEVICES)
    event = "socket server rebuilt"
    with k.client("kupd") as c, k.admin() as adm:
        assert [d.name for d in c.devices()] == ["echo", "rot13"]
        for n, (body, key) in enumerate(
            [("max_queued_calls = 5000\n", "max_queued_calls"), ("keepalive_time = 5\n", "")]
        ):
            k.write_config(body + DEVICES)
            r = adm.reload()
            applied = (key,) if key else ("max_queued_calls", "keepalive_time")
            assert (r.applied, r.needs_restart) == (applied, ()), r
            recs = log_records(k, event)
            assert len(recs) == 2 * (n + 1), recs
            new = recs[2 * n:]
            assert {x["socket"] for x in new} == {str(k.socket), k.admin_socket}, new
            assert all(x["options_changed"] for x in new), new
            assert [d.name for d in c.devices()] == ["echo", "rot13"]
        k.write_config("keepalive_time = 5\ncall_timeout = 20\n" + DEVICES)
        assert adm.reload().applied == ("call_timeout",)
        assert len(log_records(k, event)) == 4
    with k.client("kupd") as c2:
        assert [d.name for d in c2.devices()] == ["echo", "rot13"]
