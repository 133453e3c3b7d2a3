"""What kupclient keeps of the receives its caller gave up on.

Each lease receive given up on (interrupted, cancelled, past its deadline)
leaves its name for the lease's next receive to ask for again (again_of,
see test_gw_receive_reply_dropped.py).  A lease never used again -- ended
by kupd (expired, revoked), or simply not released -- kept its entry for
the client's life: a long-lived client polling many leases with timeouts
grew without bound.  It keeps at most kupclient._again.AGAIN_KEPT (1024),
the oldest forgotten.
"""

from __future__ import annotations

import asyncio

import pytest

from kupclient import AsyncClient, Client, Kind
from kupd import errors


def test_the_sync_client_keeps_a_bounded_number_of_names(client: Client) -> None:
    for i in range(3000):
        client._receive_given_up(f"lease{i}", f"receive{i}", None)
    assert len(client._again) <= 1024
    # the newest are kept
    assert client._again.pending("lease2999") == "receive2999"
    assert client._again.pending("lease0") == ""


def test_the_asyncio_client_keeps_a_bounded_number_of_names(client: Client) -> None:
    async def main() -> None:
        async with AsyncClient(client.path) as c:
            for i in range(3000):
                await c._receive_given_up(f"lease{i}", f"receive{i}", None)
            assert len(c._again) <= 1024
            assert c._again.pending("lease2999") == "receive2999"

    asyncio.run(main())



def test_a_receive_that_found_nothing_keeps_the_name_given_up_on(client: Client) -> None:
    """A non-blocking receive answered NotReady may not have run at all
    (kupd answers one at once while another operation holds the lease --
    the one given up on, still under way in kupd, may write its reply
    yet): the name given up on stays for the lease's next receive."""
    lease = client.attach("echo")
    try:
        assert client.lease_receive(lease.lease_id, timeout=30).kind == Kind.PASS
        client.lease_send(lease.lease_id, b"!hold")  # never answered
        # given up on (kupd's deadline, here): its name is kept
        with pytest.raises(errors.DeadlineExceeded):
            client.lease_receive(lease.lease_id, timeout=0.2)
        name = client._again.pending(lease.lease_id)
        assert name
        with pytest.raises(errors.NotReady):
            client.lease_receive(lease.lease_id, timeout=0)
        assert client._again.pending(lease.lease_id) == name
    finally:
        client.release(lease.lease_id)
