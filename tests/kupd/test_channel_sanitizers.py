"""kupd._kupchan (and the libkup compiled into it) under ASan+UBSan and TSan.

The extension is rebuilt with the sanitizer into a temporary directory by
the real setup.py, next to a copy of the kupd package, and a scenario
covering every C entry point (open, info, attach, send of every buffer
kind, receive in all three modes, TooBig, busy channel, close while another
thread waits, device close with live channels, eight threads sharing one
device) runs in a child interpreter with the sanitizer runtime preloaded.
Any sanitizer report fails the test with the child's output.

TSan sees the GIL hand-offs (CPython's pthread calls are intercepted) and
every access the extension and libkup make; the kernel side runs in the
kupsim process and is covered by kmod's own TSan build.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kupd.testing import REPO_ROOT, KupSim

SANITIZERS = {
    # name: (compile flags, link flags, runtime library, environment)
    "asan": (
        "-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined",
        "-fsanitize=address,undefined",
        "libasan.so",
        {
            "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:exitcode=99",
            "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1:exitcode=98",
        },
    ),
    "tsan": (
        "-fsanitize=thread -Wno-tsan",  # -Wno-tsan: libkup's fences, as kmod/Makefile does
        "-fsanitize=thread",
        "libtsan.so",
        {"TSAN_OPTIONS": "halt_on_error=1:exitcode=97:report_signal_unsafe=0"},
    ),
}
REPORTS = ("AddressSanitizer", "runtime error", "ThreadSanitizer")

SCENARIO = textwrap.dedent(
    """
    import sys, threading
    from kupd.channel import Device, Kind
    from kupd.errors import Busy, InvalidArgument, NotReady, NotYourTurn, TooBig, KupError
    path = sys.argv[1]
    dev = Device.open(path)
    info = dev.info()
    assert info.name == "echo", info
    a, b = dev.channel(0), dev.channel()
    for ch in (a, b):
        assert ch.receive(timeout=10).kind is Kind.PASS
    for payload in (b"", b"x", bytearray(b"y" * 100), memoryview(b"z" * a.max_msg)):
        a.send(payload)
        assert a.receive(timeout=10).data == bytes(payload)
    try:
        a.send(b"q" * (a.max_msg + 1))
    except TooBig:
        pass
    # the one-call forms: exchange (Message built in C), try_exchange's spin
    for payload in (b"", b"e", memoryview(b"E" * a.max_msg)):
        m = a.exchange(payload, 10)
        assert m.data == bytes(payload) and m.kind is Kind.DATA, m
    for bad in (b"q" * (a.max_msg + 1),):
        try:
            a.exchange(bad, None)
        except TooBig:
            pass
    for i in range(100):
        m = a.try_exchange(b"t%d" % i)
        if m is None:
            m = a.receive(timeout=10)
        assert m.data == b"t%d" % i, m
    try:
        a.exchange(b"!delay", 0.01)
    except KupError:
        pass
    assert a.receive(timeout=10).data == b"!delay"
    try:
        a.receive(timeout=0.01)
    except NotYourTurn:
        pass
    a.send(b"!delay")
    try:
        a.receive(timeout=0)
    except NotReady:
        pass
    out = []
    def recv(ch):
        try:
            out.append(ch.receive(timeout=10))
        except KupError as e:   # the other thread may have taken it first
            out.append(e)
    t = threading.Thread(target=recv, args=(a,))
    t.start()
    for _ in range(1000):
        try:
            a.try_receive()
        except (Busy, KupError):
            break
    t.join(10)
    fd = b.fileno()
    b.send(b"big" * 1000)
    while True:
        m = b.try_receive()
        if m is not None:
            break
    # close while another thread waits
    b.send(b"!delay")
    t = threading.Thread(target=recv, args=(b,))
    t.start()
    b.close()
    t.join(10)
    assert b.closed and len(out) == 2, out
    dev.close()            # deferred: channel a is still open
    a.pass_()
    assert a.receive(timeout=10).kind is Kind.PASS
    a.close()
    dev = Device.open(path)
    def worker(n):
        with dev.channel() as ch:
            assert ch.receive(timeout=10).kind is Kind.PASS
            for i in range(100):
                if i % 2:
                    ch.send(b"T%d#%d" % (n, i))
                    assert ch.receive(timeout=10).data == b"T%d#%d" % (n, i)
                else:
                    assert ch.exchange(b"T%d#%d" % (n, i), 10).data == b"T%d#%d" % (n, i)
            dev.info()
    ts = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    dev.close()
    print("scenario done", flush=True)
    """
)


#: The last channel's deferred close while another thread is inside info()
#: on a host that does not answer (kupsim stopped): the device handle was
#: freed under that info() call; and close() itself returns at once, the
#: handle left to that info().  argv: device path, kupsim's pid.  The
#: info() starts once every kupsim thread is stopped (one not stopped yet
#: can still answer it), and the close once info() is under way.
SCENARIO_HOST_STOPPED = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    from kupd.channel import Device
    from kupd.errors import KupError
    from kupd.testing import all_stopped, thread_frame, wait_until
    path, sim = sys.argv[1], int(sys.argv[2])
    def in_info(t):
        f = thread_frame(t)
        while f is not None and not (
            f.f_code.co_name == "info" and f.f_code.co_filename.endswith("channel.py")
        ):
            f = f.f_back
        return f is not None
    dev = Device.open(path)
    ch = dev.channel(3)
    ch.receive(timeout=10)
    ch.send(b"!hold")                 # echo keeps the turn: the receive waits
    def receiver():
        try:
            ch.receive()
        except KupError:
            pass                      # "closed by another thread"
    r = threading.Thread(target=receiver)
    r.start()
    time.sleep(0.3)
    os.kill(sim, signal.SIGSTOP)      # info() now waits for kupsim
    try:
        wait_until(lambda: all_stopped(sim), what="kupsim stopped")
        p = threading.Thread(target=lambda: dev.info())
        p.start()
        wait_until(lambda: in_info(p), what="the info() call")
        time.sleep(0.3)               # inside info(), the device lock held
        ch.close()                    # deferred to the receiver
        closer = threading.Thread(target=dev.close)
        closer.start()
        time.sleep(0.6)               # the receiver ends: the last channel goes
        # close() does not wait for the info() in flight (it held kupd's
        # stop for libkup's 30 s RPC timeout): that info() releases the
        # handle on its way out
        closer.join(10)
        assert not closer.is_alive(), "close() waited for the info() in flight"
        assert p.is_alive(), "info() returned while kupsim was stopped"
    finally:
        os.kill(sim, signal.SIGCONT)
    for t in (p, closer, r):
        t.join(30)
        assert not t.is_alive()
    print("scenario done", flush=True)
    """
)


