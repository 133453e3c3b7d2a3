"""Identity by socket, per-tenant policy and limits, audit lines, scoped
ListDevices / Watch, and the Admin service -- against a real kupd serving
three tenants over real unix sockets (tenancy_helpers.TENANTS is the policy)."""

from __future__ import annotations

import asyncio
import errno
import importlib.util
import json
import math
import os
import re
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from tenancy_helpers import (
    AS_ROOT,
    DEVICES,
    LOCKHOLD,
    NOBODY,
    TENANTS,
    StartTenants,
    TenantKupd,
    socket_dir,
)

from kupapi import kup_pb2, kup_pb2_grpc
from kupclient import AsyncClient, Client, EventType, Message
from kupd import errors
from kupd.testing import REPO_ROOT, echo_lock_holds, in_background, wait_until

NODE_DIR = REPO_ROOT / "clients" / "node"


def ensure_node_deps() -> None:
    """tests/node's npm install of kup.js's dependencies (shared by path)."""
    path = REPO_ROOT / "tests" / "node" / "test_node_client.py"
    spec = importlib.util.spec_from_file_location("kup_node_client_tests", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    mod.ensure_node_deps()


def _connect_as(uid: int, paths: list[str], gid: int | None = None) -> list[int]:
    """connect(2) to each unix socket as ``uid`` (a forked child that drops
    root): 0 or the errno, per path.  This is the kernel's identity check."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: only syscalls, then _exit
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid if gid is None else gid)
            os.setuid(uid)
            res = []
            for p in paths:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.connect(p)
                    res.append(0)
                except OSError as exc:
                    res.append(exc.errno or -1)
                finally:
                    s.close()
            os.write(w, (",".join(map(str, res)) + "\n").encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        text = f.read()
    os.waitpid(pid, 0)
    return [int(x) for x in text.strip().split(",")]


@pytest.mark.skipif(not AS_ROOT, reason="connecting as other users needs root")
def test_socket_permissions_are_the_identity(tk: TenantKupd) -> None:
    """A process running as uid 65534 reaches alice's socket (owned by it,
    0600) and carol's (0660, group 65534); bob's and the admin socket refuse
    it at connect(2) with EACCES."""
    for name, owner, group, mode in (
        ("alice", NOBODY, 0, 0o600),
        ("bob", 0, 0, 0o600),
        ("carol", 0, NOBODY, 0o660),
    ):
        st = os.stat(tk.sock(name))
        assert stat.S_ISSOCK(st.st_mode)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (mode, owner, group), name
    st = os.stat(tk.admin_socket)
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o600, os.geteuid())
    assert not os.path.exists(tk.dir / "kupd.sock")  # with tenants only their sockets serve
    res = _connect_as(NOBODY, [tk.sock("alice"), tk.sock("bob"), tk.admin_socket, tk.sock("carol")])
    assert res == [0, errno.EACCES, errno.EACCES, 0], res
    # carol's socket is group 65534's: another uid in that group gets in,
    # the same uid in another group does not
    assert _connect_as(4321, [tk.sock("carol"), tk.sock("alice")], gid=NOBODY) == [
        0,
        errno.EACCES,
    ]
    assert _connect_as(4321, [tk.sock("carol")], gid=4321) == [errno.EACCES]
    with tk.client("alice") as c:
        assert c.health() == "SERVING"


def test_admin_service_only_on_the_admin_socket(tk: TenantKupd) -> None:
    ch = grpc.insecure_channel("unix:" + tk.sock("carol"))
    with pytest.raises(grpc.RpcError) as ei:
        kup_pb2_grpc.AdminStub(ch).ListLeases(kup_pb2.ListLeasesRequest(), timeout=30)
    assert ei.value.code() == grpc.StatusCode.UNIMPLEMENTED
    ch.close()


def _audit_has(tk: TenantKupd, **want: object) -> bool:
    return any(all(line.get(k) == v for k, v in want.items()) for line in tk.audit_lines())


def test_channel_range_and_any_free(tk: TenantKupd) -> None:
    with tk.client("alice") as c:
        with c.open("echo").channel() as ch:  # "any free" picks within 8-15
            assert 8 <= ch.id <= 15
            ch.receive()
            ch.send(b"hi")
            assert ch.receive().data in (b"hi", b"HI")
        with pytest.raises(errors.PermissionDenied, match="rule channels"):
            c.open("echo").channel(0)
        with pytest.raises(errors.PermissionDenied, match="rule grant"):
            c.open("rot13").channel()
    wait_until(
        lambda: _audit_has(
            tk, tenant="alice", op="session", device="echo", channel=0, rule="channels"
        ),
        what="audit line for the channel denial",
    )
    assert _audit_has(tk, tenant="alice", device="rot13", rule="grant"), tk.audit_lines()


def test_any_granted_channel_passes_over_one_its_module_holds(tk: TenantKupd) -> None:
    """Channel 8 (alice's first granted) is left while echo still holds it
    locked: alice's next "any" takes 9 at once.  It used to wait up to 10 s
    for 8 on every request, with 9-15 free."""
    with tk.client("alice") as c:
        with c.open("echo").channel(8) as ch:
            ch.receive(timeout=30)
            ch.send(b"!lockhold30000")
            wait_until(
                lambda: "echo: chan 8: holding the channel locked" in tk.sim.stderr(),
                what="echo to hold channel 8",
            )
        with c.open("echo").channel() as ch:
            assert ch.id == 9
            ch.receive(timeout=30)
            assert ch.exchange(b"!lockfree", timeout=30).data.lower() == b"!lockfree"
    assert "attach waits for the module to let go" not in tk.log()
    wait_until(
        lambda: "echo: chan 8: lock hold ended (released)" in tk.sim.stderr(),
        what="echo to let go of channel 8",
    )


def test_a_tenant_learns_nothing_of_devices_or_leases_not_its_own(tk: TenantKupd) -> None:
    """Unknown and ungranted devices look the same to a tenant (PERMISSION_DENIED
    "not granted", no list of what kupd serves), whatever the RPC; a channel
    another tenant holds is Busy without that tenant's lease id."""
    with tk.client("alice") as a, tk.client("carol") as c:
        for name in ("nosuch", "rot13"):  # unknown; served but not alice's
            for op in (
                lambda n=name: a.devices(n),
                lambda n=name: a.call(n, b"x"),
                lambda n=name: next(iter(a.watch(n))),
                lambda n=name: a.attach(n),
            ):
                with pytest.raises(errors.PermissionDenied) as ei:
                    op()
                assert "is not granted" in str(ei.value) and "serves" not in str(ei.value)
        with a.open("echo").channel(9) as ch:
            ch.receive(timeout=30)
            with pytest.raises(errors.Busy) as ei:
                c.attach("echo", 9)
            assert ch.lease.lease_id not in str(ei.value), ei.value
            assert "held by a session" in str(ei.value), ei.value
            with pytest.raises(errors.Busy, match=f"your session {ch.lease.lease_id}"):
                a.attach("echo", 9)  # its own tenant is told which


def test_a_clients_long_strings_never_reach_kupds_log_whole(start_tenants: StartTenants) -> None:
    """A 1 MB lease id or health service name was quoted whole in the error
    and in kupd's "rpc failed" line (~28 MB/s of log from one client).  A
    lease id longer than any is InvalidArgument; error texts are bounded;
    and a tenant's failed requests get log lines up to a budget, the next
    one saying how many were left out."""
    k = start_tenants(DEVICES + TENANTS)  # its own: the log budget is spent here
    huge = "x" * 1_000_000
    # carol: no max_message_bytes (alice's socket refuses a 1 MB request
    # before kupd sees it: test_tenancy_requests)
    with k.client("carol") as a:
        with pytest.raises(errors.InvalidArgument, match="1000000 characters: not a lease id"):
            a.lease_send(huge, b"x")
        with pytest.raises(errors.NotFound) as ei:
            a.health("s" * 1_000_000)
        assert len(str(ei.value)) < 2000, len(str(ei.value))
        for _ in range(300):
            with pytest.raises(errors.NotFound):
                a.lease_send("feedfacefeedface", b"x")
        time.sleep(0.3)
        with pytest.raises(errors.NotFound):
            a.lease_send("feedfacefeedface", b"x")
    log = k.log()
    assert "x" * 2000 not in log and "s" * 2000 not in log
    failed = [json.loads(ln) for ln in log.splitlines() if '"rpc failed"' in ln]  # carol's
    # the budget (100 at once, then 10 a second): however slowly the
    # requests went, far fewer lines than requests, and every request left
    # out is counted by a later line (the last, after the pause, has room)
    left_out = sum(r.get("unlogged_before", 0) for r in failed)
    assert 100 <= len(failed) < 250 and left_out > 0, (len(failed), left_out)
    assert len(failed) + left_out == 303, (len(failed), left_out)


def test_health_shows_a_tenant_only_its_devices(tk: TenantKupd) -> None:
    """Per-device health is for the devices a tenant may see: alice (echo
    only) is told nothing of rot13, not even that it exists; carol (both)
    and the admin see both."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with tk.client("alice") as a:
        assert a.health("kup.v1.Kup/echo") == "SERVING"
        for name in ("kup.v1.Kup/rot13", "kup.v1.Kup/nosuch"):
            with pytest.raises(errors.NotFound) as ei:
                a.health(name)
            assert "rot13" not in str(ei.value).replace(name, ""), ei.value
        # Watch: an unseen device is an unknown service, as gRPC answers it
        chan = grpc.insecure_channel("unix:" + tk.sock("alice"))
        try:
            watch = health_pb2_grpc.HealthStub(chan).Watch(
                health_pb2.HealthCheckRequest(service="kup.v1.Kup/rot13"), timeout=5
            )
            first = next(iter(watch))
            assert first.status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            watch.cancel()
        finally:
            chan.close()
    with tk.client("carol") as c:
        assert c.health("kup.v1.Kup/rot13") == "SERVING"


def test_a_device_name_no_device_can_have_is_refused_unrecorded(tk: TenantKupd) -> None:
    """A client's device name longer than any device's is InvalidArgument
    before the policy sees it (a 4 MiB name made a 4 MiB audit line per
    request); a long one that may be a name is recorded cut short."""
    before = len(tk.audit_lines())
    huge = "d" * 5000
    with tk.client("alice") as a:
        for op in (
            lambda: a.devices(huge),
            lambda: a.call(huge, b"x"),
            lambda: next(iter(a.watch(huge))),
            lambda: a.attach(huge),
        ):
            with pytest.raises(errors.InvalidArgument, match="5000 bytes: no device name") as ei:
                op()
            assert len(str(ei.value)) < 200, ei.value
        assert len(tk.audit_lines()) == before
        with pytest.raises(errors.PermissionDenied) as ei:
            a.attach("e" * 1000)
        assert len(str(ei.value)) < 300, ei.value
    wait_until(lambda: len(tk.audit_lines()) == before + 1, what="the denial's audit line")
    line = tk.audit_lines()[-1]
    assert line["device"] == "e" * 64 + "... (1000 bytes)", line
    assert huge not in tk.log() and "e" * 1000 not in tk.log()


def test_watch_streams_are_bounded_per_tenant(tk: TenantKupd) -> None:
    """A tenant holds at most WATCHES_PER_TENANT Watch streams; the next is
    ResourceExhausted (audited), another tenant's are not affected, and one
    ended makes room."""
    from kupd.watch import WATCHES_PER_TENANT

    with tk.client("carol") as c, tk.client("alice") as a:
        watches = [c.watch("echo", initial_state=True) for _ in range(WATCHES_PER_TENANT)]
        try:
            for w in watches:  # each stream is open: its first (initial) event came
                assert next(iter(w)).initial
            with pytest.raises(errors.ResourceExhausted, match="rule watches"):
                next(iter(c.watch("echo", initial_state=True)))
            # the health service's Watch counts too (it was unbounded)
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            chan = grpc.insecure_channel("unix:" + tk.sock("carol"))
            try:
                hw = health_pb2_grpc.HealthStub(chan).Watch(health_pb2.HealthCheckRequest())
                with pytest.raises(grpc.RpcError) as ei:
                    next(iter(hw))
                assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, ei.value
                assert "rule watches" in (ei.value.details() or "")
            finally:
                chan.close()
            with a.watch("echo", initial_state=True) as other:
                assert next(iter(other)).initial
            watches.pop().cancel()
            wait_until(
                lambda: _watch_opens(c), what="a Watch stream once one of carol's ended"
            )
        finally:
            for w in watches:
                w.cancel()
    assert _audit_has(tk, tenant="carol", op="watch", rule="watches"), tk.audit_lines()


def _watch_opens(c: Client) -> bool:
    w = c.watch("echo", initial_state=True)
    try:
        return bool(next(iter(w)).initial)
    except errors.ResourceExhausted:
        return False
    finally:
        w.cancel()


def test_denials_get_audit_lines_up_to_a_budget(start_tenants: StartTenants) -> None:
    """A tenant's denials cost it nothing: past AUDIT_DENIALS_BURST lines
    (then AUDIT_DENIALS_PER_SECOND) they are counted, not written, and the
    tenant's next line says how many were left out."""
    from kupd.policy import AUDIT_DENIALS_BURST, AUDIT_DENIALS_PER_SECOND

    burst, rate = int(AUDIT_DENIALS_BURST), AUDIT_DENIALS_PER_SECOND
    tk = start_tenants(DEVICES + TENANTS)  # its own: the budget is spent here
    before = [x for x in tk.audit_lines() if x.get("tenant") == "bob"]

    def bobs() -> int:
        return sum(1 for x in tk.audit_lines() if x.get("tenant") == "bob")

    denied = 0
    with tk.client("bob") as b:  # bob may only call: every attach is denied
        t0 = time.monotonic()
        # 50 denials past what the budget can have refilled, however slowly
        # they go (a loaded machine), and the last of them left out (kupd
        # writes a denial's line before it answers): the line after the
        # pause has a count to give.  (The budget refills as they go: a
        # denial that finds a token is written, and one after the pause
        # then had nothing left out to count.)
        while True:
            had = bobs()
            with pytest.raises(errors.PermissionDenied):
                b.attach("echo", 30)
            denied += 1
            if denied >= burst + 50 + rate * (time.monotonic() - t0) and bobs() == had:
                break
        time.sleep(0.3)  # a line's worth of budget again
        with pytest.raises(errors.PermissionDenied):
            b.attach("echo", 30)
        denied += 1
        elapsed = time.monotonic() - t0
    lines = [x for x in tk.audit_lines() if x.get("tenant") == "bob"][len(before) :]
    # the burst, and no more than the budget refilled meanwhile
    assert burst <= len(lines) <= burst + rate * elapsed + 1, (len(lines), elapsed)
    left_out = sum(x.get("unrecorded_before", 0) for x in lines)
    assert left_out > 0 and left_out + len(lines) == denied, (left_out, len(lines), denied)
    assert lines[-1]["unrecorded_before"] > 0, lines[-1]


def test_ops_rule(tk: TenantKupd) -> None:
    with tk.client("bob") as c:
        assert c.call("echo", b"ping").data in (b"ping", b"PING")
        with pytest.raises(errors.PermissionDenied, match="rule ops"):
            c.open("echo").channel()
        with pytest.raises(errors.PermissionDenied, match="rule ops"):
            c.attach("echo")
        with pytest.raises(errors.PermissionDenied, match="rule ops"):
            next(iter(c.watch("echo")))
    assert _audit_has(tk, tenant="bob", op="session", rule="ops")
    assert _audit_has(tk, tenant="bob", op="watch", rule="ops")


def test_a_message_over_the_tenant_limit_ends_no_session(tk: TenantKupd) -> None:
    """A Session message over the tenant's max_message_bytes is refused
    in-band as TooBig (INVALID_ARGUMENT naming the rule), like one over the
    channel's size: the session goes on.  Before, the whole stream ended."""
    chan = grpc.insecure_channel("unix:" + tk.sock("alice"))
    try:
        stub = kup_pb2_grpc.KupStub(chan)
        reqs = iter(
            [
                kup_pb2.SessionRequest(request_id=1, attach=kup_pb2.SessionAttach(device="echo")),
                kup_pb2.SessionRequest(request_id=2, receive=kup_pb2.SessionReceive()),
                kup_pb2.SessionRequest(
                    request_id=3, exchange=kup_pb2.SessionExchange(data=b"x" * 65)
                ),
                kup_pb2.SessionRequest(request_id=4, send=kup_pb2.SessionSend(data=b"x" * 65)),
                kup_pb2.SessionRequest(
                    request_id=5, exchange=kup_pb2.SessionExchange(data=b"y" * 64)
                ),
            ]
        )
        got = list(stub.Session(reqs, timeout=30))
    finally:
        chan.close()
    assert [r.request_id for r in got] == [1, 2, 3, 4, 5]
    assert got[0].attached.max_message_bytes == 64
    for r in got[2:4]:
        assert r.WhichOneof("result") == "error", r
        assert r.error.grpc_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert r.error.kind == "TooBig", r
        assert "rule max_message_bytes" in r.error.message
    assert got[4].exchanged.message.data == b"y" * 64
    assert _audit_has(tk, tenant="alice", op="session", rule="max_message_bytes")


def test_sessions_not_attached_yet_count_against_the_tenants_max_sessions(
    tk: TenantKupd,
) -> None:
    """Session streams that never send their attach count against their
    tenant's max_sessions (each costs kupd memory): alice's two silent
    streams leave her no session, and nobody else loses one."""
    import threading

    chan = grpc.insecure_channel("unix:" + tk.sock("alice"))
    done = threading.Event()

    def nothing() -> Iterator[kup_pb2.SessionRequest]:
        done.wait()
        yield from ()

    stub = kup_pb2_grpc.KupStub(chan)
    streams = [stub.Session(nothing()) for _ in range(2)]
    try:
        with tk.client("alice") as c:

            def refused() -> bool:
                try:
                    c.open("echo").channel().close()
                except errors.ResourceExhausted as exc:
                    assert "rule max_sessions: 2 sessions and leases open" in str(exc), exc
                    return True
                return False

            wait_until(refused, what="kupd counting alice's silent streams")
            # bob may not hold Sessions at all: his stream is refused at its
            # start, before it takes any room
            bob = grpc.insecure_channel("unix:" + tk.sock("bob"))
            try:
                with pytest.raises(grpc.RpcError) as e:
                    next(kup_pb2_grpc.KupStub(bob).Session(nothing(), timeout=30))
                assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, e.value
                assert "rule ops" in str(e.value.details())
            finally:
                bob.close()
            with tk.client("carol") as other:
                with other.open("echo").channel() as ch:
                    assert ch.receive(timeout=10).kind.name == "PASS"
            done.set()
            for st in streams:
                assert list(st) == []
            with c.open("echo").channel(), c.open("echo").channel():
                pass
    finally:
        done.set()
        chan.close()
    assert _audit_has(tk, tenant="alice", op="session", rule="max_sessions")


#: A Session's refusal of a message over alice's max_message_bytes (64),
#: made by the client (kupclient, kup.js) before it is sent.
TENANT_RULE = (
    r"^rule max_message_bytes: message of 65 bytes exceeds max_message_bytes=64 "
    r"\(this tenant's limit; channel %d of device echo itself carries 4096 bytes\)$"
)


def test_async_and_node_sessions_name_the_tenants_size_rule(tk: TenantKupd) -> None:
    """As the sync client: a Session's TooBig over the tenant's limit says
    it is the tenant's rule, in kupclient's asyncio client and in kup.js
    (which looks the channel's size up when refusing: no ListDevices came
    before, unlike kupclient's open())."""

    async def main() -> None:
        async with AsyncClient(tk.sock("alice")) as c:
            async with await (await c.open("echo")).channel() as ch:
                await ch.receive(timeout=10)
                with pytest.raises(errors.TooBig, match=TENANT_RULE % ch.id):
                    await ch.send(b"x" * 65)
                with pytest.raises(errors.TooBig, match=TENANT_RULE % ch.id):
                    await ch.exchange(b"x" * 65, timeout=10)
                assert (await ch.exchange(b"y" * 64, timeout=10)).data == b"y" * 64

    asyncio.run(main())
    script = """
const kup = require(process.argv[1]);
(async () => {
  const c = kup.connect(process.argv[2]);
  const s = await c.openSession('echo');
  await s.receive(10000);
  for (const op of [(d) => s.send(d), (d) => s.exchange(d, 10000)]) {
    try { await op(Buffer.alloc(65)); console.log('sent'); }
    catch (err) { console.log(`${s.lease.channel} ${err.kupError} ${err.message}`); }
  }
  console.log((await s.exchange(Buffer.alloc(64, 0x79), 10000)).data.length);
  await s.close();
  c.close();
})().catch((err) => { console.error(err); process.exit(1); });
"""
    ensure_node_deps()
    proc = subprocess.run(
        ["node", "-e", script, str(NODE_DIR / "kup.js"), tk.sock("alice")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    *refused, after = proc.stdout.splitlines()
    assert len(refused) == 2 and after == "64", proc.stdout
    for line in refused:
        chan, kind, message = line.split(" ", 2)
        assert kind == "TooBig" and re.match(TENANT_RULE % int(chan), message), line


def test_limits_are_resource_exhausted_and_size_is_too_big(tk: TenantKupd) -> None:
    with tk.client("alice") as c:
        dev = c.open("echo")
        with dev.channel(), dev.channel():
            with pytest.raises(errors.ResourceExhausted, match="max_sessions=2"):
                dev.channel()
        # over the tenant's max_message_bytes: TooBig, whoever refuses it --
        # kupd (a Call, a lease send) or the client that knows the limit
        with pytest.raises(errors.TooBig, match="max_message_bytes=64"):
            c.call("echo", b"x" * 65)
        with dev.channel() as ch:
            # kupd announces what this tenant may send, not the channel's
            # size: the client refuses more before sending it
            assert ch.max_msg == 64
            ch.receive()
            # and says it is the tenant's rule (as kupd does), not the channel
            with pytest.raises(errors.TooBig, match=TENANT_RULE % ch.id):
                ch.send(b"x" * 65)
            with pytest.raises(errors.TooBig, match=TENANT_RULE % ch.id):
                ch.exchange(b"x" * 65)
            assert ch.exchange(b"y" * 64).data == b"y" * 64  # the session goes on
        lease = c.attach("echo")
        assert lease.max_message_bytes == 64
        with pytest.raises(errors.TooBig, match="max_message_bytes=64"):
            c.lease_send(lease.lease_id, b"x" * 65)
        c.release(lease.lease_id)
        (echo,) = [d for d in c.devices() if d.name == "echo"]
        assert echo.max_message_bytes == 64
        assert len(c.call("echo", b"x" * 64).data) == 64
    with tk.client("carol") as c:
        c.call("echo", b"one")  # the bucket holds one token, refilled every 100 s
        with pytest.raises(errors.ResourceExhausted, match="calls_per_second") as ei:
            c.call("echo", b"two")
        # when she may retry: the refill's time, rounded up, in the message
        # and in the error's field (trailing metadata kup-retry-after-ms)
        ms = ei.value.retry_after_ms
        assert ms is not None and 0 < ms <= 100_000, ms
        assert f"retry in {math.ceil(ms / 100) / 10:g} s at the earliest" in str(ei.value)
    assert _audit_has(tk, tenant="alice", rule="max_sessions")
    assert _audit_has(tk, tenant="alice", op="call", rule="max_message_bytes")
    assert _audit_has(tk, tenant="carol", op="call", rule="calls_per_second")


def test_calls_in_flight_limit(tk: TenantKupd) -> None:
    """bob may have one Call in flight.  His first is held by echo
    ("!lockhold") until this test lets it go -- not for a fixed time that a
    loaded machine could use up before the second Call is refused."""
    with tk.client("bob") as b, tk.client("carol") as c:
        holds = echo_lock_holds(tk.sim)
        held = in_background(lambda: b.call("echo", LOCKHOLD, timeout=60))
        try:
            wait_until(lambda: echo_lock_holds(tk.sim) > holds, what="echo to hold bob's call")
            assert b.devices("echo")[0].calls_in_flight == 1  # his own: carol's show 0
            assert c.devices("echo")[0].calls_in_flight == 0
            with pytest.raises(errors.ResourceExhausted, match="max_calls_in_flight=1"):
                b.call("echo", b"second")
        finally:
            with c.open("echo").channel() as ch:  # carol's Session lets the hold go
                ch.receive(timeout=30)
                assert ch.exchange(b"!lockfree", timeout=30).data.lower() == b"!lockfree"
            reply = held.outcome(60)
        assert isinstance(reply, Message) and reply.data.lower() == LOCKHOLD, reply
        assert b.call("echo", b"after").data.lower() == b"after"  # the slot is free again
        # A Call whose deadline passes while the module still owes its reply
        # leaves its pool channel quarantined -- and keeps bob's slot until the
        # channel is back: Calls that time out at once cannot take the pool
        # out of service for everyone (bob could do that four times over)
        with pytest.raises(errors.DeadlineExceeded):
            b.call("echo", LOCKHOLD, timeout=0.2)
        # the refusal says why a slot is taken with no Call of bob's running
        kept = r"1 calls in flight \(1 of them timed out and keep their slot until"
        with pytest.raises(errors.ResourceExhausted, match=kept + ".*max_calls_in_flight=1"):
            b.call("echo", b"meanwhile")
        with c.open("echo").channel() as ch:  # the module answers at last
            ch.receive(timeout=30)
            assert ch.exchange(b"!lockfree", timeout=30).data.lower() == b"!lockfree"
        wait_until(lambda: _calls_again(b), what="bob's slot back with his pool channel")
    assert _audit_has(tk, tenant="bob", op="call", rule="max_calls_in_flight")


def _calls_again(b: Client) -> bool:
    try:
        return b.call("echo", b"again").data.lower() == b"again"
    except errors.ResourceExhausted:
        return False


def _lease_rpcs(
    stub: kup_pb2_grpc.KupStub, lease_id: str
) -> Iterator[tuple[str, tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]]]:
    """Every RPC that takes a lease id, called with ``lease_id``: (name, its
    status code, details and kupd's trailing metadata)."""
    calls = {
        "Send": lambda: stub.Send(kup_pb2.SendRequest(lease_id=lease_id, data=b"x"), timeout=10),
        "Send wait_reply": lambda: stub.Send(
            kup_pb2.SendRequest(lease_id=lease_id, data=b"x", wait_reply=True), timeout=10
        ),
        "Receive": lambda: stub.Receive(
            kup_pb2.ReceiveRequest(lease_id=lease_id, mode=kup_pb2.RECEIVE_MODE_NONBLOCK),
            timeout=10,
        ),
        "Pass": lambda: stub.Pass(kup_pb2.PassRequest(lease_id=lease_id), timeout=10),
        "Release": lambda: stub.Release(kup_pb2.ReleaseRequest(lease_id=lease_id), timeout=10),
    }
    for name, call in calls.items():
        with pytest.raises(grpc.RpcError) as ei:
            call()
        e: Any = ei.value
        kup = tuple((k, v) for k, v in (e.trailing_metadata() or ()) if k.startswith("kup-"))
        yield name, (e.code(), e.details(), kup)


def test_another_tenants_lease_id_reads_as_no_lease(tk: TenantKupd) -> None:
    """A lease id of another tenant -- live, or ended -- gets exactly the
    answer of an id that names no lease (NOT_FOUND, the same words): a
    PERMISSION_DENIED told carol that alice's id was live.  Alice's lease
    is untouched, and the operator's audit log records carol's attempt as
    rule lease-owner, naming the lease and its owner."""
    unknown = "0123456789abcdef"
    chan = grpc.insecure_channel("unix:" + tk.sock("carol"))
    try:
        stub = kup_pb2_grpc.KupStub(chan)
        nothing = dict(_lease_rpcs(stub, unknown))
        assert {v[0] for v in nothing.values()} == {grpc.StatusCode.NOT_FOUND}, nothing
        with tk.client("alice") as a:
            lease = a.attach("echo")
            live = lease.lease_id
            try:
                for name, got in _lease_rpcs(stub, live):
                    code, details, meta = nothing[name]
                    assert got == (code, details.replace(unknown, live), meta), (name, got)
                with tk.client("carol") as c, pytest.raises(errors.NotFound):
                    c.lease_send(live, b"steal")  # the client library's view: the same
                a.lease_receive(live, timeout=10)  # still alice's, untouched
            finally:
                a.release(live)
        probes = _probes_of(tk, live)
        for name, got in _lease_rpcs(stub, live):  # ended: the same again
            code, details, meta = nothing[name]
            assert got == (code, details.replace(unknown, live), meta), (name, got)
        # ... and each attempt on the ended lease is audited as one on the
        # live lease was: a tenant guessing at ids is seen either way
        wait_until(
            lambda: _probes_of(tk, live) == probes + len(nothing),
            timeout=10,
            what="the attempts on alice's ended lease audited",
        )
    finally:
        chan.close()
    assert _audit_has(
        tk, tenant="carol", op="lease", rule="lease-owner", lease=live, owner="alice"
    ), tk.audit_lines()


def _probes_of(tk: TenantKupd, lease_id: str) -> int:
    return sum(
        1
        for line in tk.audit_lines()
        if line.get("rule") == "lease-owner" and line.get("lease") == lease_id
    )


def test_list_devices_shows_only_what_the_tenant_may_use(tk: TenantKupd) -> None:
    with tk.client("alice") as a, tk.client("carol") as c, tk.admin() as adm:
        (dev,) = a.devices()
        assert dev.name == "echo"
        assert [ch.id for ch in dev.channels] == list(range(8, 16))
        with pytest.raises(errors.PermissionDenied, match="rule grant"):
            a.devices("rot13")
        assert sorted(d.name for d in c.devices()) == ["echo", "rot13"]
        with a.open("echo").channel(9) as ch:
            lease_ids = {x.lease_id for x in adm.list_leases("alice")}
            assert ch.lease.lease_id in lease_ids
            (mine,) = [x for x in a.devices()[0].channels if x.id == 9]
            assert (mine.state, mine.lease_id) == ("session", ch.lease.lease_id)
            (theirs,) = [x for x in c.devices("echo")[0].channels if x.id == 9]
            assert theirs.state == "session" and theirs.lease_id == ""  # not carol's to know


def test_watch_shows_only_granted_channels(tk: TenantKupd) -> None:
    with tk.client("alice") as a, tk.client("carol") as c:
        w = a.watch("echo", initial_state=True)
        first = next(w)
        assert first.initial and first.device == "echo"
        with c.open("echo").channel(5):  # carol on channel 5: not alice's business
            with a.open("echo").channel(10):
                pass
        ev = next(w)
        while ev.initial:
            ev = next(w)
        assert (ev.type, ev.channel) == (EventType.LEASE_TAKEN, 10), ev
        w.cancel()


def test_admin_lists_and_revokes(tk: TenantKupd) -> None:
    with tk.client("alice") as a, tk.admin() as adm:
        ch = a.open("echo").channel(12)
        ch.receive()
        (info,) = [x for x in adm.list_leases() if x.lease_id == ch.lease.lease_id]
        assert (info.tenant, info.device, info.channel, info.holder) == (
            "alice",
            "echo",
            12,
            "session",
        )
        adm.revoke(ch.lease.lease_id, "test says so")
        with pytest.raises(errors.PermissionDenied, match="admin-revoke: test says so"):
            ch.send(b"after")
            ch.receive(timeout=10)
        # the next operation raises it again, saying the session is over
        for _ in range(2):
            with pytest.raises(
                errors.PermissionDenied,
                match=r"^channel 12 of echo is closed: the session already ended with "
                "PermissionDenied: .*admin-revoke: test says so",
            ):
                ch.send(b"again")
            ch.close()
        with pytest.raises(errors.NotFound):
            adm.revoke("no-such-lease")


def test_async_session_says_why_it_is_closed(tk: TenantKupd) -> None:
    """AsyncClient: after a revocation ended the stream, the next operation
    names the error that ended it."""
    import asyncio

    from kupclient import AsyncClient

    async def go() -> None:
        async with AsyncClient(tk.sock("alice")) as a:
            ch = await (await a.open("echo")).channel(13)
            await ch.receive(timeout=10)
            with tk.admin() as adm:
                adm.revoke(ch.lease.lease_id, "async test says so")
            # kupd's status has reached the client (the stream is done): the
            # next operation raises it, not gRPC's "RPC already finished"
            for _ in range(1000):
                if ch._call.done():
                    break
                await asyncio.sleep(0.01)
            with pytest.raises(errors.PermissionDenied, match="async test says so"):
                await ch.send(b"after")
            with pytest.raises(
                errors.PermissionDenied,
                match=r"closed: the session already ended with PermissionDenied: .*async test says",
            ):
                await ch.send(b"again")
            await ch.close()
            # the same as the status arrives: kupd's reason, or if gRPC lost
            # it in the race with the write, PeerGone saying so (before:
            # SystemFailure "Internal error from Core")
            ch = await (await a.open("echo")).channel(13)
            await ch.receive(timeout=10)
            with tk.admin() as adm:
                adm.revoke(ch.lease.lease_id, "async test says so again")
            with pytest.raises((errors.PermissionDenied, errors.PeerGone)) as ended:
                while True:
                    await ch.exchange(b"x", timeout=10)
            assert "again" in str(ended.value) or "as this request was sent" in str(ended.value)
            await ch.close()

    asyncio.run(go())


def test_drain_device(tk: TenantKupd) -> None:
    with tk.client("carol") as c, tk.admin() as adm:
        ch = c.open("rot13").channel()
        ch.receive()
        w = c.watch("rot13", initial_state=True)
        replay = [next(w), next(w)]  # APPEARED, carol's LEASE_TAKEN: subscribed
        assert [e.type for e in replay] == [EventType.DEVICE_APPEARED, EventType.LEASE_TAKEN]
        ended = adm.drain("rot13")
        assert ch.lease.lease_id in ended
        with pytest.raises(errors.Shutdown):
            ch.send(b"x")
            ch.receive(timeout=10)
        with pytest.raises(errors.Shutdown, match=r"already ended with Shutdown: .*drained"):
            ch.receive(timeout=10)
        ch.close()
        with pytest.raises(errors.KupError, match="drained"):
            c.open("rot13").channel()
        # it says so: ListDevices, and its health (a checker must not send
        # it traffic) -- kupd as a whole still serves echo
        assert c.devices("rot13")[0].drained
        assert not c.devices("echo")[0].drained
        wait_until(lambda: c.health("kup.v1.Kup/rot13") == "NOT_SERVING", what="rot13 drained")
        assert c.health("kup.v1.Kup/echo") == "SERVING" and c.health("") == "SERVING"
        # and Watch: the drain first, then what it ended; a new watcher's
        # replay includes it
        drained, released = next(w), next(w)
        assert (drained.type, drained.reason) == (EventType.DEVICE_DRAINED, "admin"), drained
        assert (released.type, released.reason) == (EventType.LEASE_RELEASED, "drained")
        with c.watch("rot13", initial_state=True) as w2:
            assert EventType.DEVICE_DRAINED in [next(w2).type, next(w2).type]
        audited = len(tk.audit_lines())
        assert adm.drain("rot13") == []  # drained already: nothing happens again
        adm.drain("rot13", undo=True)
        assert next(w).type == EventType.DEVICE_UNDRAINED  # not a second DRAINED first
        adm.drain("rot13", undo=True)  # not drained any more: nothing to say
        assert len(tk.audit_lines()) == audited + 1  # the one undrain
        w.cancel()
        assert not c.devices("rot13")[0].drained
        wait_until(lambda: c.health("kup.v1.Kup/rot13") == "SERVING", what="rot13 undrained")
        with c.open("rot13").channel() as again:
            again.receive()


def test_admin_revoke_refuses_an_overlong_id_or_reason(tk: TenantKupd) -> None:
    """RevokeLease names what is wrong with its arguments, within gRPC's
    limits: a 20 KB lease id is InvalidArgument (it was quoted whole into a
    status gRPC refused to send: RESOURCE_EXHAUSTED about metadata), and a
    reason longer than REASON_MAX is refused, not written to the logs."""
    from kupd.admin import REASON_MAX

    with tk.client("carol") as c, tk.admin() as adm:
        with pytest.raises(errors.InvalidArgument, match="lease_id of 20000 characters"):
            adm.revoke("x" * 20000)
        lease = c.attach("echo")
        with pytest.raises(errors.InvalidArgument, match=f"at most {REASON_MAX}"):
            adm.revoke(lease.lease_id, "r" * (REASON_MAX + 1))
        adm.revoke(lease.lease_id, "r" * REASON_MAX)
        with pytest.raises(errors.PermissionDenied, match="rule admin-revoke: rrr"):
            c.lease_send(lease.lease_id, b"x")


def test_sample_config_shows_two_tenants_and_an_admin() -> None:
    from kupd.config import load_config
    from kupd.testing import REPO_ROOT

    cfg = load_config(REPO_ROOT / "deploy" / "kupd.sample.toml")
    assert len(cfg.tenants) == 2 and cfg.admin_socket and cfg.audit_log
    alice, probe = cfg.tenants
    assert alice.grants[0].channels == frozenset(range(8, 64))
    assert probe.ops == frozenset({"call", "watch"}) and probe.mode == 0o660


def test_a_full_audit_disk_leaves_the_denial_standing(start_tenants: StartTenants) -> None:
    """The audit log on a full disk (/dev/full: every write is ENOSPC): the
    client still gets its PERMISSION_DENIED, not an internal error, and kupd
    logs the failed write once per cause."""
    tk = start_tenants(DEVICES + TENANTS)
    tk.audit = Path("/dev/full")
    tk.write_config(DEVICES + TENANTS)
    tk.hup()
    wait_until(lambda: "reload" in tk.log() and "/dev/full" in tk.log(), what="reloaded")
    with tk.client("bob") as c:
        for _ in range(3):
            with pytest.raises(errors.PermissionDenied, match="rule ops"):
                c.attach("echo")
        assert c.call("echo", b"still serving").data in (b"still serving", b"STILL SERVING")
    failed = [ln for ln in tk.log().splitlines() if "audit log write failed" in ln]
    assert len(failed) == 1 and "/dev/full" in failed[0], tk.log()


def _guard_of_bob(**limits: object) -> tuple[Any, Any]:
    """A Guard (no kupd) of one tenant, bob: Calls on echo, one at a time,
    and ``limits``."""
    from kupd.config import parse_config
    from kupd.policy import Guard, Policy

    bob = {"name": "bob", "socket": "/run/kupd/bob/bob.sock", "max_calls_in_flight": 1}
    bob.update(limits, grant=[{"device": "echo"}])
    cfg = parse_config({"device": [{"name": "echo"}], "tenant": [bob]})
    (t,) = cfg.tenants
    return Guard(Policy(cfg.tenants)), t


def test_a_kept_call_slot_is_counted_once_and_let_go_once() -> None:
    """kupd.calls.CallSlot with the real Guard: a Call whose pool channel
    stays quarantined keeps its slot (the refusal says so), and the slot goes
    back exactly once, whichever of the pool and the Call runs it."""
    from kupd.calls import CallSlot as _CallSlot

    guard, bob = _guard_of_bob()
    guard.begin_call(bob, "echo", 1)
    slot = _CallSlot(guard, bob)
    slot.keep()  # the Call ended; its channel is quarantined
    slot.keep()
    with pytest.raises(errors.ResourceExhausted, match=r"\(1 of them timed out"):
        guard.begin_call(bob, "echo", 1)
    slot()  # the channel settled
    slot()
    assert guard.in_flight == {} and guard.kept == {}
    guard.begin_call(bob, "echo", 1)  # the slot is free again
    with pytest.raises(errors.ResourceExhausted) as ei:
        guard.begin_call(bob, "echo", 1)
    assert "timed out" not in str(ei.value)
    _CallSlot(guard, bob)()  # a Call that ran to its end lets go at once
    assert guard.in_flight == {} and guard.kept == {}


def test_a_call_refused_for_its_in_flight_limit_spends_no_rate() -> None:
    """calls_per_second is spent by admitted Calls only: a Call refused
    for max_calls_in_flight took a token as well, so the tenant's next
    Call, within its rate, was refused for the rate."""
    guard, bob = _guard_of_bob(calls_per_second=2)  # a burst of 2, one more each 0.5 s
    guard.begin_call(bob, "echo", 1)
    for _ in range(3):
        with pytest.raises(errors.ResourceExhausted, match="max_calls_in_flight"):
            guard.begin_call(bob, "echo", 1)
    guard.end_call(bob)
    guard.begin_call(bob, "echo", 1)  # the burst's second token
    guard.end_call(bob)
    with pytest.raises(errors.ResourceExhausted, match="calls_per_second"):
        guard.begin_call(bob, "echo", 1)


def test_a_calls_per_second_refusal_says_when_to_retry() -> None:
    """The refusal names the time until the bucket holds a token again,
    rounded up to a millisecond: at most one token's refill (1/rate), more
    than 0 -- and a Call admitted then is within the rate.  Other refusals
    carry no such figure."""
    from kupd.policy import retry_after_ms, shown_ms

    guard, bob = _guard_of_bob(calls_per_second=4, max_calls_in_flight=0)  # a burst of 4
    for _ in range(4):
        guard.begin_call(bob, "echo", 1)
    with pytest.raises(errors.ResourceExhausted, match="calls_per_second=4: retry in ") as ei:
        guard.begin_call(bob, "echo", 1)
    ms = ei.value.retry_after_ms
    assert ms is not None and 0 < ms <= 250, ms
    assert f"retry in {ms} ms at the earliest" in ei.value.message
    guard, bob = _guard_of_bob()
    guard.begin_call(bob, "echo", 1)
    with pytest.raises(errors.ResourceExhausted, match="max_calls_in_flight") as ei:
        guard.begin_call(bob, "echo", 1)
    assert ei.value.retry_after_ms is None
    # rounded up, never to 0; shown in seconds (a tenth, rounded up) from 1 s
    assert [retry_after_ms(s) for s in (1e-9, 0.25, 0.2501, 99.7121)] == [1, 250, 251, 99713]
    assert retry_after_ms(1e300) == errors.RETRY_AFTER_MAX_MS
    assert [shown_ms(m) for m in (1, 999, 1000, 1001, 99713)] == [
        "1 ms", "999 ms", "1 s", "1.1 s", "99.8 s",
    ]


def test_the_client_reads_kup_retry_after_ms() -> None:
    """kupclient's one mapping: kup-retry-after-ms on a kupd error is its
    retry_after_ms; a value that is not a whole number of milliseconds
    (> 0, within RETRY_AFTER_MAX_MS) is ignored, as is one on a status kupd
    did not send (no kup-error)."""
    from kupclient._errors import error_from_status

    def got(value: str | bytes, kind: str = "ResourceExhausted") -> int | None:
        md = [("kup-retry-after-ms", value)] + ([("kup-error", kind)] if kind else [])
        exc = error_from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "limit", md)
        assert isinstance(exc, errors.ResourceExhausted)
        return exc.retry_after_ms

    assert got("340") == 340
    assert got(b"7") == 7
    assert got(str(errors.RETRY_AFTER_MAX_MS)) == errors.RETRY_AFTER_MAX_MS
    for bad in ("0", "-5", "1.5", "1e3", "", " 3", "٣", str(errors.RETRY_AFTER_MAX_MS + 1)):
        assert got(bad) is None, bad
    assert got("340", kind="") is None
    plain = error_from_status(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "limit", [("kup-error", "ResourceExhausted")]
    )
    assert plain.retry_after_ms is None


def test_a_tenants_health_is_that_of_its_own_devices(tmp_path: Path) -> None:
    """rot13's host hangs (its own kupsim, behind a proxy that holds its
    INFO answers): carol, granted it, sees kupd NOT_SERVING; alice, granted
    echo only, sees SERVING -- and asking after rot13 is NOT_FOUND for her
    without a probe of it (no INFO reaches its host; how long one took
    would tell her it is hung)."""
    import shutil
    import sys

    from kupd.testing import REPO_ROOT, kupsim

    sys.path.insert(0, str(REPO_ROOT / "tests" / "faults"))
    from simproxy import OP_INFO, proxy_dir

    with kupsim("echo", ready_timeout=60.0) as a, kupsim("rot13", ready_timeout=60.0) as b:
        pdir, proxy = proxy_dir(tmp_path, b.rundir, "rot13")
        os.symlink(pdir / "rot13.sock", a.rundir / "rot13.sock")
        k = TenantKupd(socket_dir(), a, DEVICES + TENANTS, tmp_path / "kupd.log")
        try:
            k.health_interval = 3600  # no monitor rounds: only Checks probe
            k.write_config(DEVICES + TENANTS)
            with k.admin() as adm:
                adm.reload()
            # the round the reload runs is over before rot13's host hangs:
            # the proxy forwards one request at a time, and a held one
            # would hide the next from the count
            wait_until(lambda: "config reloaded" in k.log(), what="the reload")
            time.sleep(1.0)
            proxy.delay[OP_INFO] = 30.0
            with Client(k.sock("alice")) as alice, Client(k.sock("carol")) as carol:
                asked = proxy.count(OP_INFO)
                assert alice.health() == "SERVING"  # her devices: echo
                with pytest.raises(errors.NotFound):
                    alice.health("kup.v1.Kup/rot13")
                time.sleep(0.5)
                assert proxy.count(OP_INFO) == asked  # neither Check probed rot13
                assert carol.health() == "NOT_SERVING"
                assert proxy.count(OP_INFO) > asked  # carol's Check did probe it
        finally:
            proxy.delay.clear()
            proxy.close()
            k.stop()
            shutil.rmtree(k.dir, ignore_errors=True)


def test_a_tenants_health_while_kupd_drains_is_not_serving(start_tenants: StartTenants) -> None:
    """After SIGTERM (a Call still in flight keeps the drain going), every
    tenant's Check of kupd as a whole is NOT_SERVING -- also one that sees
    only some devices, whose answer is worked out from those."""
    import signal
    import threading

    k = start_tenants("drain_grace = 3\n" + DEVICES + TENANTS)
    res: list[object] = []

    def run() -> None:
        with k.client("bob") as b:
            try:
                res.append(b.call("echo", LOCKHOLD, timeout=30))
            except errors.KupError as e:
                res.append(e)

    t = threading.Thread(target=run)
    t.start()
    with k.client("carol") as c, k.client("alice") as a:
        with Client(k.admin_socket) as whole:  # bob's Call: not carol's to count
            wait_until(lambda: whole.devices("echo")[0].calls_in_flight == 1, what="bob's Call")
        assert a.health("") == "SERVING"
        k.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "kupd draining" in k.log(), what="the drain")
        got = {
            "carol ''": c.health(""),
            "alice ''": a.health(""),
            "alice kup.v1.Kup": a.health("kup.v1.Kup"),
        }
    t.join(30)
    assert set(got.values()) == {"NOT_SERVING"}, got


def test_a_failed_rpcs_log_line_names_its_tenant(start_tenants: StartTenants) -> None:
    """An operator reading why a tenant was refused filters kupd's log by
    tenant: a refused Attach's "rpc failed" line said only the RPC and the
    error (the tenant was bound only once a lease was taken)."""
    k = start_tenants(DEVICES + TENANTS)
    with k.client("alice") as a:
        held = [a.attach("echo"), a.attach("echo")]
        with pytest.raises(errors.ResourceExhausted, match="max_sessions=2"):
            a.attach("echo")
        for lease in held:
            a.release(lease.lease_id)
    with k.client("carol") as c, pytest.raises(errors.NotFound):
        c.lease_send("feedfacefeedface", b"x")
    failed = [json.loads(ln) for ln in k.log().splitlines() if '"rpc failed"' in ln]
    got = {(r["rpc"], r["code"]): r.get("tenant") for r in failed}
    want = {("Attach", "RESOURCE_EXHAUSTED"): "alice", ("Send", "NOT_FOUND"): "carol"}
    assert got == want, failed
