"""A device host that is slow to answer (kupsim behind tests/faults/
simproxy.py, which delays one kind of request): kupd's event loop must
go on serving everything else, must not spin, and a drain that begins
while an attach waits for the host must not hand out a lease."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from gateway_helpers import Kupd, StartKupd, echo_sim
from simproxy import OP_ATTACH, OP_WATCH, SimProxy, proxy_dir

from kupd import errors
from kupd.testing import KupSim, wait_until


def _behind_proxy(
    start_kupd: StartKupd, sim: KupSim, tmp_path: Path
) -> tuple[SimProxy, Kupd]:
    """kupd serving echo (no Call pool) through a proxy in front of ``sim``."""
    pdir, proxy = proxy_dir(tmp_path, sim.rundir)
    real = sim.rundir
    sim.rundir = pdir  # kupd's --kupsim-dir: the proxy's
    try:
        k = start_kupd(sim, devices=("echo:0",))
    finally:
        sim.rundir = real
    return proxy, k


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_host_slow_to_answer_watch_does_not_freeze_kupd(
    tmp_path: Path, start_kupd: StartKupd
) -> None:
    """Re-opening a device subscribes to its events (kupsim: a WATCH round
    trip); a host slow to answer it must not hold up RPCs that do not
    touch that device."""
    delay = 4.0
    with echo_sim() as sim:
        proxy, k = _behind_proxy(start_kupd, sim, tmp_path)
        try:
            with k.client() as c:
                assert c.devices("echo")[0].reachable
                proxy.delay[OP_WATCH] = delay
                watches = proxy.count(OP_WATCH)
                took: list[float] = []
                stop = threading.Event()

                def ping() -> None:
                    while not stop.is_set():
                        t0 = time.monotonic()
                        try:
                            c.attach("nosuch")
                        except errors.NotFound:
                            pass
                        took.append(time.monotonic() - t0)
                        time.sleep(0.02)

                t = threading.Thread(target=ping)
                t.start()
                try:
                    time.sleep(0.3)
                    proxy.drop_all()  # kupd sees the device gone, opens it again
                    wait_until(
                        lambda: proxy.count(OP_WATCH) > watches,
                        timeout=30,
                        what="kupd re-opening the device (its WATCH)",
                    )
                    time.sleep(delay + 1.0)
                finally:
                    stop.set()
                    t.join(30)
                # a loaded machine stalls a round trip now and then, never
                # for the host's whole delay
                assert max(took) < delay / 2, (
                    f"an RPC on no device took {max(took):.2f} s while kupd re-opened a "
                    f"device whose host answers WATCH in {delay} s"
                )
        finally:
            proxy.close()


def test_a_device_event_during_a_slow_attach_does_not_spin(
    tmp_path: Path, start_kupd: StartKupd
) -> None:
    """The device's event fd stays readable until an INFO drains it, which
    waits behind an attach in progress: kupd must not spin meanwhile."""
    hold = 3.0
    with echo_sim() as sim:
        proxy, k = _behind_proxy(start_kupd, sim, tmp_path)
        try:
            assert proxy.watchers, "kupd subscribed to the device's events"
            with k.client() as c:
                proxy.delay[OP_ATTACH] = hold
                out: list[object] = []

                def attach() -> None:
                    try:
                        out.append(c.attach("echo", 5))
                    except errors.KupError as exc:
                        out.append(exc)

                t = threading.Thread(target=attach)
                t.start()
                time.sleep(0.5)  # the attach holds the device now
                cpu0, t0 = _cpu_seconds(k.pid), time.monotonic()
                proxy.inject_event()  # as kupsim sends when a module announces
                time.sleep(hold - 1.0)
                used = _cpu_seconds(k.pid) - cpu0
                wall = time.monotonic() - t0
                t.join(30)
                proxy.delay.clear()
                assert used < 0.3 * wall, (
                    f"kupd used {used:.2f} s of CPU in {wall:.2f} s after one device event "
                    "while an attach held the device"
                )
                # the event was acted on once the attach was done: kupd
                # still serves the device (the attach itself was answered)
                assert len(out) == 1
                assert c.devices("echo")[0].reachable
        finally:
            proxy.close()


def test_an_attach_in_flight_when_kupd_drains_gets_no_lease(
    tmp_path: Path, start_kupd: StartKupd
) -> None:
    """SIGTERM while an Attach waits for the host: the Attach ends with
    Shutdown (the lease it would have had is ended, not handed out)."""
    with echo_sim() as sim:
        proxy, k = _behind_proxy(start_kupd, sim, tmp_path)
        try:
            with k.client() as c:
                proxy.delay[OP_ATTACH] = 0.8
                attaches = proxy.count(OP_ATTACH)
                out: list[object] = []

                def attach() -> None:
                    try:
                        out.append(c.attach("echo", 3))
                    except errors.KupError as exc:
                        out.append(exc)

                t = threading.Thread(target=attach)
                t.start()
                wait_until(lambda: proxy.count(OP_ATTACH) > attaches, what="the host's ATTACH")
                k.proc.send_signal(signal.SIGTERM)
                t.join(30)
                assert len(out) == 1
                assert isinstance(out[0], errors.Shutdown), out[0]
            assert k.proc.wait(30) == 0
        finally:
            proxy.close()
