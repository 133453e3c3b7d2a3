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
from simproxy import OP_ATTACH, OP_INFO, OP_WATCH, SimProxy, proxy_dir

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


def test_a_device_event_while_the_host_is_slow_to_answer_info_does_not_spin(
    tmp_path: Path, start_kupd: StartKupd
) -> None:
    """The device's event fd stays readable until an INFO drains it: while
    the host is slow to answer that INFO, kupd must not spin on the fd."""
    hold = 3.0
    with echo_sim() as sim:
        proxy, k = _behind_proxy(start_kupd, sim, tmp_path)
        try:
            assert proxy.watchers, "kupd subscribed to the device's events"
            proxy.delay[OP_INFO] = hold  # the host is slow to answer INFO
            time.sleep(0.5)  # a health round's INFO is held up now
            cpu0, t0 = _cpu_seconds(k.pid), time.monotonic()
            proxy.inject_event()  # as kupsim sends when a module announces
            time.sleep(hold - 1.0)
            used = _cpu_seconds(k.pid) - cpu0
            wall = time.monotonic() - t0
            proxy.delay.clear()
            assert used < 0.3 * wall, (
                f"kupd used {used:.2f} s of CPU in {wall:.2f} s after one device event "
                "while its host was slow to answer INFO"
            )
            with k.client() as c:  # the event was acted on: kupd still serves it
                wait_until(lambda: c.devices("echo")[0].not_answering_s == 0.0, timeout=30)
                with c.open("echo").channel(4) as ch:
                    ch.receive(timeout=10)
                    assert ch.exchange(b"x", timeout=10).data == b"x"
        finally:
            proxy.close()


def test_an_attach_in_flight_when_kupd_drains_gets_no_lease(
    tmp_path: Path, start_kupd: StartKupd
) -> None:
    """SIGTERM while an Attach waits for the host: the Attach ends with
    Shutdown (the lease it would have had is ended, not handed out).  The
    host's answer is held until kupd says it drains: an answer that came
    first would rightly grant the lease before the drain ended it."""
    with echo_sim() as sim:
        proxy, k = _behind_proxy(start_kupd, sim, tmp_path)
        try:
            with k.client() as c:
                release = proxy.hold[OP_ATTACH] = threading.Event()
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
                try:
                    wait_until(lambda: '"kupd draining"' in k.log(), what="kupd to drain")
                finally:
                    release.set()
                t.join(30)
                assert len(out) == 1
                assert isinstance(out[0], errors.Shutdown), out[0]
            assert k.proc.wait(30) == 0
        finally:
            proxy.close()


def test_two_hung_hosts_do_not_make_a_third_device_look_hung(
    tmp_path: Path, start_kupd: StartKupd
) -> None:
    """Each device's INFO runs on a thread of its own: two devices whose
    hosts stop answering INFO must not hold up a third, healthy device's
    probes (with a pool shared by all, they took it, and rot13 showed NOT
    answering too)."""
    from kupd.testing import kupsim

    with kupsim("echo", "rot13", check_exit=False, ready_timeout=60.0) as sim:
        pdir = tmp_path / "proxy"
        pdir.mkdir()
        real = sim.rundir
        px = {
            name: SimProxy(str(real / f"{up}.sock"), str(pdir / f"{name}.sock"))
            for name, up in (("echo", "echo"), ("echo2", "echo"), ("rot13", "rot13"))
        }
        sim.rundir = pdir
        try:
            k = start_kupd(
                sim, "--health-interval", "0.5", devices=("echo:0", "echo2:0", "rot13:0")
            )
        finally:
            sim.rundir = real
        try:
            with k.client() as c:
                assert all(d.reachable and not d.not_answering_s for d in c.devices())
                px["echo"].delay[OP_INFO] = px["echo2"].delay[OP_INFO] = 30.0
                wait_until(
                    lambda: c.devices("echo")[0].not_answering_s > 0,
                    timeout=30,
                    what="echo's host seen hung",
                )
                time.sleep(3.0)  # several health rounds
                rot = c.devices("rot13")[0]
                assert c.health("kup.v1.Kup/rot13") == "SERVING" and not rot.not_answering_s
                assert c.health("kup.v1.Kup/echo2") == "NOT_SERVING"
        finally:
            for p in px.values():
                p.delay.clear()
                p.close()
