"""A module thread's call on a channel another thread is in never waits for
it (kupdev.h, "Conventions"), so a zero-copy relay cannot deadlock.

echo's "!relayC" makes a worker forward the message it still holds to
channel C, then answer with what kupdev_send returned.  The core used to
hold a channel's lock for a worker's whole receive, and from its receive to
its unlock: the forward then waited for C's user to act (case 1 below) or
for C's worker to let go (case 2), and two relays forwarding to each other
deadlocked for good.

Runs on the ASan+UBSan and TSan builds of kupsim and echo, which must exit
0 with no sanitizer report.
"""

from __future__ import annotations

import threading
from pathlib import Path

from kmod_util import variant_kupsim

from kupd.channel import Channel, Device, Kind, Message
from kupd.testing import wait_until

T = 20.0  # generous bound: an answer comes in milliseconds, a hang never
EAGAIN, EBUSY = 11, 16


def test_relay_to_a_channel_whose_worker_waits_in_its_receive(variant_out: Path) -> None:
    with variant_kupsim(variant_out, "echo", env={"KUP_PARAM_ECHO_CHANNELS": "8"}) as sim:
        with Device.open(sim.device_path("echo")) as dev, dev.channel(2) as c, dev.channel(4) as a:
            assert c.receive(timeout=T).kind is Kind.PASS  # its worker now waits
            assert a.receive(timeout=T).kind is Kind.PASS
            # case 1: the user of C holds the turn: -EAGAIN, at once
            assert a.exchange(b"!relay2", T).data == b"!relay -%d" % EAGAIN
            # nothing reached C's user, whose worker still serves it
            assert c.exchange(b"still mine", T) == Message(b"still mine", Kind.DATA, 2)
            # case 2: C's worker holds its message (locked for up to 60 s)
            c.send(b"!lockhold60000")
            wait_until(
                lambda: "echo: chan 2: holding the channel locked" in sim.stderr(),
                timeout=T,
                what="C's worker holding its message",
            )
            assert a.exchange(b"!relay2", T).data == b"!relay -%d" % EBUSY
            a.exchange(b"!lockfree", T)  # ends C's hold
            assert c.receive(timeout=T).data == b"!lockhold60000"


def relay(go: threading.Barrier, got: dict[str, bytes], name: str, ch: Channel, to: int) -> None:
    """Once both are ready: ask ch's worker to forward to channel ``to``;
    record what ch's user receives next."""
    go.wait(timeout=T)
    ch.send(b"!relay%d" % to)
    got[name] = ch.receive(timeout=T).data


def test_relays_forwarding_to_each_other_never_hang(variant_out: Path) -> None:
    """Two users ask their workers to forward to each other's channel at
    the same moment, over and over: every answer comes (whatever it is:
    the forward went through, or was refused at once), nobody hangs.  A
    fresh pair of channels each round: a worker whose own answer was
    refused (its user got the other's forward instead) ends its session
    without a word, which costs that channel's next session a first call."""
    rounds = 20
    env = {"KUP_PARAM_ECHO_CHANNELS": str(2 * rounds)}
    with variant_kupsim(variant_out, "echo", env=env) as sim:
        with Device.open(sim.device_path("echo")) as dev:
            for i in range(rounds):
                cx, cy = 2 * i, 2 * i + 1
                with dev.channel(cx) as x, dev.channel(cy) as y:
                    assert x.receive(timeout=T).kind is Kind.PASS
                    assert y.receive(timeout=T).kind is Kind.PASS
                    got: dict[str, bytes] = {}
                    go = threading.Barrier(2)

                    ts = [
                        threading.Thread(target=relay, args=(go, got, "x", x, cy)),
                        threading.Thread(target=relay, args=(go, got, "y", y, cx)),
                    ]
                    for t in ts:
                        t.start()
                    for t in ts:
                        t.join(timeout=2 * T)
                        assert not t.is_alive(), "a relay hangs"
                    # the answer, or the other side's forward that went
                    # through before it (its own answer is then refused)
                    answers = {b"!relay 0", b"!relay -%d" % EAGAIN, b"!relay -%d" % EBUSY}
                    assert set(got) == {"x", "y"}, got
                    assert got["x"] in answers | {b"!relay%d" % cx}, got
                    assert got["y"] in answers | {b"!relay%d" % cy}, got
