"""kupd._kupchan (and the libkup compiled into it) under ASan + UBSan.

The extension is rebuilt with -fsanitize=address,undefined into a temporary
directory by the real setup.py, next to a copy of the kupd package, and a
scenario covering every C entry point (open, info, attach, send of every
buffer kind, receive in all three modes, TooBig, busy channel, close while
another thread waits, device close with live channels, unload) runs in a
child interpreter with the sanitizer runtime preloaded.  Any report fails
the test with the child's output.
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

SAN = "-fsanitize=address,undefined"

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
    print("scenario done", flush=True)
    """
)


def _asan_runtime() -> str | None:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        return None
    out = subprocess.run([cc, "-print-file-name=libasan.so"], capture_output=True, text=True)
    path = out.stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


@pytest.fixture(scope="module")
def sanitized_pkg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if _asan_runtime() is None:
        pytest.fail("gcc's libasan.so not found: ASan build of the extension impossible")
    d = tmp_path_factory.mktemp("kupchan_asan")
    env = dict(os.environ)
    env["CFLAGS"] = f"{SAN} -fno-omit-frame-pointer -fno-sanitize-recover=undefined -O1 -g"
    env["LDFLAGS"] = SAN
    build = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext",
         "--build-lib", str(d / "lib"), "--build-temp", str(d / "tmp")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, f"sanitized build failed:\n{build.stderr}"
    pkg = d / "lib" / "kupd"
    for py in (REPO_ROOT / "kupd").glob("*.py"):
        shutil.copy(py, pkg / py.name)
    assert list(pkg.glob("_kupchan*.so")), "no sanitized extension was built"
    return d / "lib"


def test_extension_under_asan_ubsan(sanitized_pkg: Path, echo_sim: KupSim) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(sanitized_pkg)
    env["LD_PRELOAD"] = _asan_runtime() or ""
    env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=0:exitcode=99"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1:exitcode=98"
    run = subprocess.run(
        [sys.executable, "-c", SCENARIO, echo_sim.device_path("echo")],
        env=env, capture_output=True, text=True, timeout=120, cwd=sanitized_pkg,
    )
    report = f"exit {run.returncode}\n[stdout]\n{run.stdout}\n[stderr]\n{run.stderr}"
    assert "AddressSanitizer" not in run.stderr and "runtime error" not in run.stderr, report
    assert run.returncode == 0, report
    assert "scenario done" in run.stdout, report
    # the scenario really used the sanitized build
    assert str(sanitized_pkg) in subprocess.run(
        [sys.executable, "-c", "import kupd._kupchan as k; print(k.__file__)"],
        env=env, capture_output=True, text=True, timeout=60, cwd=sanitized_pkg,
    ).stdout
