"""requests_per_second: a tenant's RPCs that no other rate covers
(ListDevices, Attach, opening a Session or a Watch, the health
service's; not Release, which gives back) wait for their turn beyond the rate (kupd.policy.Guard.
request_turn), so that one tenant's flood of them cannot slow every other
tenant's round trips; a wait beyond the RPC's deadline (or PACE_LIMIT) is
refused RESOURCE_EXHAUSTED with kup-retry-after-ms.

The counts below hold whatever the machine's speed: every request of a
burst is sent at once, and the deadlines leave a quarter of a token's
interval on either side of the last one admitted."""

from __future__ import annotations

import signal
import threading
import tomllib
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tenancy_helpers import DEVICES, LOCKHOLD, OWNER, StartTenants, TenantKupd

from kupapi import kup_pb2, kup_pb2_grpc
from kupclient import Client
from kupd.channel import Device
from kupd.config import ConfigError, load_config, parse_config
from kupd.testing import wait_until

#: ann and ben: 2 requests a second (a burst of 2), on echo channels of
#: their own; cat: one each 10 s, so that her second request would wait
#: beyond any deadline a test uses.
PACED = f"""
[[tenant]]
name = "ann"
socket = "@DIR@/ann.sock"
owner = {OWNER}
requests_per_second = 2
[[tenant.grant]]
device = "echo"
channels = "4-7"

[[tenant]]
name = "ben"
socket = "@DIR@/ben.sock"
owner = {OWNER}
requests_per_second = 2
[[tenant.grant]]
device = "echo"
channels = "8-11"

[[tenant]]
name = "cat"
socket = "@DIR@/cat.sock"
owner = {OWNER}
requests_per_second = 0.1
[[tenant.grant]]
device = "echo"
channels = "12-15"
"""

RULE = "rule requests_per_second"


@pytest.fixture
def stubs() -> Iterator[dict[str, Any]]:
    """gRPC stubs of a tenant's socket by name (made on first use), closed after."""
    channels: list[grpc.Channel] = []
    made: dict[str, Any] = {}

    def stub(k: TenantKupd, tenant: str, kind: str = "kup") -> Any:
        key = f"{k.dir}/{tenant}/{kind}"
        if key not in made:
            ch = grpc.insecure_channel(f"unix:{k.sock(tenant)}")
            channels.append(ch)
            made[key] = (
                kup_pb2_grpc.KupStub(ch) if kind == "kup" else health_pb2_grpc.HealthStub(ch)
            )
        return made[key]

    yield {"stub": stub}
    for ch in channels:
        ch.close()


def _retry_after(err: grpc.RpcError) -> int | None:
    for k, v in err.trailing_metadata() or ():
        if k == "kup-retry-after-ms":
            return int(v)
    return None


def _burst(stub: Any, n: int, timeout: float) -> tuple[int, list[grpc.RpcError]]:
    """``n`` ListDevices at once, each with ``timeout``: how many were
    served, and the errors of the others."""
    futs: list[Future[Any]] = [
        stub.ListDevices.future(kup_pb2.ListDevicesRequest(), timeout=timeout) for _ in range(n)
    ]
    ok = 0
    refused: list[grpc.RpcError] = []
    for f in futs:
        try:
            f.result()
            ok += 1
        except grpc.RpcError as exc:
            refused.append(exc)
    return ok, refused


def _refused_by_the_pace(errs: list[grpc.RpcError]) -> None:
    for e in errs:
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (e.code(), e.details())
        assert RULE in (e.details() or ""), e.details()
        ms = _retry_after(e)
        assert ms is not None and ms > 0, (ms, e.details())


def test_requests_beyond_the_tokens_wait_and_past_their_deadline_are_refused(
    start_tenants: StartTenants, stubs: dict[str, Any]
) -> None:
    """ann: 2 a second, a burst of 2.  Of 12 ListDevices at once with a
    deadline of 1.25 s, the first two are served at once, the 3rd and 4th
    wait 0.5 and 1 s for their turns; the 5th would wait 1.5 s, beyond
    its deadline: it and the 7 after it are refused at once, saying when
    to retry, and audited."""
    k = start_tenants(DEVICES + PACED)
    ok, refused = _burst(stubs["stub"](k, "ann"), 12, 1.25)
    assert (ok, len(refused)) == (4, 8), [e.details() for e in refused]
    _refused_by_the_pace(refused)
    assert "more than requests_per_second=2: this request would wait" in (
        refused[0].details() or ""
    )
    audited = [a for a in k.audit_lines() if a.get("rule") == "requests_per_second"]
    assert len(audited) == 8 and {a["tenant"] for a in audited} == {"ann"}, audited
    assert {a["op"] for a in audited} == {"list"}, audited
    with k.admin() as adm:
        body = adm.metrics("kupd_tenant_requests_paced_total")
    assert 'kupd_tenant_requests_paced_total{tenant="ann"} 2.0' in body, body


