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
from kupd.testing import KupSim, wait_until

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
        # expected -EPIPE, not logged as a failure (and on a loaded machine
        # a worker may wake after its user came and went: "user gone")
        assert "first pass failed" not in sim.stderr(), sim.stderr()[-3000:]


def _given_up(sim: KupSim, dev: Device, chan: int, msg: bytes) -> Channel:
    """A user of ``chan`` whose session echo gives up on: "!oversize" makes
    the worker's reply fail with -EMSGSIZE, an error that does not end the
    session for the core (the user is still there, the core still counts
    the session as in progress).  Returns that user, still attached, once
    echo has taken the message."""
    user = attach(dev, chan)
    assert user.receive(timeout=PROMPT).kind is Kind.PASS
    user.send(msg)
    wait_until(
        lambda: f"echo: chan {chan}: oversize reply in" in sim.stderr(),
        timeout=PROMPT * 3,
        what=f"echo to take the message on channel {chan}",
    )
    return user


def _served(dev: Device, chan: int) -> None:
    """The channel's next user gets its first PASS and its answers."""
    with attach(dev, chan) as nxt:
        assert nxt.receive(timeout=PROMPT).kind is Kind.PASS, chan
        assert nxt.exchange(b"next%d" % chan, PROMPT).data.lower() == b"next%d" % chan


def test_the_next_user_is_served_after_a_session_given_up(variant_out: Path) -> None:
    """A session echo's worker gave up on (an error other than -EPIPE,
    -EPROTO or CLOSE) is still in progress for the core, so the next
    session's first call -- the PASS of a new worker, or the re-pass of
    this one when the acceptor flagged a new attach meanwhile -- gets
    -EPIPE for it (the straggler rule, kupdev.h "Sessions").  echo took that
    -EPIPE for "no user" and stopped: the next user waited for its first
    PASS for ever.  Both ways, the next user must be served.

    Channel 2: the user leaves after the reply failed (the worker, flagged
    or not, is done with the session: a new worker's first PASS, or its own
    re-pass).  Channel 4: the user leaves and the next one attaches while
    the worker still sleeps before its failing reply (the acceptor flags
    "again"; the worker's re-pass after the failure).  Which of the two
    happens on a loaded machine may vary; every one of them must serve."""
    env = {"KUP_PARAM_ECHO_CHANNELS": "8"}
    with variant_kupsim(variant_out, "echo", env=env) as sim, Device.open(
        sim.device_path("echo")
    ) as dev:
        user = _given_up(sim, dev, 2, b"!oversize")
        wait_until(
            lambda: "echo: chan 2: oversize reply: -90" in sim.stderr(),
            timeout=PROMPT * 3,
            what="the failed reply",
        )
        user.close()
        _served(dev, 2)

        user = _given_up(sim, dev, 4, b"!oversize1000")
        user.close()
        _served(dev, 4)
        assert "echo: chan 4: oversize reply: -90" in sim.stderr(), sim.stderr()[-3000:]
        # and the channels go on working, session after session
        _served(dev, 2)
        _served(dev, 4)
