"""The example module kmod/examples/tally (README, "A second example"):
several channels sharing one total, served by one kupdev_receive_any
thread, and a "watch" the module answers only when another channel changes
the total.  Driven through the Python channel layer on kupsim built under
ASan+UBSan and TSan (the module's two threads and its mutex), through kupd
with the Python client, and built for Linux out of tree as docs/linux.md
builds a module of one's own."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest
from kmod_util import variant_kupsim

from kupd.channel import Device, Kind
from kupd.errors import DeadlineExceeded, NotReady, Shutdown
from kupd.testing import REPO_ROOT, channel_when_free, doc_block, in_background, kupd, kupsim

__all__: list[str] = []

T = 30.0  # bound of every wait that should end at once


def test_channels_share_the_total_and_a_watch_is_answered_by_the_next_change(
    variant_out: Path,
) -> None:
    env = {"KUP_PARAM_TALLY_CHANNELS": "3"}
    with variant_kupsim(variant_out, "tally", env=env) as sim:
        assert "tally: device tally ready (3 channels)" in sim.stderr()
        with Device.open(sim.device_path("tally")) as dev:
            a, b, w = dev.channel(0), dev.channel(1), dev.channel(2)
            for ch in (a, b, w):
                assert ch.receive(timeout=T).kind == Kind.PASS  # the server started it
            assert a.exchange(b"+5", timeout=T).data == b"total 5"
            assert b.exchange(b"-2", timeout=T).data == b"total 3"
            assert a.exchange(b"?", timeout=T).data == b"total 3"
            # bad input is answered, naming what was wrong; the session goes on
            assert b.exchange(b"12x", timeout=T).data == (
                b"error: not a number, ? or watch N (3 bytes)"
            )
            assert b.exchange(b"x", timeout=T).data == (
                b"error: not a number, ? or watch N (1 byte)"
            )
            assert b.exchange(b"9" * 16, timeout=T).data.startswith(b"error: not a number")
            assert b.exchange(b"+999999999999997", timeout=T).data == b"total 1000000000000000"
            assert b.exchange(b"+1", timeout=T).data == (
                b"error: adding 1 to 1000000000000000 would pass +-10^15"
            )
            assert b.exchange(b"-999999999999997", timeout=T).data == b"total 3"
            # the longest reply there is, whole (and within its buffer: ASan)
            assert b.exchange(b"-999999999999999", timeout=T).data == b"total -999999999999996"
            assert b.exchange(b"-4", timeout=T).data == b"total -1000000000000000"
            assert b.exchange(b"-999999999999999", timeout=T).data == (
                b"error: adding -999999999999999 to -1000000000000000 would pass +-10^15"
            )
            assert b.exchange(b"+1000000000000003", timeout=T).data.startswith(b"error: not")
            assert b.exchange(b"+999999999999999", timeout=T).data == b"total -1"
            assert b.exchange(b"4", timeout=T).data == b"total 3"

            # "watch 3": the module keeps the turn while the total is 3; the
            # answer comes with the change, made on another channel
            w.send(b"watch 3")
            assert a.exchange(b"+0", timeout=T).data == b"total 3"  # no change
            with pytest.raises(NotReady):
                w.receive(timeout=0)
            assert a.exchange(b"+4", timeout=T).data == b"total 7"
            assert w.receive(timeout=T).data == b"total 7"
            # a total the watcher has not seen is answered at once
            assert w.exchange(b"watch 3", timeout=T).data == b"total 7"
            assert w.exchange(b"watch x", timeout=T).data.startswith(b"error: not a number")

            # a watcher that leaves while the module holds its turn: the
            # channel's next user is served from the start
            w.send(b"watch 7")
            w.close()
            with dev.channel(2) as w2:
                assert w2.receive(timeout=T).kind == Kind.PASS
                assert w2.exchange(b"?", timeout=T).data == b"total 7"
                w2.send(b"watch 7")
                assert b.exchange(b"-1", timeout=T).data == b"total 6"
                assert w2.receive(timeout=T).data == b"total 6"

                # the module unloading wakes a watcher waiting in its receive
                w2.send(b"watch 6")
                waiting = in_background(lambda: w2.receive(timeout=T))
                sim.stop(timeout=60.0)
                assert isinstance(waiting.outcome(), Shutdown), waiting.outcome()
            a.close()
            b.close()
        assert "tally: device tally unloaded" in sim.stderr()


def test_users_come_and_go_on_every_channel_some_leaving_a_watch_owed(
    variant_out: Path,
) -> None:
    """Four users, one per channel, each attaching 50 times in a row: add 1,
    then leave, or leave with a watch owed (the module holding the turn),
    or give up on a watch's answer first.  Every session starts with the
    module's pass, every add is counted once, and the module's threads are
    clean under ASan and TSan.  (Without the second kupdev_pass on -EPIPE
    in start_fresh -- kupdev.h, "Sessions" -- a user after a watcher that
    left waits for its first message for ever: this test catches it.)"""
    rounds = 50

    def user(dev: Device, cid: int) -> None:
        for i in range(rounds):
            with channel_when_free(dev, cid) as ch:
                assert ch.receive(timeout=T).kind == Kind.PASS
                seen = ch.exchange(b"+1", timeout=T).data
                assert seen.startswith(b"total "), seen
                if i % 3 != 0:
                    ch.send(b"watch " + seen.split()[1])
                if i % 3 == 2:
                    with contextlib.suppress(DeadlineExceeded):
                        ch.receive(timeout=0.001)

    with variant_kupsim(variant_out, "tally") as sim, Device.open(sim.device_path("tally")) as dev:
        users = [in_background(lambda cid=cid: user(dev, cid)) for cid in range(4)]
        for u in users:
            assert u.outcome(timeout=300) is None
        with channel_when_free(dev, 0) as ch:
            assert ch.receive(timeout=T).kind == Kind.PASS
            assert ch.exchange(b"?", timeout=T).data == b"total %d" % (4 * rounds)


def test_served_by_kupd_calls_sessions_a_late_reply_and_the_unload() -> None:
    from kupclient import Client

    with (
        kupsim("tally") as sim,
        kupd(sim=sim, devices=("tally:1",)) as k,
        Client(str(k.socket)) as c,
    ):
        assert c.call("tally", b"+5", timeout=T).data == b"total 5"
        assert c.call("tally", b"five", timeout=T).data.startswith(b"error: not a number")
        with c.open("tally").channel() as ch:
            assert ch.receive(timeout=T).kind == Kind.PASS
            ch.send(b"watch 5")
            with pytest.raises(DeadlineExceeded):  # the reply is still owed
                ch.receive(timeout=0.2)
            assert c.call("tally", b"+2", timeout=T).data == b"total 7"
            assert ch.receive(timeout=T).data == b"total 7"

            # a Call the module answers late: DeadlineExceeded, and its pool
            # channel is quarantined until the module hands the turn back,
            # here when the Session changes the total
            with pytest.raises(DeadlineExceeded):
                c.call("tally", b"watch 7", timeout=0.3)
            assert ch.exchange(b"+1", timeout=T).data == b"total 8"
            assert c.call("tally", b"?", timeout=T).data == b"total 8"

            # the module unloads while the session waits for its watch
            ch.send(b"watch 8")
            waiting = in_background(lambda: ch.receive(timeout=T))
            sim.stop()
            assert isinstance(waiting.outcome(), Shutdown), waiting.outcome()


def test_builds_for_linux_out_of_tree_as_linux_md_says(tmp_path: Path) -> None:
    """The same source, with docs/linux.md's wrapper and Makefile (module
    name mymod), builds into a .ko against the kernel kup.ko is built for."""
    kdir = subprocess.run(
        ["make", "-s", "-C", "kmod/linux", "print-kdir"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    if kdir.returncode != 0 or not Path(kdir.stdout.strip()).is_dir():
        if os.environ.get("KUPD_REQUIRE_VM") == "1":
            pytest.fail(f"no kernel headers to build against: {kdir.stderr}")
        pytest.skip(f"no kernel headers to build against: {kdir.stderr.strip()}")
    subprocess.run(["make", "-s", "-C", "kmod/linux"], cwd=REPO_ROOT, timeout=600, check=True)
    src = (REPO_ROOT / "kmod/examples/tally/tally.c").read_text()
    (tmp_path / "mymod_core.c").write_text(src)
    (tmp_path / "mymod_linux.c").write_text(doc_block("docs/linux.md", "c", "module_init("))
    makefile = doc_block("docs/linux.md", "make", "obj-m")
    (tmp_path / "Makefile").write_text(
        makefile.replace("/path/to/kupd/kmod", str(REPO_ROOT / "kmod"))
    )
    proc = subprocess.run(["make"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "mymod.ko").is_file()