def test_one_tenants_flood_takes_none_of_anothers_tokens(
    start_tenants: StartTenants, stubs: dict[str, Any]
) -> None:
    """ann spends her tokens and more; ben, at the same rate, still has
    his whole burst: two at once within 0.2 s, and his third refused."""
    k = start_tenants(DEVICES + PACED)
    ok, refused = _burst(stubs["stub"](k, "ann"), 12, 1.25)
    assert ok == 4 and len(refused) == 8
    ok, refused = _burst(stubs["stub"](k, "ben"), 3, 0.25)
    assert (ok, len(refused)) == (2, 1), [e.details() for e in refused]
    _refused_by_the_pace(refused)
    assert "tenant ben:" in (refused[0].details() or "")


def test_every_rpc_no_other_rate_covers_is_paced(
    start_tenants: StartTenants, stubs: dict[str, Any]
) -> None:
    """cat's one request of the next 10 s is an Attach; then ListDevices,
    Attach, a Watch, a Session and a health check are each refused (a
    deadline of 1 s) -- while a Call and her lease's Receive, which their
    own rates cover, are not; her lease is still hers, and her Release,
    which gives back and is never paced, ends it."""
    k = start_tenants(DEVICES + PACED)
    kup = stubs["stub"](k, "cat")
    lease = kup.Attach(kup_pb2.AttachRequest(device="echo"), timeout=30)
    tries: dict[str, Any] = {
        "ListDevices": lambda: kup.ListDevices(kup_pb2.ListDevicesRequest(), timeout=1),
        "Attach": lambda: kup.Attach(kup_pb2.AttachRequest(device="echo"), timeout=1),
        "Watch": lambda: next(kup.Watch(kup_pb2.WatchRequest(), timeout=1)),
        "Session": lambda: next(
            kup.Session(
                iter([kup_pb2.SessionRequest(attach=kup_pb2.SessionAttach(device="echo"))]),
                timeout=1,
            )
        ),
        "Health.Check": lambda: stubs["stub"](k, "cat", "health").Check(
            health_pb2.HealthCheckRequest(), timeout=1
        ),
    }
    for name, rpc in tries.items():
        with pytest.raises(grpc.RpcError) as info:
            rpc()
        _refused_by_the_pace([info.value])
        assert "this request would wait" in (info.value.details() or ""), name
    reply = kup.Call(kup_pb2.CallRequest(device="echo", data=b"hi"), timeout=30).reply
    assert reply.data.lower() == b"hi"  # echo upper-cases on its odd channels
    got = kup.Receive(kup_pb2.ReceiveRequest(lease_id=lease.lease_id), timeout=30)
    assert got.HasField("message"), got
    with k.admin() as adm:
        assert [le.lease_id for le in adm.list_leases("cat")] == [lease.lease_id]
        kup.Release(kup_pb2.ReleaseRequest(lease_id=lease.lease_id), timeout=1)
        assert adm.list_leases("cat") == []


