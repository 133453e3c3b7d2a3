"""kupd keeps a lease's channel fd registered between waits
(kupd.waiting.ChannelWaiter) and unregisters it when it polls readable with
nobody waiting -- e.g. the late wake-up a spin-caught reply leaves behind,
or a reply arriving while the client has not asked for it yet: after many
exchanges and such a reply, kupd must go quiet (no event loop spinning on a
readable fd) and lose no message.  Real kupd + kupsim (echo module)."""

from __future__ import annotations

import os
import time

from gateway_helpers import Kupd

from kupclient import Client, Kind

#: seconds of idle watched; a loop spinning on a readable fd burns about all of it
WATCH = 2.0


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime + stime
    return ticks / os.sysconf("SC_CLK_TCK")


def _idle_cpu(pid: int) -> float:
    t0 = _cpu_seconds(pid)
    time.sleep(WATCH)
    return _cpu_seconds(pid) - t0


def test_quiet_after_exchanges_and_no_message_lost(kupd: Kupd, client: Client) -> None:
    with client.open("echo").channel(10) as ch:
        assert ch.receive(timeout=10).kind == Kind.PASS
        for i in range(300):  # spins that catch the reply, and waits that do not
            assert ch.exchange(b"m%d" % i, timeout=10).data == b"m%d" % i
        ch.send(b"late")  # the reply comes while nobody waits for it in kupd
        time.sleep(0.5)
        used = _idle_cpu(kupd.pid)
        assert used < WATCH / 2, f"kupd used {used:.2f} s of CPU in {WATCH} s idle"
        reply = ch.receive(timeout=10)
        assert (reply.kind, reply.data) == (Kind.DATA, b"late")
        # a pass and an exchange after it still work
        ch.pass_()
        assert ch.receive(timeout=10).kind == Kind.PASS
        assert ch.exchange(b"after", timeout=10).data == b"after"
    used = _idle_cpu(kupd.pid)
    assert used < WATCH / 2, f"kupd used {used:.2f} s of CPU in {WATCH} s idle"
