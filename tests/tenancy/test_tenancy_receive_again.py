"""again_of across a receive refused before it ran.

A client that gave up on a lease receive after kupd wrote its reply names
it in the lease's next receive (``again_of``), and kupd answers with the
same message.  But the next receive may itself never run: refused by the
tenant's channel_ops_per_second before it took the lease, as here (or
interrupted while gRPC started it, its connection lost).  kupd then still
keeps the first one's message, and the receive after must name the first
one still: kupclient named the refused one instead, and lost the message
(the lease's next receive was NotYourTurn "already received").

Real kupsim (echo), kupd with a paced tenant, the stalling proxy (h2stall)
holding kupd's status after its reply; real clients.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator

import pytest
from tenancy_helpers import DEVICES, StartTenants, TenantKupd

from kupclient import AsyncClient, Kind, errors
from kupd.testing import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "tests" / "gateway"))

from h2stall import StallProxy

__all__: list[str] = []

#: one operation each 4 s (kupd refuses a wait beyond 5 s): the receive
#: after the first is refused at once (non-blocking: it would wait), the one
#: after it waits its turn
BODY = (
    DEVICES
    + """
[[tenant]]
name = "slow"
socket = "@DIR@/slow.sock"
channel_ops_per_second = 0.25
[[tenant.grant]]
device = "echo"
"""
)


@pytest.fixture
def k(start_tenants: StartTenants) -> TenantKupd:
    return start_tenants(BODY)


@pytest.fixture
def proxy(k: TenantKupd) -> Iterator[StallProxy]:
    p = StallProxy(str(k.dir / "stall.sock"), k.sock("slow"))
    yield p
    p.close()


def test_a_receive_refused_before_it_ran_leaves_the_one_given_up_on_named(
    k: TenantKupd, proxy: StallProxy
) -> None:
    with k.client("slow") as direct:  # the proxy stalls the first reply only
        lease = direct.attach("echo")  # not paced; echo greets with a PASS

    async def main() -> None:
        async with AsyncClient(proxy.path) as c:
            task = asyncio.ensure_future(c.lease_receive(lease.lease_id, timeout=30))
            while not proxy.status_held.is_set():
                assert not task.done(), task
                await asyncio.sleep(0.02)
            task.cancel()  # kupd wrote the PASS; gRPC drops it with the call
            with pytest.raises(asyncio.CancelledError):
                await task
            # the call was cancelled (the reset reaches the proxy in its time)
            assert await asyncio.to_thread(proxy.reset_seen.wait, 60)
            # refused before it ran: kupd still keeps the PASS for the first
            with pytest.raises(errors.ResourceExhausted, match="channel_ops_per_second"):
                await c.lease_receive(lease.lease_id, timeout=0)
            # waits its turn (4 s), and names the first one still
            got = await c.lease_receive(lease.lease_id, timeout=60)
            assert got.kind == Kind.PASS
            await c.release(lease.lease_id)

    asyncio.run(main())