def test_a_watch_opened_while_kupd_drains_is_told_so_before_its_pace(
    start_tenants: StartTenants, stubs: dict[str, Any]
) -> None:
    """kupd drains (SIGTERM; ann's Call held by echo keeps the drain going)
    and cat, her one request of the next 10 s spent, opens a Watch: it is
    UNAVAILABLE, kupd shutting down -- the drain is checked before the
    Watch's turn is waited for, as before the Watch's checks moved to
    kupd.watch -- not RESOURCE_EXHAUSTED with a retry_after_ms that
    invites a retry of a kupd going away, nor audited as cat's flood.  So
    are her Attach and the attach of a Session, and her ListDevices is
    answered: nothing is paced while kupd drains."""
    k = start_tenants("drain_grace = 60\n" + DEVICES + PACED)
    kup = stubs["stub"](k, "cat")
    kup.ListDevices(kup_pb2.ListDevicesRequest(), timeout=30)  # her token
    held: list[object] = []

    def call() -> None:
        try:
            held.append(
                stubs["stub"](k, "ann").Call(
                    kup_pb2.CallRequest(device="echo", data=LOCKHOLD), timeout=60
                )
            )
        except grpc.RpcError as exc:
            held.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    try:
        with Client(k.admin_socket) as whole:
            wait_until(lambda: whole.devices("echo")[0].calls_in_flight == 1, what="ann's Call")
        k.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "kupd draining" in k.log(), what="the drain")
        tries: dict[str, Any] = {
            "Watch": lambda: next(kup.Watch(kup_pb2.WatchRequest(), timeout=30)),
            "Attach": lambda: kup.Attach(kup_pb2.AttachRequest(device="echo"), timeout=30),
            "Session": lambda: next(
                kup.Session(
                    iter([kup_pb2.SessionRequest(attach=kup_pb2.SessionAttach(device="echo"))]),
                    timeout=30,
                )
            ),
        }
        for name, rpc in tries.items():
            with pytest.raises(grpc.RpcError) as info:
                rpc()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, (name, info.value.details())
            assert "kupd is shutting down" in (info.value.details() or ""), name
            assert _retry_after(info.value) is None, name
        assert kup.ListDevices(kup_pb2.ListDevicesRequest(), timeout=30).devices
        paced = [a for a in k.audit_lines() if a.get("rule") == "requests_per_second"]
        assert paced == [], paced
    finally:
        # let ann's Call finish, straight on kupsim (kupd attaches nothing now)
        with Device.open(k.sim.device_path("echo")) as dev, dev.channel() as free:
            free.receive(timeout=30)
            assert free.exchange(b"!lockfree", 30).data.lower() == b"!lockfree"
        caller.join(60)
    assert not caller.is_alive()


def test_a_reload_changes_the_rate_live(start_tenants: StartTenants, stubs: dict[str, Any]) -> None:
    """cat at one request each 10 s is refused her second; after a reload
    to 100 a second, 20 at once are all served within their deadline of
    1 s -- her bucket, empty at the old rate, fills at the new one, not in
    the 10 s the old rate's slot had left -- and a reload back to 0.1
    paces her again."""
    k = start_tenants(DEVICES + PACED)
    kup = stubs["stub"](k, "cat")
    ok, refused = _burst(kup, 2, 1.0)
    assert (ok, len(refused)) == (1, 1)

    def reload(rate: str) -> None:
        k.write_config(
            DEVICES
            + PACED.replace("requests_per_second = 0.1\n", f"requests_per_second = {rate}\n")
        )
        with k.admin() as adm:
            adm.reload()

    reload("100")
    ok, refused = _burst(kup, 20, 1.0)
    assert (ok, len(refused)) == (20, 0), [e.details() for e in refused]
    reload("0.1")
    wait_until(lambda: _burst(kup, 1, 1.0)[0] == 0, what="the old rate again")


@pytest.mark.parametrize("value", [-1, "fast", float("nan"), float("inf"), True, 0.0001])
def test_config_errors_name_the_key(value: object) -> None:
    t = {"name": "t", "socket": "/run/kupd/t/t.sock", "requests_per_second": value}
    with pytest.raises(ConfigError) as ei:
        parse_config({"device": [{"name": "echo"}], "tenant": [t]})
    assert ei.value.key == "tenant[name=t].requests_per_second", ei.value
    assert "must be" in str(ei.value), ei.value


def test_config_values_and_default(tmp_path: Path) -> None:
    """Absent: REQUESTS_PER_SECOND; 0: no limit; kupd's own tenants (the
    plain socket's default, admin) are not paced.  A bad value in a file
    is named with its file and line."""
    from kupd.policy import ADMIN, DEFAULT, REQUESTS_PER_SECOND  # the fix's: each test fails alone

    body = '[[device]]\nname = "echo"\n[[tenant]]\nname = "t"\nsocket = "/run/kupd/t/t.sock"\n'
    cfg = parse_config(tomllib.loads(body))
    assert cfg.tenants[0].requests_per_second == REQUESTS_PER_SECOND > 64
    for v in ("0", "2.5"):
        cfg = parse_config(tomllib.loads(body + f"requests_per_second = {v}\n"))
        assert cfg.tenants[0].requests_per_second == float(v)
    assert ADMIN.requests_per_second == DEFAULT.requests_per_second == 0.0
    path = tmp_path / "kupd.toml"
    path.write_text(body + "requests_per_second = -3\n")
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    assert f"{path}:6" in str(ei.value), ei.value
    assert "requests_per_second" in str(ei.value), ei.value
