"""``kupctl stats``'s TENANT table: which tenant is being limited, and by
which rule, read from kupd's per-tenant metrics -- over the admin socket
and from the metrics endpoint, as text and as --json.

A real kupd with three tenants: ann is paced (requests_per_second) and
refused (a device not granted to her, a request that would wait beyond
kupd's pace limit); cid holds a Session and a lease, and her Session's
operations are paced (channel_ops_per_second: one each 2 s, after a burst
of one); ben does nothing that is limited.

The counts hold whatever the machine's speed: at 0.2 requests a second
ann's second request waits its ~5 s turn (not more: paced, served) and
her third, asked before that turn is over, would wait more than the 5 s
PACE_LIMIT (refused at once), in whichever order the two arrive."""

from __future__ import annotations

import json
import urllib.request
from concurrent.futures import Future
from typing import Any

import grpc
import pytest
from tenancy_helpers import DEVICES, OWNER, StartTenants, TenantKupd, run_module

from kupapi import kup_pb2, kup_pb2_grpc
from kupclient import errors
from kupd.testing import wait_until, with_metrics_port

TENANTS = f"""
[[tenant]]
name = "ann"
socket = "@DIR@/ann.sock"
owner = {OWNER}
requests_per_second = 0.2
max_connections = 4
[[tenant.grant]]
device = "echo"
channels = "4-7"

[[tenant]]
name = "cid"
socket = "@DIR@/cid.sock"
owner = {OWNER}
channel_ops_per_second = 0.5
[[tenant.grant]]
device = "echo"
channels = "12-15"

[[tenant]]
name = "ben"
socket = "@DIR@/ben.sock"
owner = {OWNER}
[[tenant.grant]]
device = "echo"
channels = "8-11"
"""

HEADER = [
    "TENANT", "SESSIONS", "LEASES", "CALLS_IN_FLIGHT", "CONNECTIONS", "DENIALS", "DENIED_BY",
    "OPS_PACED", "OPS_PACED_S", "REQUESTS_PACED", "REQUESTS_PACED_S",
]  # fmt: skip


def _stats(*args: str) -> str:
    p = run_module("kupclient.kupctl", "stats", *args)
    assert p.returncode == 0, p.stderr
    return p.stdout


