"""Watch: device appeared / channels announced (kupdev_notify) / leases /
device shutting down and gone, against a real kupsim started after kupd."""

from __future__ import annotations

import gc
import json
import os
import threading
from pathlib import Path

import pytest
from gateway_helpers import StartKupd, child_env, echo_sim, live_watch

from kupclient import Client, EventType, WatchEvent
from kupd import errors
from kupd.testing import Kupd, kupsim, wait_until


def until(events: object, want: EventType, seen: list[WatchEvent]) -> WatchEvent:
    for ev in events:  # type: ignore[attr-defined]
        seen.append(ev)
        if ev.type == want:
            return ev
    raise AssertionError(f"watch ended before {want}: {seen}")


def test_watch_sees_appear_notify_leases_and_device_shutdown(
    start_kupd: StartKupd, tmp_path: Path
) -> None:
    rundir = tmp_path / "sim"
    rundir.mkdir()
    env = child_env()
    env["KUPSIM_DIR"] = str(rundir)
    k = start_kupd(None, "--kupsim-dir", str(rundir), wait=False, env=env)
    assert k.wait_up() == "NOT_SERVING"  # configured device not there yet
    c = k.client()
    events = c.watch("echo", initial_state=True)
    seen: list[WatchEvent] = []
    first = next(events)
    assert first.type == EventType.DEVICE_GONE and first.initial
    # kupd must see the device, publish it and refuse an attach before the
    # announce: seconds of room on a loaded machine (kupd polls every 0.2 s)
    sim_env = dict(os.environ, KUP_PARAM_ECHO_ANNOUNCE_DELAY_MS="6000")
    with echo_sim(rundir=rundir, env=sim_env) as sim:
        appeared = until(events, EventType.DEVICE_APPEARED, seen)
        # kupd polls for the device every 0.2 s; the module announces after 6 s
        assert appeared.announced == 0
        with pytest.raises(errors.NotReady):  # EKU_NOTREADY before the announce
            c.open("echo").channel(10)
        announced = until(events, EventType.CHANNELS_ANNOUNCED, seen)
        assert announced.announced == 128 and announced.notify_gen > appeared.notify_gen
        ch = c.open("echo").channel(10)
        taken = until(events, EventType.LEASE_TAKEN, seen)
        assert (taken.channel, taken.holder, taken.lease_id) == (10, "session", ch.lease.lease_id)
        ch.close()
        released = until(events, EventType.LEASE_RELEASED, seen)
        assert released.lease_id == taken.lease_id and released.reason == "stream ended"
        lease = c.attach("echo", 11)
        assert until(events, EventType.LEASE_TAKEN, seen).holder == "lease"
        sim.signal(15)
        gone = until(events, EventType.DEVICE_GONE, seen)
        assert gone.device == "echo"
        types = [e.type for e in seen]
        assert EventType.DEVICE_SHUTTING_DOWN in types
        (shutting,) = [e for e in seen if e.type == EventType.DEVICE_SHUTTING_DOWN]
        assert shutting.reason == "module shutting down", seen
        # The held lease ended with the device.
        assert EventType.LEASE_RELEASED in types[types.index(EventType.LEASE_TAKEN, 3) :]
        with pytest.raises(errors.NotFound):
            c.lease_send(lease.lease_id, b"x")
        sim.wait()
    events.cancel()
    c.close()
    assert k.terminate() == 0


def test_watch_initial_state_lists_leases(start_kupd: StartKupd, tmp_path: Path) -> None:
    with echo_sim() as sim:
        k = start_kupd(sim)
        with k.client() as c:
            lease = c.attach("echo", 60)
            with c.watch(initial_state=True) as events:
                got = [next(events), next(events)]
            assert got[0].type == EventType.DEVICE_APPEARED and got[0].initial
            assert got[1].type == EventType.LEASE_TAKEN and got[1].lease_id == lease.lease_id
        assert k.terminate() == 0


