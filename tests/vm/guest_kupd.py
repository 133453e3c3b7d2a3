"""kupd with a Python client against the real Linux module (run INSIDE the VM).

tests/vm/guest_tests.sh runs this as a program after kup.ko, kup_echo.ko,
kup_rot13.ko and kup_tally.ko are loaded (KUP_BACKEND=linux, KMODDIR = the
built modules).  It starts the kupd daemon on a unix socket serving
/dev/kup/echo (with a Call pool), /dev/kup/rot13 and /dev/kup/tally (a
Call pool of one channel), then, through kupclient:

  * ListDevices reports the module's geometry;
  * a Session on echo channel 7: the kernel's opening PASS, a DATA round trip
    through the real shared pages (odd channel: upper-cased), a PASS back;
    then channel 7 again at once, a fresh attachment;
  * a Call through the pool;
  * a Watch on rot13 sees the device shut down when kup_rot13.ko is unloaded
    and reappear when it is loaded again, after which a Session works;
  * kmod/examples/tally (kup_tally.ko, its default 4 channels): Sessions on
    the three channels the pool leaves and Calls share the module's one
    total, a Session's "watch T" is answered only when another channel
    changes the total (a receive with a timeout first ends DeadlineExceeded:
    the answer is still owed), and unloading the module while a watch waits
    ends that receive with Shutdown.  (In this kupd, not one of its own: a
    second kupd start cost the guest 12-80 s under TCG.)

Exit status 0 on success; on failure the kupd log is printed.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CLIENTS = str(REPO / "clients" / "python")
sys.path[:0] = [str(REPO), CLIENTS]

from kupclient import Client, EventType, Kind, WatchEvent  # noqa: E402
from kupd import errors  # noqa: E402

__all__ = ["main"]

T = 60.0  # generous bound on every wait (TCG)


def wait_serving(sock: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + T
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"kupd exited with {proc.returncode}")
        if os.path.exists(sock):
            try:
                with Client(sock) as c:
                    if c.health() == "SERVING":
                        return
            except errors.KupError:
                pass
        time.sleep(0.1)
    raise AssertionError(f"kupd not SERVING within {T}s")


def wait_event(events: queue.Queue[WatchEvent], *types: EventType) -> WatchEvent:
    deadline = time.monotonic() + T
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {[t.name for t in types]} event within {T}s")
        try:
            ev = events.get(timeout=left)
        except queue.Empty:
            continue
        print(f"watch: {ev.type.name} {ev.device} {ev.reason}", flush=True)
        if ev.type in types:
            return ev


def scenario(sock: str, moddir: str) -> None:
    with Client(sock) as c:
        devs = {d.name: d for d in c.devices()}
        assert set(devs) >= {"echo", "rot13"}, devs
        echo = devs["echo"]
        assert echo.reachable and echo.channel_count == 128, echo
        assert echo.page_size == os.sysconf("SC_PAGE_SIZE"), echo
        assert echo.max_message_bytes == echo.pages_per_channel * echo.page_size, echo
        assert devs["rot13"].channel_count == 64, devs["rot13"]
        print("devices: ok", flush=True)

        with c.open("echo").channel(7) as ch:
            first = ch.receive(timeout=T)
            assert first.kind is Kind.PASS and first.seq == 1, first
            ch.send(b"hello through kupd")
            reply = ch.receive(timeout=T)
            assert reply.data == b"HELLO THROUGH KUPD" and reply.seq == 2, reply
            ch.pass_()
            assert ch.receive(timeout=T).kind is Kind.PASS
        # the channel just left, at once: a fresh attachment (kupd waits, should
        # the module still hold it) with the kernel's opening PASS again
        with c.open("echo").channel(7) as ch:
            again = ch.receive(timeout=T)
            assert again.kind is Kind.PASS and again.seq == 1, again
        print("session: ok", flush=True)

        # the module ends a session (echo's "!kick": kupdev_disconnect):
        # PeerGone (ABORTED, EKU_PEER), then the channel serves anew
        with c.open("echo").channel(8) as ch:
            assert ch.receive(timeout=T).kind is Kind.PASS
            ch.send(b"!kick200")
            try:
                ch.receive(timeout=3 * T)
                raise AssertionError("echo answered a !kick")
            except errors.PeerGone as exc:
                assert "EKU_PEER" in str(exc), exc
        deadline = time.monotonic() + T
        while True:
            try:
                with c.open("echo").channel(8) as ch:
                    again = ch.receive(timeout=T)
                    assert again.kind is Kind.PASS and again.seq == 1, again
                break
            except errors.Busy:  # kupd's detach is on its way to the kernel
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        print("disconnect: ok", flush=True)

        # payloads without a-z: the pool may use odd (upper-casing) channels
        for payload in (b"1234", b"\x00\x01\x02 #42 \xff"):
            got = c.call("echo", payload, timeout=T)
            assert got.data == payload and got.kind is Kind.DATA, got
        print("call: ok", flush=True)

        events: queue.Queue[WatchEvent] = queue.Queue()
        watch = c.watch("rot13")

        def pump() -> None:
            try:
                for ev in watch:
                    events.put(ev)
            except errors.KupError as exc:
                print(f"watch ended: {exc!r}", flush=True)

        t = threading.Thread(target=pump, daemon=True)
        t.start()
        subprocess.run(["rmmod", "kup_rot13"], check=True, timeout=T)
        wait_event(events, EventType.DEVICE_SHUTTING_DOWN, EventType.DEVICE_GONE)
        subprocess.run(["insmod", f"{moddir}/kup_rot13.ko"], check=True, timeout=T)
        wait_event(events, EventType.DEVICE_APPEARED)
        watch.cancel()
        t.join(T)
        print("watch: ok", flush=True)

        # the reappeared device is usable through kupd
        deadline = time.monotonic() + T
        while True:
            try:
                with c.open("rot13").channel() as ch:
                    assert ch.receive(timeout=T).kind is Kind.PASS
                    ch.send(b"Hello")
                    assert ch.receive(timeout=T).data == b"Uryyb"
                break
            except (errors.NotReady, errors.Unavailable, errors.Shutdown):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        print("session after reload: ok", flush=True)


def tally_scenario(c: Client) -> None:
    (tally,) = [d for d in c.devices() if d.name == "tally"]
    assert tally.reachable and tally.channel_count == 4, tally
    dev = c.open("tally")
    with dev.channel() as a, dev.channel() as b, dev.channel() as w:
        assert len({a.id, b.id, w.id}) == 3, (a.id, b.id, w.id)
        for ch in (a, b, w):
            assert ch.receive(timeout=T).kind is Kind.PASS  # the module's opening
        assert a.exchange(b"+5", timeout=T).data == b"total 5"
        assert b.exchange(b"-2", timeout=T).data == b"total 3"
        assert c.call("tally", b"+1", timeout=T).data == b"total 4"
        assert a.exchange(b"?", timeout=T).data == b"total 4"
        assert b.exchange(b"12x", timeout=T).data == b"error: not a number, ? or watch N (3 bytes)"
        print("tally: shared total: ok", flush=True)

        # "watch 4": no answer while the total stays 4; another channel's
        # change answers it
        w.send(b"watch 4")
        try:
            w.receive(timeout=0.2)
            raise AssertionError("tally answered a watch of the current total")
        except errors.DeadlineExceeded:
            pass
        assert a.exchange(b"+0", timeout=T).data == b"total 4"  # no change
        assert c.call("tally", b"+3", timeout=T).data == b"total 7"
        assert w.receive(timeout=T).data == b"total 7"
        assert w.exchange(b"watch 4", timeout=T).data == b"total 7"  # seen: at once
        print("tally: watch: ok", flush=True)

        # the module unloads while a watch waits: Shutdown
        w.send(b"watch 7")
        outcome: list[BaseException | None] = []

        def wait() -> None:
            try:
                w.receive(timeout=T)
                outcome.append(None)
            except BaseException as e:  # checked below
                outcome.append(e)

        t = threading.Thread(target=wait)
        t.start()
        subprocess.run(["rmmod", "kup_tally"], check=True, timeout=T)
        t.join(T)
        assert len(outcome) == 1 and isinstance(outcome[0], errors.Shutdown), outcome
        print("tally: unload during a watch: ok", flush=True)


def main() -> int:
    moddir = os.environ["KMODDIR"]
    tmp = Path(tempfile.mkdtemp(prefix="kupd-vm-"))
    sock = str(tmp / "kupd.sock")
    log = tmp / "kupd.log"
    env = dict(os.environ, KUP_BACKEND="linux")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), CLIENTS])
    argv = [sys.executable, "-m", "kupd.daemon", "--socket", sock, "--device", "echo:2",
            "--device", "rot13", "--device", "tally:1", "--health-interval", "0.2",
            "--pid-file", "-"]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    ok = False
    try:
        wait_serving(sock, proc)
        scenario(sock, moddir)
        with Client(sock) as c:
            tally_scenario(c)
        ok = True
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(T)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
                ok = False
                print("kupd ignored SIGTERM", flush=True)
        else:
            rc = proc.returncode
        if rc != 0:
            ok = False
            print(f"kupd exit status {rc}", flush=True)
        if not ok:
            print("--- kupd log ---\n" + log.read_text(errors="replace"), flush=True)
    print("kupd: ok" if ok else "kupd: FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