def _tenant_table(text: str) -> dict[str, dict[str, str]]:
    """The TENANT table of ``kupctl stats``' text, by tenant."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.split()[:1] == ["TENANT"]), None)
    assert start is not None, f"no TENANT table in kupctl stats:\n{text}"
    head = lines[start].split()
    assert head == HEADER, head
    rows: dict[str, dict[str, str]] = {}
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        cells = line.split()
        rows[cells[0]] = dict(zip(head, cells, strict=True))
    return rows


def _limit_ann(k: TenantKupd) -> None:
    """ann: one Call to a device not granted (rule grant), one request
    paced under requests_per_second and one refused by it; ben: a Call."""
    with k.client("ann") as a:
        with pytest.raises(errors.PermissionDenied, match="rule grant"):
            a.call("rot13", b"not hers")
    with k.client("ben") as b:
        assert b.call("echo", b"ben's").data == b"ben's"
    with grpc.insecure_channel(f"unix:{k.sock('ann')}") as ch:
        stub: Any = kup_pb2_grpc.KupStub(ch)
        stub.ListDevices(kup_pb2.ListDevicesRequest(), timeout=30)  # the burst: at once
        paced: Future[Any] = stub.ListDevices.future(kup_pb2.ListDevicesRequest(), timeout=30)
        refused: Future[Any] = stub.ListDevices.future(kup_pb2.ListDevicesRequest(), timeout=30)
        with pytest.raises(grpc.RpcError) as exc:
            refused.result()
        assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.value
        assert "rule requests_per_second" in (exc.value.details() or ""), exc.value.details()
        paced.result()
        # the connection counts are gRPC's channelz, looked at every 2 s
        def counted() -> bool:
            rows = _tenant_table(_stats("--admin-socket", k.admin_socket))
            return (rows["ann"]["CONNECTIONS"], rows["ben"]["CONNECTIONS"]) == ("1/4", "0")

        wait_until(counted, what="ann's connection counted, ben's gone")


def test_stats_shows_who_is_limited(start_tenants: StartTenants) -> None:
    ports: list[int] = []

    def start(port: int) -> TenantKupd:
        ports.append(port)
        return start_tenants(f"metrics_port = {port}\n" + DEVICES + TENANTS)

    k = with_metrics_port(start)
    url = f"http://127.0.0.1:{ports[-1]}/metrics"
    _limit_ann(k)

    with k.client("cid") as c, c.open("echo").channel(12) as ch:
        lease = c.attach("echo", 13)
        ch.receive(timeout=30)  # the burst
        assert ch.exchange(b"cid's", timeout=30).data == b"cid's"  # waits its turn
        _check(k, url)
        c.release(lease.lease_id)


def _check(k: TenantKupd, url: str) -> None:
    rows = _tenant_table(_stats("--admin-socket", k.admin_socket))
    assert set(rows) == {"ann", "ben", "cid"}, rows  # the admin socket's "admin" is no tenant
    cid = rows["cid"]
    assert (cid["SESSIONS"], cid["LEASES"], cid["DENIALS"]) == ("1", "1", "0"), cid
    assert int(cid["OPS_PACED"]) >= 1 and float(cid["OPS_PACED_S"]) > 0, cid
    assert (cid["REQUESTS_PACED"], cid["REQUESTS_PACED_S"]) == ("0", "0"), cid
    ann, ben = rows["ann"], rows["ben"]
    assert ann["DENIALS"] == "2", ann
    assert set(ann["DENIED_BY"].split(",")) == {"grant=1", "requests_per_second=1"}, ann
    assert ann["REQUESTS_PACED"] == "1" and float(ann["REQUESTS_PACED_S"]) > 0, ann
    assert ann["OPS_PACED"] == "0" and ann["OPS_PACED_S"] == "0", ann
    assert (ann["SESSIONS"], ann["LEASES"], ann["CALLS_IN_FLIGHT"]) == ("0", "0", "0"), ann
    assert ben == {
        **dict.fromkeys(HEADER, "0"), "TENANT": "ben", "DENIED_BY": "-",
    }, ben  # fmt: skip

    # --json, over the admin socket and from the endpoint: the same rows
    for source in (["--admin-socket", k.admin_socket], ["--metrics", url]):
        doc = json.loads(_stats("--json", *source))
        by_name = {r["tenant"]: r for r in doc["tenants"]}
        assert set(by_name) == {"ann", "ben", "cid"}, doc["tenants"]
        c = by_name["cid"]
        assert (c["sessions"], c["leases"], c["requests_paced"]) == (1, 1, 0), c
        assert c["ops_paced"] >= 1 and c["ops_paced_seconds"] > 0, c
        a = by_name["ann"]
        assert a["denials"] == 2, a
        assert a["denials_by_rule"] == {"grant": 1, "requests_per_second": 1}, a
        assert a["requests_paced"] == 1 and a["requests_paced_seconds"] > 0, a
        assert a["connections_max"] == 4 and a["ops_paced"] == 0, a
        assert by_name["ben"] == {
            "tenant": "ben", "sessions": 0, "leases": 0, "calls_in_flight": 0,
            "connections": 0, "connections_max": None, "denials": 0, "denials_by_rule": {},
            "ops_paced": 0, "ops_paced_seconds": 0, "requests_paced": 0,
            "requests_paced_seconds": 0,
        }, by_name["ben"]  # fmt: skip
    # the endpoint's text has the same table
    assert set(_tenant_table(_stats("--metrics", url))) == {"ann", "ben", "cid"}
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert b'kupd_tenant_requests_paced_total{tenant="ann"} 1.0' in resp.read()
