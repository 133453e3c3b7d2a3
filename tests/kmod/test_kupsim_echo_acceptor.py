"""echo's acceptor is never stalled by one user (kmod/examples/echo/echo.c,
struct echo_slot).

A user attaches channel c, closes it and attaches c again at once, keeping
it.  The worker echo started for the first attachment may not have made
its first call yet; that call then serves the second attachment (kupdev.h,
"Sessions"); echo's start_delay_ms makes that certain (every new worker
sleeps before its first call, as on a loaded machine).  echo's one
acceptor used to hear of the second attachment and join that worker --
which serves the user for as long as the user likes --
so no other channel's user got its first PASS meanwhile.  Here a second
channel must get its PASS promptly while every re-attached channel is held,
round after round; then the held channels still work.

Runs on the ASan+UBSan and TSan builds of kupsim and echo (the acceptor and
the workers share each slot's running/again state), which must exit 0 with
no sanitizer report.
"""

from __future__ import annotations

import time
from pathlib import Path

from kmod_util import variant_kupsim

from kupd.channel import Channel, Device, Kind
from kupd.errors import Releasing

ROUNDS = 3
HELD = 4  # channels attached, closed and re-attached per round
PROBE = 7  # the channel that must get its PASS meanwhile
#: a PASS comes in milliseconds; the acceptor stalled never sends it.  A
#: generous bound (sanitizer builds on a shared CPU), not a timing claim
PROMPT = 10.0


def attach(dev: Device, chan: int) -> Channel:
    """Attach ``chan``, retrying while echo still lets go of its last user
    (kupsim answers EKU_RELEASING at once instead of waiting)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return dev.channel(chan)
        except Releasing:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.001)


def test_a_held_reattach_does_not_stall_other_channels(variant_out: Path) -> None:
    env = {"KUP_PARAM_ECHO_CHANNELS": "8", "KUP_PARAM_ECHO_START_DELAY_MS": "300"}
    with variant_kupsim(variant_out, "echo", env=env) as sim, Device.open(
        sim.device_path("echo")
    ) as dev:
        for rnd in range(ROUNDS):
            held = []
            for c in range(HELD):
                attach(dev, c).close()  # its worker sleeps 300 ms first
                held.append(attach(dev, c))
            with attach(dev, PROBE) as probe:
                t0 = time.monotonic()
                first = probe.receive(timeout=PROMPT)
                assert first.kind is Kind.PASS, (rnd, first)
                assert probe.exchange(b"probe", PROMPT).data.lower() == b"probe"
                waited = time.monotonic() - t0
                assert waited < PROMPT, (rnd, waited)
            for c, ch in enumerate(held):  # every held one is served too
                assert ch.receive(timeout=PROMPT).kind is Kind.PASS, (rnd, c)
                assert ch.exchange(b"x%d" % c, PROMPT).data.lower() == b"x%d" % c
                ch.close()
        # the worker's re-pass after the held user left finds nobody: an
        # expected -EPIPE, not logged as a failure
        assert "first pass failed" not in sim.stderr(), sim.stderr()[-3000:]
