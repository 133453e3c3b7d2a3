"""kupsim's socket server never waits for a channel the module holds.

Every attachment's end renews the channel's user-visible objects (a fresh
memfd and eventfds: test_kupsim_fresh_objects.py), which needs the channel
lock -- and a module thread holds that lock from its receive until
kupdev_unlock_channel.  The server is one thread serving every device, so
a renewal that waited for the lock stalled every attach, detach and info
request of every device for as long as the module held one channel.  Now
the renewal only tries the lock; a channel it could not renew yet is
"pending renewal": never handed out with its old objects, an ATTACH of its
id waits a bounded moment for the renewal and is then refused with
KUP_E_RELEASING (not KUP_E_BUSY: no other user holds it), an ATTACH of
any channel gets another free one, and the
renewal runs as soon as the module lets go (kmod/kupsim/kupsim_server.c).

The module holds a channel on command: echo's "!lockhold" keeps the channel
locked until "!lockfree" arrives on another channel (or a bound expires,
logged as "timed out"), so the tests prove the order of events by what
echo logs, never by timing: everything the other users did (on echo and on
the rot13 device) completed while the hold was still on, because the hold
ends only when the test says so.
Real kupsim processes (ASan+UBSan and TSan builds: exit 0, no report),
real sockets, kupsim's wire protocol and the turn protocol spoken by hand
(test_kupsim_fresh_objects.RawUser)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from kmod_util import (
    ANY,
    ATTACH_REPLY,
    E_OK,
    E_RELEASING,
    HDR,
    OP_ATTACH,
    variant_kupsim,
    wire_attach,
    wire_connect,
    wire_info,
    wire_req,
)
from test_kupsim_fresh_objects import (
    KIND_PASS,
    RawUser,
    assert_fresh_attachment,
    assert_no_protocol_errors,
    echo_env,
    memfd_inodes_open,
    wait_detached_on,
    wait_until,
)

from kupd.testing import KupSim, echo_lock_holds

__all__: list[str] = []

HELD = 4  # even: echo answers unchanged
RELEASER = 6
E_SHUTDOWN = 1001
# the hold's own bound: far beyond anything the test waits for, so it ends
# by "!lockfree" ("released") when the server behaves, and "timed out" only
# when something waited for it (the old server: then the ordering checks fail).
# echo's maximum, 60 s: the 20 rounds of attaches under TSan on a loaded
# machine must never come near it (20 s was the whole margin before).
HOLD = b"!lockhold60000"
HOLD_STARTED = f"echo: chan {HELD}: holding the channel locked"
HOLD_ENDED = f"echo: chan {HELD}: lock hold ended"


def start_hold(sim: KupSim, path: str) -> RawUser:
    """User A attaches HELD and sends "!lockhold": echo's worker keeps the
    channel locked from its receive on.  Returns A once echo says so."""
    a = RawUser(path, HELD)
    assert a.receive() == (KIND_PASS, b"")
    a.send(HOLD)
    wait_until(lambda: HOLD_STARTED in sim.stderr(), "echo to hold the channel")
    return a


def release_hold(sim: KupSim, path: str) -> None:
    """Another channel tells echo to end the hold; waits until it has."""
    r = RawUser(path, RELEASER)
    try:
        assert r.receive() == (KIND_PASS, b"")
        assert r.exchange(b"!lockfree") == b"!lockfree"
    finally:
        r.close()
    wait_until(lambda: HOLD_ENDED in sim.stderr(), "echo to end the hold")


def attach_cycle(path: str, chan: int) -> int:
    """Attach chan (or ANY) on a new connection and detach again; the id."""
    with wire_connect(path) as s:
        st, fds, msg = wire_attach(s, chan)
        for fd in fds:
            os.close(fd)
        assert st == E_OK and len(fds) == 3, (chan, st)
        chan_id: int = ATTACH_REPLY.unpack_from(msg)[2]
        return chan_id


def attach_status(path: str, chan: int) -> int:
    with wire_connect(path) as s:
        st, fds, _msg = wire_attach(s, chan)
        for fd in fds:
            os.close(fd)
        return st


def test_server_serves_while_module_holds_a_detached_channel(variant_out: Path) -> None:
    env = {**echo_env(), "KUP_PARAM_ROT13_CHANNELS": "4"}
    with variant_kupsim(variant_out, "echo", "rot13", env=env) as sim:
        path = sim.device_path("echo")
        rot13 = sim.device_path("rot13")
        probe = wire_connect(path)
        rot13_probe = wire_connect(rot13)
        a = start_hold(sim, path)
        ino_a = a.inode()
        try:
            a.detach()  # A leaves while echo holds the channel locked
            # the server answers INFO and sees the departure (the old server
            # sat in the renewal here until the hold ended)
            wait_detached_on(probe, HELD)
            for i in range(20):
                # another user attaches and detaches: a given channel (which
                # its own previous cycle left to be renewed) and any channel
                # (never the held one); INFO in between
                assert attach_cycle(path, 2) == 2, i
                got = attach_cycle(path, ANY)
                assert got != HELD, (i, got)
                _name, attached = wire_info(probe)
                # no user, and its module still holds it locked (INFO says
                # both: KUP_INFO_ATTACHED clear, KUP_INFO_MODULE_HOLDS set)
                assert attached[HELD] == 2
                # and another device's users are served as well
                assert attach_cycle(rot13, i % 4) == i % 4, i
                assert wire_info(rot13_probe)[0] == "rot13"
            # all of the above happened while echo still held the channel
            assert HOLD_ENDED not in sim.stderr(), sim.stderr()
            # the held channel is refused as still being released, not
            # handed out with the objects A still has, nor with a misleading
            # "another user holds it" or system error
            assert attach_status(path, HELD) == E_RELEASING
            assert HOLD_ENDED not in sim.stderr(), sim.stderr()
            assert HOLD_STARTED in sim.stderr()

            release_hold(sim, path)
            assert f"{HOLD_ENDED} (released)" in sim.stderr(), sim.stderr()

            # renewed once echo let go: the next user gets fresh objects
            b = RawUser(path, HELD, busy_timeout=30.0)
            try:
                assert ino_a not in memfd_inodes_open(sim.pid)
                # no attachment in between (gen + 1); A cannot reach B
                scribbler = assert_fresh_attachment(sim, a, ino_a, b, seed=3)
                for i in range(50):
                    payload = f"B {i} ".encode() * (1 + i)
                    scribbler.once()
                    assert b.exchange(payload) == payload, i
            finally:
                b.close()
        finally:
            a.close()
            probe.close()
            rot13_probe.close()
        assert_no_protocol_errors(sim)


def test_any_gets_another_channel_and_waits_for_the_last(variant_out: Path) -> None:
    """With two channels, one held: ANY gets the other one; with that one
    attached too, ANY is refused as still being released (the only one not
    attached is the held one) rather than handed the held one; after the
    hold ANY gets the renewed channel."""
    env = {**echo_env(), "KUP_PARAM_ECHO_CHANNELS": "2"}
    with variant_kupsim(variant_out, "echo", env=env) as sim:
        path = sim.device_path("echo")
        probe = wire_connect(path)
        a = RawUser(path, 0)
        try:
            assert a.receive() == (KIND_PASS, b"")
            a.send(HOLD)
            wait_until(lambda: echo_lock_holds(sim, 0) > 0, "echo to hold channel 0")
            ino_a = a.inode()
            a.detach()
            wait_detached_on(probe, 0)
            for i in range(10):
                assert attach_cycle(path, ANY) == 1, i
            other = RawUser(path, 1)
            try:
                assert other.receive() == (KIND_PASS, b"")
                assert attach_status(path, ANY) == E_RELEASING
                assert attach_status(path, 0) == E_RELEASING
                assert "echo: chan 0: lock hold ended" not in sim.stderr()
                # odd channel: echo upper-cases the answer
                assert other.exchange(b"!lockfree") == b"!LOCKFREE"
            finally:
                other.close()
            wait_until(
                lambda: "echo: chan 0: lock hold ended (released)" in sim.stderr(),
                "echo to end the hold",
            )
            wait_detached_on(probe, 1)
            # channel 1 is free again too, so hold it: ANY must find channel 0
            keep = RawUser(path, 1)
            try:
                deadline = time.monotonic() + 30
                while True:
                    with wire_connect(path) as s:
                        st, fds, msg = wire_attach(s, ANY)
                        try:
                            if st == E_OK:
                                assert ATTACH_REPLY.unpack_from(msg)[2] == 0
                                assert os.fstat(fds[0]).st_ino != ino_a
                                break
                            assert st == E_RELEASING, st
                        finally:
                            for fd in fds:
                                os.close(fd)
                    assert time.monotonic() < deadline, "channel 0 never renewed"
                    time.sleep(0.02)
            finally:
                keep.close()
        finally:
            a.close()
            probe.close()
        assert_no_protocol_errors(sim)


def test_unload_with_a_renewal_pending(variant_out: Path) -> None:
    """SIGTERM while the module holds a detached channel and a user waits
    for that channel: the waiting user gets an answer or the end of its
    connection (never a hang), and kupsim exits 0 without a sanitizer
    report (variant_kupsim: no leak, no use after free, no race)."""
    with variant_kupsim(variant_out, "echo", env=echo_env()) as sim:
        path = sim.device_path("echo")
        probe = wire_connect(path)
        a = start_hold(sim, path)
        try:
            a.detach()
            wait_detached_on(probe, HELD)
            waiter = wire_connect(path)
            try:
                waiter.send(wire_req(OP_ATTACH, HELD))
                sim.stop(timeout=60.0)
                try:
                    reply = waiter.recv(4096)
                except (TimeoutError, ConnectionResetError) as e:
                    raise AssertionError(f"no answer for the waiting attach: {e!r}") from e
                if reply:
                    _op, st = HDR.unpack_from(reply)
                    assert st in (E_RELEASING, E_SHUTDOWN), st
            finally:
                waiter.close()
            log = sim.stderr()
            assert HOLD_STARTED in log
            assert f"{HOLD_ENDED} (unloading)" in log, log
        finally:
            a.close()
            probe.close()
