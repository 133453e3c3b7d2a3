"""kup_module.h's mutex as kupsim implements it: an error-checking mutex
that logs a module's misuse -- a second lock by its holder, an unlock of an
unlocked mutex, a free of a locked one -- naming the mutex, where a kernel
would hang or panic; and the module goes on serving.  (Its correct use,
shared state across channels, is echo's "!count": tests/kupd/test_channel.py
and, on Linux, tests/vm/guest_channel.py.)"""

from __future__ import annotations

import os

from kupd.channel import Device, Kind
from kupd.testing import kupsim, wait_until

T = 20.0


def test_mutex_misuse_is_logged_not_a_hang() -> None:
    env = {**os.environ, "KUP_PARAM_HOSTILE_MUTEX_MISUSE": "1"}
    with kupsim("hostile", env=env) as sim:
        want = (
            "kupsim: mutex hostile-m: lock: Resource deadlock avoided (a module bug: "
            "a kernel would hang here)",
            "kupsim: mutex hostile-m: unlock: Operation not permitted (a module bug: "
            "not held by this thread)",
            "kupsim: mutex hostile-m: free: Device or resource busy (a module bug: "
            "still locked; not freed)",
            # a robust mutex: the next locker is told, where it would hang
            "kupsim: mutex hostile-dead: lock: the thread that held it exited without "
            "unlocking it (a module bug: a kernel would hang here); taken over",
        )
        wait_until(lambda: all(w in sim.stderr() for w in want), timeout=T,
                   what="the four misuses logged")
        # each once: the module's init went on, and so does the device
        for w in want:
            assert sim.stderr().count(w) == 1, sim.stderr()
        with Device.open(sim.device_path("hostile")) as dev, dev.channel(0) as ch:
            assert ch.receive(timeout=T).kind is Kind.PASS
            ch.send(b"fine")
            assert ch.receive(timeout=T).data == b"fine"


def test_no_misuse_no_log() -> None:
    with kupsim("hostile") as sim:
        assert "kupsim: mutex" not in sim.stderr()


def test_a_channel_held_at_unload_is_named() -> None:
    """A module thread that ended between kupdev_receive and
    kupdev_unlock_channel lost its channel to users for good; kupdev_unload
    names it (nothing else did), and the unload goes on."""
    with kupsim("hostile") as sim:
        with Device.open(sim.device_path("hostile")) as dev, dev.channel(2) as ch:
            assert ch.receive(timeout=T).kind is Kind.PASS
            ch.send(b"leaklock")
            wait_until(
                lambda: "hostile: chan 2: worker ends holding the channel" in sim.stderr(),
                timeout=T,
                what="the worker ended",
            )
    assert (
        "kup: hostile: chan 2: still held by a module thread at unload "
        "(kupdev_receive without kupdev_unlock_channel: a module bug; users could not "
        "attach it)"
    ) in sim.stderr(), sim.stderr()
    assert "chan 0: still held" not in sim.stderr()
