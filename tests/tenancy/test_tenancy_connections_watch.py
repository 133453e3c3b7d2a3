"""A socket at its max_connections is reported (kupd.connections): gRPC
closes the connections over the cap as it accepts them and tells kupd
nothing, so kupd watches the connections open on each socket (gRPC's
channelz) and says when a capped socket is full -- the log, and the
kupd_connections / kupd_connections_max metrics."""

from __future__ import annotations

import json
from typing import Any

from tenancy_helpers import StartTenants, TenantKupd, hold_connection, hold_refused

from kupd.testing import wait_until

__all__: list[str] = []

BODY = """
[[device]]
name = "echo"
call_channels = 1

[[tenant]]
name = "capped"
socket = "@DIR@/capped.sock"
max_connections = 2
[[tenant.grant]]
device = "echo"

[[tenant]]
name = "open"
socket = "@DIR@/open.sock"
[[tenant.grant]]
device = "echo"
"""


def _lines(k: TenantKupd, event: str) -> list[dict[str, Any]]:
    recs = [json.loads(x) for x in k.log().splitlines() if x.startswith("{")]
    return [r for r in recs if str(r.get("event", "")).startswith(event)]


def _metrics(k: TenantKupd) -> str:
    with k.admin() as adm:
        return adm.metrics("kupd_connections")


def test_a_socket_at_its_max_connections_is_reported(start_tenants: StartTenants) -> None:
    k = start_tenants(BODY)
    capped = k.sock("capped")
    held = [hold_connection(capped), hold_connection(capped)]
    others = [hold_connection(k.sock("open")) for _ in range(3)]  # no cap: nothing to say
    try:
        wait_until(
            lambda: bool(_lines(k, "socket at max_connections")), what="the warning"
        )
        (line,) = _lines(k, "socket at max_connections")
        assert line["level"] == "warning", line
        assert line["tenant"] == "capped" and line["socket"] == capped, line
        assert (line["connections"], line["max_connections"]) == (2, 2), line
        assert "kupd cannot count those" in line["event"], line
        assert hold_refused(capped)  # what the warning is about
        text = _metrics(k)
        assert 'kupd_connections{tenant="capped"} 2.0' in text, text
        assert 'kupd_connections_max{tenant="capped"} 2.0' in text, text
        assert 'kupd_connections{tenant="open"} 3.0' in text, text
        assert 'kupd_connections_max{tenant="open"}' not in text, text
        held.pop().close()
        wait_until(
            lambda: bool(_lines(k, "socket under max_connections again")),
            what="the all-clear",
        )
        (clear,) = _lines(k, "socket under max_connections again")
        assert clear["tenant"] == "capped" and clear["connections"] == 1, clear
        # said once while it stayed there (the repeat is a minute away)
        assert len(_lines(k, "socket at max_connections")) == 1
        assert not _lines(k, "socket still at max_connections")
    finally:
        for s in held + others:
            s.close()
