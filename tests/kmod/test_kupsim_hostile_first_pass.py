"""kmod/kupsim/hostile.c serves the next user after a session it gave up on.

A session the worker gave up on with an error other than -EPIPE, -EPROTO
or CLOSE (hostile's "oversize": the reply fails with -EMSGSIZE) is still in
progress for the core, so the next session's first call -- a new worker's
first PASS -- gets -EPIPE for it (kupdev.h, "Sessions").  hostile took that
-EPIPE for "no user" and stopped: the next user waited for its first PASS
for ever.  It now calls once more, as echo does.  Runs on the ASan+UBSan and
TSan builds (kupsim must exit 0 with no sanitizer report).
"""

from __future__ import annotations

import time
from pathlib import Path

from kmod_util import variant_kupsim

from kupd.channel import Channel, Device, Kind
from kupd.errors import Busy
from kupd.testing import wait_until

#: a PASS comes in milliseconds; a stranded user never gets it.  Generous
#: (sanitizer builds on a shared CPU), not a timing claim
PROMPT = 10.0


def attach(dev: Device, chan: int) -> Channel:
    """Attach ``chan``, retrying while its last user's detach is on its way."""
    deadline = time.monotonic() + PROMPT * 3
    while True:
        try:
            return dev.channel(chan)
        except Busy:  # (Releasing is a Busy)
            assert time.monotonic() < deadline, f"channel {chan} stays busy"
            time.sleep(0.01)


def test_the_next_user_is_served_after_a_session_given_up(variant_out: Path) -> None:
    with (
        variant_kupsim(variant_out, "hostile") as sim,
        Device.open(sim.device_path("hostile")) as dev,
    ):
        for round_ in range(2):
            with attach(dev, 1) as user:
                assert user.receive(timeout=PROMPT).kind is Kind.PASS
                user.send(b"oversize")
                wait_until(
                    lambda n=round_ + 1: (
                        sim.stderr().count("hostile: chan 1: worker ends (-90)") >= n
                    ),
                    timeout=PROMPT * 3,
                    what="hostile to give up on the session",
                )
            with attach(dev, 1) as nxt:
                first = nxt.receive(timeout=PROMPT)  # stranded before the fix
                assert first.kind is Kind.PASS and first.seq == 1, first
                assert nxt.exchange(b"next", PROMPT).data == b"next"
