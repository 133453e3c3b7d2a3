"""A message a user hands over just before it leaves reaches the module
(kupdev.h, kupdev_receive_msg: the next receive delivers it, the call after
it gets -EPIPE).  The core used to report the departure first, so a user
that sent its last request -- or the CLOSE libkup sends when it leaves
holding the turn -- and closed at once lost it to the race with its own
detach.  kupsim renews a channel's objects when its user leaves; it keeps
them while the module has yet to receive what the user left there, until
the module has, or a new user needs the channel.

Runs on the ASan+UBSan and TSan builds of kupsim and its modules, which
must exit 0 with no sanitizer report.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from kmod_util import variant_kupsim

from kupd.channel import Channel, Device, Kind
from kupd.errors import Releasing
from kupd.testing import wait_until

T = 30.0  # generous bound on every wait (sanitizer builds, shared CPUs)


def attach(dev: Device, chan: int) -> Channel:
    """Attach ``chan``, retrying while the module still lets go of its last
    user (kupsim answers EKU_RELEASING at once instead of waiting)."""
    deadline = time.monotonic() + T
    while True:
        try:
            return dev.channel(chan)
        except Releasing:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.001)


def test_close_is_received(variant_out: Path) -> None:
    """A user leaving while it holds the turn sends CLOSE: echo must see
    it ("user closed") every time, never the departure instead.  (The next
    user attaches only once it has: an attach before the module's receive
    is entitled to the channel, and the left message is then dropped.)"""
    n = 10  # within echo's log burst (20 session lines per 5 s)
    with variant_kupsim(variant_out, "echo", env={"KUP_PARAM_ECHO_CHANNELS": "2"}) as sim:
        with Device.open(sim.device_path("echo")) as dev:
            for i in range(n):
                with attach(dev, 0) as ch:
                    assert ch.receive(timeout=T).kind is Kind.PASS
                    assert ch.exchange(b"x%d" % i, T).data == b"x%d" % i
                # closed holding the turn: CLOSE, then the detach
                wait_until(
                    lambda i=i: sim.stderr().count("echo: chan 0: user closed") == i + 1,
                    timeout=T,
                    what=f"CLOSE {i + 1} received",
                )
        assert "chan 0: peer gone" not in sim.stderr(), sim.stderr()[-3000:]


def test_fire_and_forget_requests_are_received(variant_out: Path) -> None:
    """A user sends one request and closes without waiting for the answer:
    echo still counts every "!count" (its count is shared by all its
    channels).  One channel per user, so that no next user's attach comes
    before the module's receive (that one would be entitled to the
    channel: the left message is then dropped, as documented)."""
    fired = 15
    with variant_kupsim(variant_out, "echo", env={"KUP_PARAM_ECHO_CHANNELS": "16"}) as sim:
        with Device.open(sim.device_path("echo")) as dev:
            for c in range(fired):
                with attach(dev, c) as ch:
                    assert ch.receive(timeout=T).kind is Kind.PASS
                    ch.send(b"!count")
            with attach(dev, fired) as probe:
                assert probe.receive(timeout=T).kind is Kind.PASS
                asked = 0

                def counted_all() -> bool:
                    nonlocal asked
                    reply = probe.exchange(b"!count", T).data.decode()
                    asked += 1
                    m = re.fullmatch(r"!count (\d+) prev -?\d+", reply)
                    assert m is not None, reply
                    return int(m.group(1)) - asked == fired

                wait_until(counted_all, timeout=T, what=f"all {fired} requests counted")


def test_message_left_while_the_module_is_elsewhere(variant_out: Path) -> None:
    """The module is neither in a receive nor holding anything (hostile's
    "nap") when the user hands over its last message and leaves: kupsim
    must not renew the channel's memory under it before the module's next
    receive, which gets the message."""
    with variant_kupsim(variant_out, "hostile") as sim:
        with Device.open(sim.device_path("hostile")) as dev:
            ch = dev.channel(0)
            assert ch.receive(timeout=T).kind is Kind.PASS
            assert ch.exchange(b"nap", T).data == b"nap"
            ch.send(b"tellbye")
            ch.close()
            wait_until(
                lambda: "hostile: chan 0: told bye" in sim.stderr(),
                timeout=T,
                what="the message left behind received",
            )
            # and the channel is renewed for its next user, who gets a
            # working channel of its own
            with attach(dev, 0) as ch2:
                assert ch2.receive(timeout=T).kind is Kind.PASS
                assert ch2.exchange(b"hello", T).data == b"hello"


def test_next_user_is_not_kept_waiting_for_a_left_message(variant_out: Path) -> None:
    """A new user attaching the channel while the module has yet to receive
    what the last user left gets the channel at once, renewed (the left
    message is then dropped, as on the kernel hosts when the next user
    attaches first), not after the module got round to it."""
    with variant_kupsim(variant_out, "hostile") as sim:
        with Device.open(sim.device_path("hostile")) as dev:
            ch = dev.channel(0)
            assert ch.receive(timeout=T).kind is Kind.PASS
            assert ch.exchange(b"nap", T).data == b"nap"
            ch.send(b"tellgone")
            ch.close()
            # the module naps 500 ms: this attach comes first
            with dev.channel(0) as ch2:
                assert ch2.receive(timeout=T).kind is Kind.PASS
                assert ch2.exchange(b"hello", T).data == b"hello"
        assert "hostile: chan 0: told gone" not in sim.stderr(), sim.stderr()[-3000:]