def _runtime(lib: str) -> str | None:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        return None
    out = subprocess.run([cc, f"-print-file-name={lib}"], capture_output=True, text=True)
    path = out.stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


@pytest.fixture(scope="module", params=sorted(SANITIZERS))
def sanitized_pkg(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path]:
    name: str = request.param
    cflags, ldflags, lib, _ = SANITIZERS[name]
    if _runtime(lib) is None:
        pytest.fail(f"gcc's {lib} not found: {name} build of the extension impossible")
    d = tmp_path_factory.mktemp(f"kupchan_{name}")
    env = dict(os.environ)
    env["CFLAGS"] = f"{cflags} -O1 -g"
    env["LDFLAGS"] = ldflags
    build = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext",
         "--build-lib", str(d / "lib"), "--build-temp", str(d / "tmp")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, f"{name} build failed:\n{build.stderr}"
    pkg = d / "lib" / "kupd"
    for py in (REPO_ROOT / "kupd").glob("*.py"):
        shutil.copy(py, pkg / py.name)
    assert list(pkg.glob("_kupchan*.so")), "no sanitized extension was built"
    return name, d / "lib"


def test_extension_under_sanitizer(sanitized_pkg: tuple[str, Path], echo_sim: KupSim) -> None:
    name, lib_dir = sanitized_pkg
    _, _, lib, san_env = SANITIZERS[name]
    env = dict(os.environ)
    env.update(san_env)
    env["PYTHONPATH"] = str(lib_dir)
    env["LD_PRELOAD"] = _runtime(lib) or ""
    # the scenario really uses the sanitized build
    where = subprocess.run(
        [sys.executable, "-c", "import kupd._kupchan as k; print(k.__file__)"],
        env=env, capture_output=True, text=True, timeout=60, cwd=lib_dir,
    )
    assert where.stdout.startswith(str(lib_dir)), where
    for scenario, args in (
        (SCENARIO, [echo_sim.device_path("echo")]),
        (SCENARIO_HOST_STOPPED, [echo_sim.device_path("echo"), str(echo_sim.pid)]),
    ):
        run = subprocess.run(
            [sys.executable, "-c", scenario, *args],
            env=env, capture_output=True, text=True, timeout=300, cwd=lib_dir,
        )
        report = f"{name}: exit {run.returncode}\n[stdout]\n{run.stdout}\n[stderr]\n{run.stderr}"
        assert not any(r in run.stderr for r in REPORTS), report
        assert run.returncode == 0, report
        assert "scenario done" in run.stdout, report
