"""Watch: device appeared / channels announced (kupdev_notify) / leases /
device shutting down and gone, against a real kupsim started after kupd."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from gateway_helpers import StartKupd, child_env, echo_sim

from kupclient import EventType, WatchEvent
from kupd import errors


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