def test_an_unload_is_announced_before_the_leases_it_ends(start_kupd: StartKupd) -> None:
    """kupsim unloads the module: a Session waiting on its channel wakes with
    the kernel's SHUTDOWN before kupd has read the device's state.  Watchers
    still see DEVICE_SHUTTING_DOWN first, then each lease released for the
    same reason, whether it was a Session or a lease."""
    import threading

    with echo_sim() as sim:
        k = start_kupd(sim)
        with k.client() as c:
            events = live_watch(c)
            seen: list[WatchEvent] = []
            ch = c.open("echo").channel(12)
            until(events, EventType.LEASE_TAKEN, seen)
            ch.receive(timeout=10)
            ch.send(b"!hold")  # never answered: the receive below waits in kupd
            lease = c.attach("echo", 13)
            until(events, EventType.LEASE_TAKEN, seen)
            failed: list[BaseException] = []

            def receive() -> None:
                try:
                    ch.receive(timeout=60)
                except BaseException as exc:
                    failed.append(exc)

            t = threading.Thread(target=receive, daemon=True)
            t.start()
            sim.signal(15)
            until(events, EventType.DEVICE_GONE, seen)
            t.join(30)
            events.cancel()
            ch.close()
            assert failed and isinstance(failed[0], errors.Shutdown), failed
            order = [(e.type, e.channel, e.reason) for e in seen[2:]]
            shutting = [i for i, e in enumerate(seen) if e.type == EventType.DEVICE_SHUTTING_DOWN]
            released = {e.channel: (i, e) for i, e in enumerate(seen)
                        if e.type == EventType.LEASE_RELEASED}
            assert shutting and set(released) == {12, 13}, order
            # one reason however kupd learnt it (the state, or a channel's mark)
            assert seen[shutting[0]].reason == "module shutting down", order
            assert all(i > shutting[0] for i, _ in released.values()), order
            assert released[12][1].reason == released[13][1].reason, order
            assert released[12][1].reason.startswith("device"), order
            with pytest.raises(errors.NotFound):
                c.lease_send(lease.lease_id, b"x")
        sim.wait()
    assert k.terminate() == 0
    # the Session that noticed the unload had the device re-read; what that
    # logged is the device's, not the Session's (request, rpc, lease ...)
    recs = [json.loads(ln) for ln in k.log().splitlines() if ln.startswith("{")]
    device_wide = [
        r for r in recs
        if r.get("event") in ("device shutting down", "device gone")
        or (r.get("event") == "lease released" and r.get("channel") == 13)
    ]
    assert len(device_wide) == 3, device_wide
    assert all("rpc" not in r and "request" not in r for r in device_wide), device_wide


def test_a_watch_started_during_an_unload_replays_the_shutdown(start_kupd: StartKupd) -> None:
    """A watcher that starts while a module is unloading gets the device's
    DEVICE_SHUTTING_DOWN in its initial-state replay, with the reason the
    live event had (hostile's "slowexit" keeps its unload in that state
    for 3 s)."""
    with kupsim("hostile", check_exit=False, ready_timeout=60.0) as sim:
        k = start_kupd(sim, devices=("hostile:0",))
        with k.client() as c:
            with c.open("hostile").channel(0) as ch:
                ch.receive(timeout=10)  # hostile passes the turn first
                assert ch.exchange(b"slowexit", timeout=10).data == b"slowexit"
            # subscribed before the unload starts: a plain watch() could be
            # registered after the live DEVICE_SHUTTING_DOWN went out
            live = live_watch(c, "hostile")
            seen: list[WatchEvent] = []
            sim.signal(15)
            shutting = until(live, EventType.DEVICE_SHUTTING_DOWN, seen)
            assert not shutting.initial
            with c.watch("hostile", initial_state=True) as events:
                first = next(events)
                assert first.type == EventType.DEVICE_APPEARED and first.initial, first
                replayed = next(events)
            live.cancel()
            assert replayed.type == EventType.DEVICE_SHUTTING_DOWN and replayed.initial, replayed
            assert replayed.reason == shutting.reason == "module shutting down", (replayed, seen)
            sim.wait()
        assert k.terminate() == 0



def _watch_readers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "kupclient-watch"]


@pytest.mark.parametrize("end", ["drop", "client-close"])
def test_a_main_thread_watchs_reader_ends_with_it_while_waiting_for_room(
    kupd: Kupd, client: Client, end: str
) -> None:
    """A main-thread watch's reader thread, blocked with an event in hand
    while the program does not read, ends when the Watch is dropped
    unended or its client closed -- not left waiting for room for the
    life of the process."""
    with Client(kupd.socket) as watcher:
        w = watcher.watch("echo", initial_state=True)
        assert next(w).initial  # subscribed
        assert len(_watch_readers()) == 1
        for _ in range(3):  # more than the buffer and the reader's hand
            client.release(client.attach("echo").lease_id)
        reader = w._responses
        assert reader is not None
        wait_until(lambda: len(reader._buf) == 1, what="the reader's buffer full")
        if end == "drop":
            del w
            gc.collect()
        else:
            watcher.close()  # the program not reading
        wait_until(lambda: not _watch_readers(), what="the watch's reader thread ended")
        if end == "client-close":
            # the close, not what the reader had read
            with pytest.raises(errors.InvalidArgument, match="was closed while"):
                for _ in w:
                    pass
