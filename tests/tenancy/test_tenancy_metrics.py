"""Per-tenant metrics on the opt-in loopback port: open Sessions and leases,
Calls in flight and policy denials by rule, each labelled with its tenant."""

from __future__ import annotations

import threading
import urllib.request

import pytest
from tenancy_helpers import DEVICES, LOCKHOLD, TENANTS, StartTenants, TenantKupd

from kupd import errors
from kupd.testing import echo_lock_holds, wait_until, with_metrics_port


def test_tenant_metrics(start_tenants: StartTenants) -> None:
    ports: list[int] = []

    def start(port: int) -> TenantKupd:
        ports.append(port)
        return start_tenants(f"metrics_port = {port}\n" + DEVICES + TENANTS)

    k = with_metrics_port(start)
    port = ports[-1]

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            body: bytes = r.read()
        return body.decode()

    with k.client("alice") as a, k.client("bob") as b:
        with pytest.raises(errors.PermissionDenied, match="rule channels"):
            a.open("echo").channel(20)
        ch = a.open("echo").channel(8)
        ch.receive()
        lease = a.attach("echo", 9)
        with pytest.raises(errors.PermissionDenied, match="rule ops"):
            b.open("echo").channel(10)
        done: list[object] = []
        holds = echo_lock_holds(k.sim)
        # bob's Call stays in flight until alice's channel says "!lockfree"
        t = threading.Thread(target=lambda: done.append(b.call("echo", LOCKHOLD, timeout=60)))
        t.start()
        try:
            wait_until(lambda: echo_lock_holds(k.sim) > holds, what="echo to hold bob's Call")
            wait_until(
                lambda: 'kupd_tenant_calls_in_flight{tenant="bob"} 1.0' in scrape(),
                timeout=20,
                what="bob's Call counted in flight",
            )
            body = scrape()
        finally:
            assert ch.exchange(b"!lockfree", timeout=30).data == b"!lockfree"  # channel 8: even
            t.join(30)
        assert done and not isinstance(done[0], Exception), done
        assert 'kupd_tenant_leases{holder="session",tenant="alice"} 1.0' in body, body
        assert 'kupd_tenant_leases{holder="lease",tenant="alice"} 1.0' in body, body
        assert 'kupd_tenant_denials_total{rule="channels",tenant="alice"} 1.0' in body, body
        assert 'kupd_tenant_denials_total{rule="ops",tenant="bob"} 1.0' in body, body
        ch.close()
        a.release(lease.lease_id)
    wait_until(
        lambda: (
            'kupd_tenant_leases{holder="session",tenant="alice"} 0.0' in scrape()
            and 'kupd_tenant_calls_in_flight{tenant="bob"} 0.0' in scrape()
            # a tenant with no lease reads 0, not a series gone stale
            and 'kupd_tenant_leases{holder="lease",tenant="carol"} 0.0' in scrape()
        ),
        timeout=20,
        what="the session and the Call gone from the metrics",
    )
