"""kupd's "lease taken" / "lease released" lines have a per-tenant budget
(kupd.sessions.LEASE_LINES_*): a client that attaches and releases in a
loop, within every limit, wrote two info lines per lease -- about
300 KiB/s of log from one tenant.  Past the budget the lines are counted,
and the next one written says how many were left out, so that the log
still accounts for every lease.  Real kupd + kupsim (echo module)."""

from __future__ import annotations

import json
import time

from gateway_helpers import Kupd

from kupclient import Client
from kupd.sessions import LEASE_LINES_BURST, LEASE_LINES_PER_SECOND

__all__: list[str] = []


def _lease_lines(kupd: Kupd) -> list[dict[str, object]]:
    out = []
    for line in kupd.log().splitlines():
        if '"lease taken"' in line or '"lease released"' in line:
            out.append(json.loads(line))
    return out


def test_lease_lines_are_budgeted_and_account_for_every_lease(
    kupd: Kupd, client: Client
) -> None:
    n = int(LEASE_LINES_BURST) * 2  # twice the burst in leases: four times in lines
    t0 = time.monotonic()
    for _ in range(n):
        client.release(client.attach("echo").lease_id)
    elapsed = time.monotonic() - t0
    time.sleep(0.5)  # the budget refills: the next lines are written
    client.release(client.attach("echo").lease_id)
    want = 2 * (n + 1)
    deadline = time.monotonic() + 30
    while True:  # until kupd's output reached the file
        lines = _lease_lines(kupd)
        left_out = sum(int(str(x.get("unlogged_before", 0))) for x in lines)
        if len(lines) + left_out >= want or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if 2 * n > LEASE_LINES_BURST + LEASE_LINES_PER_SECOND * elapsed + 1:
        # more lines than the budget allowed in that time
        assert left_out > 0, "no line was left out: the loop was not budgeted"
    assert len(lines) < want
    # every lease's two lines: written, or counted in a later line's unlogged_before
    assert len(lines) + left_out == want, (len(lines), left_out)
    assert all(x["tenant"] == "default" for x in lines)
