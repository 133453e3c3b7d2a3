"""kupd itself stalled (SIGSTOP: a debugger, a suspended VM, a loop that
blocked): time it did not run is not idle time of the Attach leases.  A
lease in use, whose next request waits in the socket while kupd is
stopped, survives the stall; an idle one still expires.  Real kupd and
kupsim processes."""

from __future__ import annotations

import os
import signal
import time

import pytest
from gateway_helpers import StartKupd, live_watch

from kupclient import EventType, Kind
from kupd import errors
from kupd.testing import Background, KupSim, all_stopped, wait_until

IDLE = 2.0
#: how long kupd is kept stopped: well past IDLE
STALL = 2.5 * IDLE


def test_a_lease_in_use_survives_a_stall_of_kupd(sim: KupSim, start_kupd: StartKupd) -> None:
    k = start_kupd(sim, "--lease-idle-timeout", str(IDLE))
    with k.client() as c, live_watch(c) as events:
        lease = c.attach("echo", 50)
        assert next(events).type == EventType.LEASE_TAKEN
        assert c.lease_receive(lease.lease_id, timeout=10).kind == Kind.PASS
        assert c.lease_exchange(lease.lease_id, b"before", timeout=10).data == b"before"
        os.kill(k.pid, signal.SIGSTOP)
        try:
            wait_until(lambda: all_stopped(k.pid), what="kupd stopped")
            # the next request is sent while kupd is stopped: it waits in
            # the socket, its lease last used before the stall
            reply = Background(lambda: c.lease_exchange(lease.lease_id, b"during", timeout=60))
            time.sleep(STALL)  # the stall itself (not a bound on anything)
        finally:
            os.kill(k.pid, signal.SIGCONT)
        got = reply.outcome(60)
        assert not isinstance(got, BaseException), got
        assert got.data == b"during"
        # still the same lease, and it still expires once really idle
        ev = next(events)
        assert ev.type == EventType.LEASE_RELEASED and ev.reason == "expired", ev
        assert ev.lease_id == lease.lease_id
        with pytest.raises(errors.NotFound, match="expired"):
            c.lease_send(lease.lease_id, b"late")
