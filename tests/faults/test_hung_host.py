"""One device host that hangs (stopped, not dead; or slow to answer, behind
tests/faults/simproxy.py) must tie up only its own device: attaches to the
other devices, kupd's start and its stop must not wait for it -- a hung
kupsim answers nothing until libkup's RPC timeout (30 s) -- and what its
own device's clients are told must say that its host is not answering."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from gateway_helpers import Kupd, StartKupd, echo_sim
from simproxy import OP_ATTACH, OP_INFO, SimProxy

from kupd import errors
from kupd.testing import KupSim, kupsim, wait_until

#: Far below libkup's RPC timeout (30 s), which is what each of these used
#: to wait for: a correctness bound ("did not wait for the hung host"), not
#: a speed target.
NOT_THE_RPC_TIMEOUT = 20.0


@pytest.fixture
def two_hosts(tmp_path: Path) -> Iterator[tuple[KupSim, dict[str, SimProxy], Path]]:
    """kupsim with echo and rot13, each device behind a proxy of its own
    (a test delays one op of one device's host)."""
    with kupsim("echo", "rot13", check_exit=False, ready_timeout=60.0) as sim:
        pdir = tmp_path / "proxy"
        pdir.mkdir()
        px = {n: SimProxy(str(sim.rundir / f"{n}.sock"), str(pdir / f"{n}.sock"))
              for n in ("echo", "rot13")}
        try:
            yield sim, px, pdir
        finally:
            for p in px.values():
                p.delay.clear()
                for held in p.hold.values():
                    held.set()
                p.close()


def _start_behind(
    start_kupd: StartKupd, sim: KupSim, pdir: Path, *args: str, wait: bool = True,
    devices: tuple[str, ...] = ("echo:0", "rot13:0"),
) -> Kupd:
    real = sim.rundir
    sim.rundir = pdir  # kupd's --kupsim-dir: the proxies'
    try:
        return start_kupd(sim, "--health-interval", "0.5", *args, devices=devices, wait=wait)
    finally:
        sim.rundir = real


def test_attaches_waiting_on_a_hung_host_leave_other_devices_attachable(
    two_hosts: tuple[KupSim, dict[str, SimProxy], Path], start_kupd: StartKupd
) -> None:
    """Six attaches to rot13, whose host holds every ATTACH: an attach of
    echo completes while they all still wait (with one pool of attach
    threads for every device they took it, and echo's waited 30 s)."""
    sim, px, pdir = two_hosts
    k = _start_behind(start_kupd, sim, pdir)
    with k.client() as c:
        px["rot13"].delay[OP_ATTACH] = 60.0
        out: list[object] = []

        def attach() -> None:
            try:
                out.append(c.attach("rot13"))
            except errors.KupError as exc:
                out.append(exc)

        hung = [threading.Thread(target=attach) for _ in range(6)]
        for t in hung:
            t.start()
        wait_until(lambda: px["rot13"].count(OP_ATTACH) >= 4, timeout=30,
                   what="rot13's attaches reaching its host")
        done = threading.Event()
        got: list[object] = []

        def healthy() -> None:
            try:
                got.append(c.attach("echo"))
            except errors.KupError as exc:
                got.append(exc)
            done.set()

        threading.Thread(target=healthy, daemon=True).start()
        assert done.wait(NOT_THE_RPC_TIMEOUT), "echo's attach waited for rot13's hung host"
        assert not out, f"rot13's attaches answered before echo's: {out}"
        assert len(got) == 1 and not isinstance(got[0], BaseException), got
        px["rot13"].close()  # the held attaches fail now
        for t in hung:
            t.join(60)


def test_an_attach_to_a_device_known_stalled_is_unavailable_at_once(
    two_hosts: tuple[KupSim, dict[str, SimProxy], Path], start_kupd: StartKupd
) -> None:
    """A device whose host has stopped answering (its INFO held) is not
    sent attaches, which would wait there: Unavailable, naming the device
    and how long its host has been silent; the other device attaches."""
    sim, px, pdir = two_hosts
    k = _start_behind(start_kupd, sim, pdir)
    with k.client() as c:
        px["rot13"].delay[OP_INFO] = 60.0
        wait_until(lambda: c.devices("rot13")[0].not_answering_s > 0, timeout=30,
                   what="rot13 seen not answering")
        attaches = px["rot13"].count(OP_ATTACH)
        with pytest.raises(errors.Unavailable) as ei:
            c.attach("rot13")
        assert "rot13" in str(ei.value) and "has not answered for" in str(ei.value)
        assert px["rot13"].count(OP_ATTACH) == attaches  # the host was not asked
        c.attach("echo")


def test_stop_does_not_wait_for_a_stopped_host(
    tmp_path: Path, start_kupd: StartKupd
) -> None:
    """SIGTERM while the device's kupsim is SIGSTOPped and kupd's health
    probe waits inside an INFO to it: kupd exits (0) without waiting for
    that INFO's RPC timeout -- the device's close used to wait, on the
    event loop, for the lock that INFO holds, and the exit for its thread."""
    with echo_sim() as sim:
        k = start_kupd(sim, "--health-interval", "0.5", "--drain-grace", "1")
        with k.client() as c:
            lease = c.attach("echo")
            assert lease.channel >= 0
            sim.signal(signal.SIGSTOP)
            try:
                wait_until(lambda: c.devices("echo")[0].not_answering_s > 0, timeout=30,
                           what="echo seen not answering")
                t0 = time.monotonic()
                k.proc.send_signal(signal.SIGTERM)
                # 2 x drain_grace + 2 s is the documented bound; the INFO
                # held by the stopped host returns only after 30 s
                rc = k.proc.wait(NOT_THE_RPC_TIMEOUT)
                assert rc == 0, k.log()
                assert time.monotonic() - t0 < NOT_THE_RPC_TIMEOUT
            finally:
                sim.signal(signal.SIGCONT)


def test_start_serves_while_a_host_does_not_answer(
    two_hosts: tuple[KupSim, dict[str, SimProxy], Path], start_kupd: StartKupd
) -> None:
    """kupd started while rot13's host holds every INFO: it serves echo
    without waiting for rot13 (whose open is held up to libkup's 30 s),
    shows rot13 not answering, and picks it up once its host answers (the
    INFOs held until then go on: no waiting out a fixed delay)."""
    sim, px, pdir = two_hosts
    release = px["rot13"].hold[OP_INFO] = threading.Event()
    held = time.monotonic()
    k = _start_behind(start_kupd, sim, pdir, wait=False, devices=("echo:2", "rot13:2"))
    assert k.wait_up(NOT_THE_RPC_TIMEOUT) == "NOT_SERVING"
    with k.client() as c:
        assert c.call("echo", b"hi", timeout=10).data.lower() == b"hi"
        rot = c.devices("rot13")[0]
        infos = px["rot13"].count(OP_INFO)
        # rot13 has not answered (its INFO is held): served before it did,
        # and well before its open would give up on it
        assert time.monotonic() - held < NOT_THE_RPC_TIMEOUT and infos <= 1, (rot, infos)
        assert not rot.reachable or rot.not_answering_s > 0, rot
        assert c.health("kup.v1.Kup/rot13") == "NOT_SERVING"
        assert c.health("kup.v1.Kup/echo") == "SERVING"
        release.set()
        wait_until(lambda: c.health() == "SERVING", timeout=60, what="rot13 picked up")
        assert c.call("rot13", b"abc", timeout=10).data


def test_a_call_on_a_stalled_device_says_its_host_is_not_answering(
    two_hosts: tuple[KupSim, dict[str, SimProxy], Path], start_kupd: StartKupd
) -> None:
    """A Call that would queue for a pool channel of a device whose host has
    stopped answering is Unavailable at once, saying so -- not a wait for its
    deadline ending "no pool channel became free" / "got no channel"."""
    sim, px, pdir = two_hosts
    k = _start_behind(start_kupd, sim, pdir, "--call-quarantine", "120",
                      devices=("echo:1", "rot13:0"))
    with k.client() as c:
        with pytest.raises(errors.DeadlineExceeded):
            c.call("echo", b"!hold", timeout=0.5)  # its one channel now owes a reply
        px["echo"].delay[OP_INFO] = 60.0
        wait_until(lambda: c.devices("echo")[0].not_answering_s > 0, timeout=30,
                   what="echo seen not answering")
        with pytest.raises(errors.Unavailable) as ei:
            c.call("echo", b"x", timeout=NOT_THE_RPC_TIMEOUT)
        assert "echo" in str(ei.value) and "has not answered for" in str(ei.value)


def test_a_host_silent_past_the_rpc_timeout_ends_sessions_unavailable_not_shutdown(
    two_hosts: tuple[KupSim, dict[str, SimProxy], Path], start_kupd: StartKupd
) -> None:
    """The host does not answer an INFO within libkup's RPC timeout (3 s
    here): kupd closes the device and opens it again, ending its sessions --
    with Unavailable (try again), naming the host's silence: its module did
    not unload, which is what Shutdown says."""
    sim, px, pdir = two_hosts
    real = sim.rundir
    sim.rundir = pdir
    try:
        env = {**sim.env(), "KUP_TEST_SIM_RPC_TIMEOUT_MS": "3000"}
        k = start_kupd(sim, "--health-interval", "0.5", devices=("echo:0", "rot13:0"), env=env)
    finally:
        sim.rundir = real
    with k.client() as c:
        ch = c.open("echo").channel(2)
        ch.receive(timeout=10)
        assert ch.exchange(b"a", timeout=10).data == b"a"
        px["echo"].delay[OP_INFO] = 60.0
        wait_until(lambda: not c.devices("echo")[0].reachable, timeout=60,
                   what="echo closed after its INFO timed out")
        with pytest.raises(errors.KupError) as ei:
            ch.exchange(b"b", timeout=10)
        assert isinstance(ei.value, errors.Unavailable), repr(ei.value)
        assert "has not answered for" in str(ei.value), str(ei.value)
        with pytest.raises(errors.Unavailable):
            c.attach("echo")


def test_a_removed_device_socket_reads_unavailable_everywhere_until_it_is_back(
    tmp_path: Path, start_kupd: StartKupd
) -> None:
    """kupsim's device socket removed while kupsim and its module run on:
    attaches get Unavailable saying the device cannot be attached (not
    Shutdown, which a client takes as final, while health said SERVING),
    health and ListDevices say so too, sessions already attached go on,
    and all is well again once the socket is back."""
    with echo_sim() as sim:
        k = start_kupd(sim, "--health-interval", "0.5", devices=("echo:0",))
        sock = sim.rundir / "echo.sock"
        keep = sim.rundir / "echo.keep"
        with k.client() as c:
            ch = c.open("echo").channel(2)
            ch.receive(timeout=10)
            os.link(sock, keep)  # the same socket under another name
            os.unlink(sock)
            try:
                with pytest.raises(errors.Unavailable) as ei:
                    c.attach("echo")
                assert "cannot be attached" in str(ei.value), str(ei.value)
                assert c.health("kup.v1.Kup/echo") == "NOT_SERVING"
                dev = c.devices("echo")[0]
                assert dev.reachable and "cannot be attached" in dev.error, dev
                assert ch.exchange(b"a", timeout=10).data == b"a"  # goes on
            finally:
                os.rename(keep, sock)
            wait_until(lambda: c.health("kup.v1.Kup/echo") == "SERVING", timeout=30,
                       what="echo attachable again")
            assert not c.devices("echo")[0].error
            c.attach("echo")
