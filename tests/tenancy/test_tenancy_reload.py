"""Reload (SIGHUP and Admin.Reload): the policy is swapped atomically,
sessions the new policy forbids end with PERMISSION_DENIED, others are
untouched, sockets are added and removed, and an invalid file is refused
with the error while the running policy stays."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
from collections.abc import Iterator

import pytest
from tenancy_helpers import DEVICES, LOCKHOLD, TENANTS, StartTenants, TenantKupd, run_module

from kupclient import Client
from kupd import errors
from kupd.testing import echo_lock_holds, wait_until

NEW_TENANTS = """
[[tenant]]
name = "alice"
socket = "@DIR@/alice.sock"
max_sessions = 2
max_message_bytes = 64
ops = ["session", "lease", "call"]
[[tenant.grant]]
device = "echo"
channels = "8"

[[tenant]]
name = "dave"
socket = "@DIR@/dave.sock"
max_sessions = 4
max_message_bytes = 4096
[[tenant.grant]]
device = "echo"
"""


def test_sighup_reload(start_tenants: StartTenants) -> None:
    k = start_tenants(DEVICES + TENANTS)
    with k.client("alice") as a, k.client("carol") as c:
        keep = a.open("echo").channel(8)
        drop = a.open("echo").channel(9)
        gone = c.open("rot13").channel()
        for ch in (keep, drop, gone):
            ch.receive()
        w = a.watch("echo", initial_state=True)
        assert next(w).initial
        k.write_config(DEVICES + NEW_TENANTS)
        k.hup()
        wait_until(lambda: os.path.exists(k.sock("dave")), what="dave's socket")
        wait_until(lambda: not os.path.exists(k.sock("carol")), what="carol's socket removed")
        # alice's session on channel 9 is no longer allowed ...
        with pytest.raises(errors.PermissionDenied, match="rule channels"):
            drop.send(b"x")
            drop.receive(timeout=10)
        # ... carol is gone altogether ...
        with pytest.raises(errors.PermissionDenied, match="rule tenant"):
            gone.send(b"x")
            gone.receive(timeout=10)
        # ... and the session the new policy allows was not touched.
        keep.send(b"still here")
        assert keep.receive(timeout=10).data == b"still here"
        with pytest.raises(errors.PermissionDenied, match="rule channels"):
            a.open("echo").channel(9)
        # alice may no longer watch: her open Watch ended at the reload
        with pytest.raises(errors.PermissionDenied, match="rule ops"):
            for _ in w:
                pass
        for ch in (keep, drop, gone):
            ch.close()
    with k.client("dave") as d:
        assert d.call("echo", b"new tenant").data.lower() == b"new tenant"
    lines = k.audit_lines()
    denied = [x for x in lines if x["event"] == "denied"]
    assert any(x["tenant"] == "alice" and x["rule"] == "channels" for x in denied), lines
    assert any(x["tenant"] == "carol" and x["rule"] == "tenant" for x in denied), lines
    reloads = [x for x in lines if x["event"] == "admin" and x["action"] == "reload"]
    assert len(reloads) == 1 and reloads[0]["via"] == "SIGHUP" and reloads[0]["ok"], lines
    assert reloads[0]["tenants"] == ["alice", "dave"], lines
    assert len(reloads[0]["sessions_ended"]) == 2, lines


def test_invalid_reload_keeps_the_running_policy(start_tenants: StartTenants) -> None:
    k = start_tenants(DEVICES + TENANTS)
    with k.client("alice") as a, k.admin() as adm:
        ch = a.open("echo").channel(9)
        ch.receive()
        k.write_config(DEVICES + TENANTS.replace('mode = "0600"', 'mode = "0666"'))
        # the tenant by name, not by its place in the file (tenant[0]),
        # and the file (the one kupd re-read: not always the one edited)
        with pytest.raises(errors.InvalidArgument, match=r"'tenant\[name=alice\]\.mode'") as ei:
            adm.reload()
        where = rf"reload refused: {re.escape(str(k.config))}:(\d+): config key "
        said = re.search(where, str(ei.value))
        assert said is not None, ei.value
        line = k.config.read_text().splitlines()[int(said.group(1)) - 1]
        assert line.startswith('mode = "0666"'), (said.group(1), line)
        k.hup()  # the same refusal through SIGHUP: logged, nothing changes
        wait_until(lambda: "reload refused" in k.log(), what="SIGHUP refusal logged")
        refused = [x for x in k.audit_lines() if x.get("action") == "reload"]
        assert [x["via"] for x in refused] == ["admin", "SIGHUP"], refused
        assert all("'tenant[name=alice].mode'" in x["error"] for x in refused), refused
        ch.send(b"unchanged")
        assert ch.receive(timeout=10).data == b"UNCHANGED"  # odd channel: upper-cased
        with pytest.raises(errors.PermissionDenied, match="rule channels"):
            a.open("echo").channel(0)
        ch.close()
        # A valid file again: Admin.Reload reports what it did.
        k.write_config(DEVICES + NEW_TENANTS)
        with a.open("echo").channel(10) as doomed:
            doomed.receive()
            result = adm.reload()
            assert result.tenants == ("alice", "dave")
            assert result.sessions_ended == (doomed.lease.lease_id,)


def test_admin_command_line(start_tenants: StartTenants) -> None:
    k = start_tenants(DEVICES + TENANTS)

    def admin(*args: str) -> subprocess.CompletedProcess[str]:
        return run_module("kupclient.admin", "--socket", k.admin_socket, *args)

    with k.client("alice") as a, a.open("echo").channel(9) as ch:
        out = admin("leases", "--json")
        assert out.returncode == 0, out
        (row,) = json.loads(out.stdout)
        assert (row["lease_id"], row["tenant"], row["channel"]) == (ch.lease.lease_id, "alice", 9)
        k.write_config(
            DEVICES + TENANTS.replace("calls_per_second = 0.01", "calls_per_second = -1")
        )
        bad = admin("reload")
        assert bad.returncode == 1 and "tenant[name=carol].calls_per_second" in bad.stderr, bad
        zero = admin("reload", "--timeout", "0")  # refused before anything is asked
        assert zero.returncode == 2 and "--timeout: must be > 0 seconds, not '0'" in zero.stderr
        k.write_config(DEVICES + NEW_TENANTS)
        good = admin("reload", "--timeout", "20")
        assert good.returncode == 0, good
        assert "tenants alice, dave; 1 session ended" in good.stdout, good.stdout


def test_kupctl_reload_and_leases(start_tenants: StartTenants) -> None:
    k = start_tenants(DEVICES + TENANTS)

    def kupctl(*args: str) -> subprocess.CompletedProcess[str]:
        return run_module("kupclient.kupctl", *args, "--admin-socket", k.admin_socket)

    with k.client("alice") as a, a.open("echo").channel(11) as ch:
        out = kupctl("leases", "--json")
        assert out.returncode == 0, out
        assert [r["lease_id"] for r in json.loads(out.stdout)] == [ch.lease.lease_id]
        k.write_config(DEVICES + TENANTS.replace('channels = "8-15"', 'channels = "15-8"'))
        bad = kupctl("reload")
        assert bad.returncode == 8, bad  # InvalidArgument
        assert "'tenant[name=alice].grant[0].channels'" in bad.stderr, bad.stderr
        k.write_config(DEVICES + NEW_TENANTS)
        good = kupctl("reload", "--json")
        assert good.returncode == 0, good
        # kupd's log with it: this once failed with no session ended (seen
        # once, on a loaded machine, not reproduced): the log says whether
        # the session had ended before the reload, and why
        got = json.loads(good.stdout)
        whys = [w.pop("why") for w in got["warnings"]]
        # alice and dave, with no max_calls_in_flight, can each tie up past
        # 1 GiB in RPCs whose requests never arrive whole (held_bound)
        assert all("requests that never arrive whole" in w for w in whys[:2]), whys
        assert all("set it below call_channels" in w for w in whys[2:]), whys
        assert got == {
            "tenants": ["alice", "dave"],
            "sessions_ended": [ch.lease.lease_id],
            "rpcs_ended": {},
            "calls_refused": 0,
            "applied": ["tenants"],
            "needs_restart": [],
            "audit_log_error": "",
            # alice and dave may both Call echo, each able to hold its
            # whole pool: kupd's advisory, once per tenant
            "warnings": [
                *({"key": f"tenant[name={t}].max_calls_in_flight"} for t in ("alice", "dave")),
                *({"key": f"tenant[name={t}].max_pool_channels"} for t in ("alice", "dave")),
            ],
            "sockets_added": [k.sock("dave")],
            "sockets_removed": [k.sock("bob"), k.sock("carol")],
        }, (good.stdout, k.log()[-6000:])


def test_kupctl_drain_says_when_nothing_changed(start_tenants: StartTenants) -> None:
    """`kupctl drain` of a device drained already (or `--undo` of one that
    is not) says nothing changed, where it said "drained (0 leases ended)"
    as if it had just drained it; --json and AdminClient.drain_device say
    `changed`."""
    k = start_tenants(DEVICES + TENANTS)

    def kupctl(*args: str) -> str:
        out = run_module("kupclient.kupctl", *args, "--admin-socket", k.admin_socket)
        assert out.returncode == 0, out
        return out.stdout

    assert kupctl("drain", "rot13") == "rot13: drained (0 leases ended)\n"
    assert kupctl("drain", "rot13") == (
        "rot13: is drained already (its leases ended then); nothing changed\n"
    )
    assert json.loads(kupctl("drain", "rot13", "--json")) == {
        "device": "rot13", "undo": False, "leases_ended": [], "changed": False,
    }  # fmt: skip
    assert kupctl("drain", "rot13", "--undo") == "rot13: undrained\n"
    assert kupctl("drain", "rot13", "--undo") == "rot13: was not drained; nothing changed\n"
    with k.admin() as adm:
        assert adm.drain_device("rot13").changed
        assert not adm.drain_device("rot13").changed
        assert adm.drain_device("rot13", undo=True).changed


def test_reload_names_the_keys_only_a_restart_applies(start_tenants: StartTenants) -> None:
    """A reload applies the tenants and the Call timeout and says so; the
    changed devices (their Call pools) wait for a restart and are named as
    such; kupd keeps serving."""
    k = start_tenants(DEVICES + TENANTS)

    def kupctl(*args: str) -> subprocess.CompletedProcess[str]:
        return run_module("kupclient.kupctl", *args, "--admin-socket", k.admin_socket)

    k.write_config(
        "call_timeout = 7.5\n"
        + DEVICES.replace("call_channels = 4", "call_channels = 2")
        + NEW_TENANTS
    )
    out = kupctl("reload")
    assert out.returncode == 0, out
    assert "tenants alice, dave" in out.stdout, out.stdout
    assert "applied: call_timeout, tenants" in out.stdout, out.stdout
    assert "changed but applied only at restart: devices" in out.stdout, out.stdout
    out = kupctl("reload", "--json")  # the same file again: nothing left to apply
    assert json.loads(out.stdout)["needs_restart"] == ["devices"], out.stdout
    assert json.loads(out.stdout)["applied"] == [], out.stdout
    with k.client("dave") as d:  # the tenants were applied
        assert d.call("echo", b"x").data.lower() == b"x"
    reloads = [x for x in k.audit_lines() if x["event"] == "admin" and x["action"] == "reload"]
    assert [x["needs_restart"] for x in reloads] == [["devices"]] * 2, reloads
    assert [x["applied"] for x in reloads] == [["call_timeout", "tenants"], []], reloads


def test_admin_actions_are_audited(start_tenants: StartTenants) -> None:
    """Every admin action leaves one audit line: revoke (with the lease's
    tenant, device, channel and the reason), drain / undrain, and reload
    through the admin socket, refused as well as done."""
    k = start_tenants(DEVICES + TENANTS)
    with k.client("alice") as a, k.admin() as adm:
        ch = a.open("echo").channel(9)
        ch.receive()
        (lease,) = [x for x in adm.list_leases() if x.channel == 9]
        adm.revoke(lease.lease_id, reason="maintenance")
        ended = adm.drain("rot13")
        adm.drain("rot13", undo=True)
        k.write_config(DEVICES + "[[tenant]]\nname = 1\n")
        with pytest.raises(errors.InvalidArgument, match="reload refused"):
            adm.reload()
        k.write_config(DEVICES + TENANTS)
        adm.reload()
        ch.close()
    admin = [x for x in k.audit_lines() if x["event"] == "admin"]
    assert [x["action"] for x in admin] == ["revoke", "drain", "undrain", "reload", "reload"]
    revoke, drain, undrain, bad, good = admin
    assert revoke["lease"] == lease.lease_id and revoke["tenant"] == "alice", revoke
    assert (revoke["device"], revoke["channel"], revoke["reason"]) == ("echo", 9, "maintenance")
    assert drain == {**drain, "device": "rot13", "leases_ended": ended}, drain
    assert undrain["device"] == "rot13", undrain
    assert bad["via"] == "admin" and bad["ok"] is False and "name" in bad["error"], bad
    assert good["via"] == "admin" and good["ok"] is True, good
    assert all(x["time"].endswith("Z") for x in admin), admin


def test_an_attach_leases_holder_learns_why_it_ended(start_tenants: StartTenants) -> None:
    """The holder of an Attach lease the admin revoked gets PermissionDenied
    with the reason on its next use (it used to be "no lease ..."); one it
    released says so; another tenant using that id learns nothing."""
    k = start_tenants(DEVICES + TENANTS)
    with k.client("alice") as a, k.client("carol") as c, k.admin() as adm:
        lease = a.attach("echo", 10)
        adm.revoke(lease.lease_id, reason="maintenance window")
        for _ in range(2):  # not only the first use
            with pytest.raises(errors.PermissionDenied, match="admin-revoke: maintenance window"):
                a.lease_send(lease.lease_id, b"x")
        with pytest.raises(errors.NotFound, match=r"\(released, expired, or never taken\)"):
            c.lease_send(lease.lease_id, b"x")
        other = a.attach("echo", 11)
        a.release(other.lease_id)
        with pytest.raises(
            errors.NotFound, match=f"lease {other.lease_id} has ended \\(released\\)"
        ):
            a.lease_receive(other.lease_id, timeout=0)
        # and the admin (any tenant's lease) sees the same
        with pytest.raises(errors.NotFound, match="has ended"):
            adm.revoke(other.lease_id)
        with pytest.raises(errors.NotFound, match=r"has ended \(revoked\)"):
            adm.revoke(lease.lease_id)


def test_reload_ends_a_forbidden_watch_at_once(start_tenants: StartTenants) -> None:
    """A Watch the reloaded policy forbids ends PERMISSION_DENIED right after
    the reload, without waiting for a device or lease event (none comes
    here); a Watch still allowed keeps running and sees later events."""
    k = start_tenants(DEVICES + TENANTS)
    with k.client("alice") as a, k.client("carol") as c:
        forbidden = a.watch("echo", initial_state=True)
        assert next(forbidden).initial
        allowed = c.watch("echo", initial_state=True)
        assert next(allowed).initial
        ended: list[BaseException] = []

        def drain() -> None:
            try:
                for _ in forbidden:
                    pass
            except BaseException as exc:  # recorded and checked below
                ended.append(exc)

        t = threading.Thread(target=drain)
        t.start()
        no_watch = 'max_message_bytes = 64\nops = ["session", "lease", "call"]\n'
        assert TENANTS.count("max_message_bytes = 64\n") == 1  # alice's
        k.write_config(DEVICES + TENANTS.replace("max_message_bytes = 64\n", no_watch))
        k.hup()
        t.join(20)
        assert not t.is_alive(), "the forbidden Watch did not end after the reload"
        assert len(ended) == 1 and isinstance(ended[0], errors.PermissionDenied), ended
        assert "rule ops" in str(ended[0]), ended
        # carol may still watch: her stream saw no error and gets the next event
        with c.open("echo").channel(30) as ch:
            ch.receive()
            ev = next(allowed)
            assert ev.channel == 30 and not ev.initial, ev


def test_a_reload_that_moves_a_tenants_socket_ends_its_sessions_saying_where(
    start_tenants: StartTenants,
) -> None:
    """alice's socket moves: her Sessions on the old socket end at once
    with Unavailable naming the new one (not, call_timeout later, with
    gRPC's bare "Cancelling all calls"), released as "socket moved by
    reload" and counted in sessions_ended; her Attach lease stays, usable
    through the new socket."""
    k = start_tenants(DEVICES + TENANTS)
    old = k.sock("alice")
    with k.client("alice") as a:
        session = a.open("echo").channel(8)
        session.receive(timeout=10)
        lease = a.attach("echo", 10)
        assert a.lease_receive(lease.lease_id, timeout=10).kind.name == "PASS"
        events = a.watch("echo", initial_state=True)
        # subscribed: the replay comes only once kupd registered the stream
        assert next(events).initial
        k.write_config(DEVICES + TENANTS.replace("@DIR@/alice.sock", "@DIR@/alice2.sock"))
        with k.admin() as adm:
            r = adm.reload()
        assert r.sessions_ended == (session.lease.lease_id,), r
        new = k.sock("alice2")
        with pytest.raises(errors.Unavailable, match=f"moved its socket from {old} to {new}"):
            session.send(b"x")
            session.receive(timeout=10)
        released = next(e for e in events if e.type.name == "LEASE_RELEASED")
        assert released.reason == "socket moved by reload", released
        assert released.lease_id == session.lease.lease_id, released
        events.cancel()
    with Client(new) as a2:
        a2.lease_send(lease.lease_id, b"y")
        assert a2.lease_receive(lease.lease_id, timeout=10).data == b"y"
        a2.release(lease.lease_id)
    # the log names the tenant of every lease, taken or released
    recs = [json.loads(x) for x in k.log().splitlines() if x.startswith("{")]
    taken = {r["lease"]: r.get("tenant") for r in recs if r.get("event") == "lease taken"}
    assert taken == {session.lease.lease_id: "alice", lease.lease_id: "alice"}, taken
    (ready,) = [r for r in recs if r.get("event") == "kupd ready"]
    assert ready["socket"] is None and ready["tenants"]["alice"] == old, ready


def test_sigusr1_reopens_the_audit_log_and_reads_no_config(start_tenants: StartTenants) -> None:
    """logrotate / newsyslog rename the audit log, then send SIGUSR1: kupd
    writes to a new file at the path, and the renamed one keeps what it
    had.  Nothing else is re-read: a config file mid-edit (here: broken)
    is not looked at."""
    import signal

    k = start_tenants(DEVICES + TENANTS)
    with k.client("alice") as a:
        with pytest.raises(errors.PermissionDenied):
            a.open("echo").channel(20)
        wait_until(lambda: k.audit.exists() and "channels" in k.audit.read_text(), what="line 1")
        rotated = k.audit.with_suffix(".log.1")
        os.rename(k.audit, rotated)
        k.config.write_text("this is not = = toml\n")
        k.proc.send_signal(signal.SIGUSR1)
        wait_until(lambda: "audit log re-opened" in k.log(), what="the re-open")
        with pytest.raises(errors.PermissionDenied):
            a.open("echo").channel(21)
    wait_until(lambda: k.audit.exists() and '"channel": 21' in k.audit.read_text(), what="line 2")
    assert '"channel": 20' in rotated.read_text() and '"channel": 21' not in rotated.read_text()
    assert '"channel": 20' not in k.audit.read_text()
    assert "reload" not in k.log()


def _unattached_sessions(k: TenantKupd) -> float:
    """kupd_sessions_unattached, over the admin socket."""
    with k.admin() as adm:
        text = adm.metrics("kupd_sessions_unattached")
    return sum(float(x.split()[-1]) for x in text.splitlines() if x and x[0] != "#")


def test_a_session_that_attaches_on_a_moved_socket_is_told_where(
    start_tenants: StartTenants,
) -> None:
    """A Session stream open on alice's socket, not attached yet, when a
    reload moves that socket: its attach, after the reload, is refused
    with Unavailable naming the new socket (it would be cut with the old
    socket's server), not served on a socket on its way out."""
    import threading

    import grpc

    from kupapi import kup_pb2, kup_pb2_grpc

    k = start_tenants(DEVICES + TENANTS)
    old, new = k.sock("alice"), k.sock("alice2")
    chan = grpc.insecure_channel("unix:" + old)
    go = threading.Event()

    def requests() -> Iterator[kup_pb2.SessionRequest]:
        go.wait()
        yield kup_pb2.SessionRequest(
            request_id=1, attach=kup_pb2.SessionAttach(device="echo", channel=9)
        )

    try:
        stream = kup_pb2_grpc.KupStub(chan).Session(requests(), timeout=30)
        # kupd has the stream (a call gRPC has not handed to kupd yet would
        # be cut by the old server's stop instead), its attach not sent
        wait_until(lambda: _unattached_sessions(k) == 1, what="kupd counting the stream")
        k.write_config(DEVICES + TENANTS.replace("@DIR@/alice.sock", "@DIR@/alice2.sock"))
        with k.admin() as adm:
            assert adm.reload().applied == ("tenants",)
        go.set()
        with pytest.raises(grpc.RpcError) as e:
            next(stream)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value
        assert f"moved its socket from {old} to {new}" in str(e.value.details())
    finally:
        go.set()
        chan.close()
    with Client(new) as a:  # the new socket serves the same channel
        with a.open("echo").channel(9) as ch:
            assert ch.receive(timeout=10).kind.name == "PASS"


def test_a_reload_that_takes_calls_away_refuses_the_queued_ones(
    start_tenants: StartTenants,
) -> None:
    """flood's Calls wait in the pool's queue (it may hold one channel, and
    holds it); a reload takes Calls away from flood: the queued ones end
    with PERMISSION_DENIED naming the rule at once -- not run on the
    module later, by a tenant no longer allowed to -- and the one on a
    channel runs on."""

    import grpc

    from kupapi import kup_pb2, kup_pb2_grpc

    cfg = (
        '[[device]]\nname = "echo"\ncall_channels = 2\n'
        '[[tenant]]\nname = "flood"\nsocket = "@DIR@/flood.sock"\nmax_pool_channels = 1\n'
        '[[tenant.grant]]\ndevice = "echo"\n'
        '[[tenant]]\nname = "meek"\nsocket = "@DIR@/meek.sock"\n'
        '[[tenant.grant]]\ndevice = "echo"\n'
    )
    k = start_tenants(cfg)
    chan = grpc.insecure_channel("unix:" + k.sock("flood"))
    try:
        stub = kup_pb2_grpc.KupStub(chan)
        held = stub.Call.future(
            kup_pb2.CallRequest(device="echo", data=LOCKHOLD, timeout_ms=30000), timeout=60
        )
        wait_until(lambda: echo_lock_holds(k.sim) > 0, what="flood's Call on a channel")
        queued = [
            stub.Call.future(
                kup_pb2.CallRequest(device="echo", data=b"%d" % i, timeout_ms=30000), timeout=60
            )
            for i in range(3)
        ]
        with k.client("meek") as m:
            with Client(k.admin_socket) as whole:  # flood's Calls: not meek's to count
                wait_until(
                    lambda: whole.devices("echo")[0].calls_queued == 3, what="3 Calls queued"
                )
            no_calls = 'max_pool_channels = 1\nops = ["watch"]\n'
            k.write_config(cfg.replace("max_pool_channels = 1\n", no_calls))
            with k.admin() as adm:
                adm.reload()
            for f in queued:
                e = f.exception(timeout=10)
                assert e is not None and e.code() == grpc.StatusCode.PERMISSION_DENIED, e
                assert "rule ops" in e.details() and "no longer allows call" in e.details()
            assert m.call("echo", b"!lockfree", timeout=10).data.lower() == b"!lockfree"
        assert held.result(timeout=30).reply.data.lower() == LOCKHOLD  # odd channels: upper
    finally:
        chan.close()
    denied = [x for x in k.audit_lines() if x.get("rule") == "ops" and x["tenant"] == "flood"]
    assert denied and denied[0]["op"] == "call", k.audit_lines()
