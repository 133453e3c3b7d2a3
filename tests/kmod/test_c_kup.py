"""libkup scenarios (tests/c/test_kup.c) against a real kupsim process running
echo.so, rot13.so and hostile.so, everything built with ASan+UBSan and with
TSan (one run per variant).  kupsim must exit 0 on SIGTERM and print no
sanitizer report; kernel-side outcomes are read from kupsim's log (stderr),
where the echo module and the core log departures and protocol errors."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from kmod_util import assert_clean, sanitizer_env, variant_kupsim

from kupd.testing import KupSim, kupsim

__all__: list[str] = []

MODULES = ("echo", "rot13", "hostile")
RUN_TIMEOUT = 180.0


def run_scenario(out: Path, sim: KupSim, *args: str) -> str:
    """Run ``test_kup <args>`` to completion; returns its stdout."""
    proc = subprocess.run(
        ["nice", str(out / "test_kup"), *args],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        env=sim.env(sanitizer_env()),
        check=False,
    )
    assert proc.returncode == 0, (
        f"test_kup {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        f"\n--- kupsim ---\n{sim.stderr()}"
    )
    assert_clean("test_kup", proc.stderr)
    return proc.stdout


def wait_for(pred: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def read_line(proc: subprocess.Popen[str], prefix: str, timeout: float = 60.0) -> str:
    """Next stdout line of proc starting with prefix (bounded)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"process ended before printing {prefix!r}")
        if line.startswith(prefix):
            return line.strip()
    raise AssertionError(f"no {prefix!r} line within {timeout}s")


def finish(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """The rest of proc's stdout and its stderr, once it has exited (read
    through the same buffered streams read_line used, so nothing is lost)."""
    assert proc.stdout is not None and proc.stderr is not None
    proc.wait(timeout=RUN_TIMEOUT)
    return proc.stdout.read(), proc.stderr.read()


@pytest.mark.parametrize(
    "scenario",
    [
        "blocking",
        "nonblocking",
        "spin",
        "transforms",
        "many",
        "threads",
        "twodev",
        "sizes",
        "version",
        "churn",
        "stress",
        "badtimeout",
        "wakefail",
    ],
)
def test_scenario(variant_out: Path, scenario: str) -> None:
    with variant_kupsim(variant_out, *MODULES) as sim:
        stdout = run_scenario(variant_out, sim, scenario)
        assert f"OK {scenario}" in stdout


def test_module_disconnects_blocked_user(variant_out: Path) -> None:
    """echo's "!kick": kupdev_disconnect ends the session of a user blocked in
    its receive (EKU_PEER, in blocking and in poll mode), and the channel is
    served afresh to the next user; an idle user reads it from
    kernproxy_state (tests/c/test_kup.c sc_kick)."""
    with variant_kupsim(variant_out, *MODULES) as sim:
        stdout = run_scenario(variant_out, sim, "kick")
        assert "OK kick" in stdout
        wait_for(
            lambda: sim.stderr().count("echo: chan 14: disconnected the user (0)") == 3,
            "echo's three disconnect lines",
        )


WOKEN_WAITING = "echo: chan 16: receive woken (-125) while waiting"


def test_module_wakes_its_receive(variant_out: Path) -> None:
    """echo's "!wake": a module thread asleep in kupdev_receive_msg is woken by
    kupdev_wake_channel from another thread (-ECANCELED), and one whose user
    answered first gets it from its next receive (tests/c/test_kup.c
    sc_wake: it sends its next message once told that echo logged the
    first wake, not after a sleep that a loaded machine can outlast)."""
    with variant_kupsim(variant_out, *MODULES) as sim:
        proc = subprocess.Popen(
            [str(variant_out / "test_kup"), "wake"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=sim.env(sanitizer_env()),
        )
        try:
            assert proc.stdin is not None
            read_line(proc, "ARMED")
            wait_for(lambda: WOKEN_WAITING in sim.stderr(), "echo's receive woken while waiting")
            proc.stdin.write("go\n")
            proc.stdin.flush()
            out, err = finish(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, f"{out}\n{err}\n--- kupsim ---\n{sim.stderr()}"
        assert "OK wake" in out
        assert_clean("test_kup", err)
        log = sim.stderr()
        assert log.count(WOKEN_WAITING) == 1, log
        assert "echo: chan 16: receive woken (-125) after a message" in log, log


def test_idle_receiver_sleeps(variant_out: Path, record_property: Callable[..., None]) -> None:
    """A receive blocked ~1 s on a channel whose kernel keeps the turn uses
    (almost) no CPU: the C program asserts < 5 % of the interval."""
    with variant_kupsim(variant_out, *MODULES) as sim:
        stdout = run_scenario(variant_out, sim, "idle")
        m = re.search(r"IDLE cpu_us=(\d+) wall_ms=(\d+) fraction=([0-9.]+)", stdout)
        assert m is not None, stdout
        assert float(m.group(3)) < 0.05
        record_property("idle_cpu_fraction", m.group(3))
        print(f"idle receiver: {m.group(1)} us CPU over {m.group(2)} ms ({m.group(3)})")


def test_message_sent_before_shutdown_is_readable(variant_out: Path) -> None:
    """echo answers; the device shuts down (SIGTERM to kupsim) before the
    user reads the answer: the answer is still read, then EKU_SHUTDOWN."""
    with variant_kupsim(variant_out, *MODULES) as sim:
        proc = subprocess.Popen(
            [str(variant_out / "test_kup"), "shutdown_unread"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=sim.env(sanitizer_env()),
        )
        try:
            read_line(proc, "READY")
            sim.signal(signal.SIGTERM)
            out, err = finish(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, f"{out}\n{err}"
        assert "OK shutdown_unread" in out
        assert_clean("test_kup", err)
        assert sim.wait(timeout=60.0) == 0, sim.output()


def test_shutdown_wakes_receiver(variant_out: Path, record_property: Callable[..., None]) -> None:
    """SIGTERM to kupsim unloads the modules; a user blocked in receive gets
    EKU_SHUTDOWN promptly (the issue asks for 100 ms; the bound asserted here
    is generous, the measured value is printed), and kupsim exits 0."""
    with variant_kupsim(variant_out, *MODULES) as sim:
        proc = subprocess.Popen(
            [str(variant_out / "test_kup"), "shutdown_wait"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=sim.env(sanitizer_env()),
        )
        try:
            read_line(proc, "WAITING")
            time.sleep(0.3)  # let it go to sleep in the kernel->user wait
            t0 = time.monotonic_ns()  # CLOCK_MONOTONIC, as the C side's
            sim.signal(signal.SIGTERM)
            result = read_line(proc, "RESULT")
            _, code, t_ns = result.split()
            out, err = finish(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert int(code) == 1001, f"expected EKU_SHUTDOWN, got {code}\n{err}"
        latency_ms = (int(t_ns) - t0) / 1e6
        record_property("shutdown_latency_ms", f"{latency_ms:.2f}")
        print(f"shutdown latency: {latency_ms:.2f} ms")
        assert 0 <= latency_ms < 2000, latency_ms
        assert proc.returncode == 0, f"{out}\n{err}"
        assert "OK shutdown_wait" in out
        assert_clean("test_kup", err)
        assert sim.wait(timeout=60.0) == 0, sim.output()
        assert "echo: device echo unloaded" in sim.stderr()


def test_killed_user_detaches(variant_out: Path) -> None:
    """A user SIGKILLed while holding a channel: the kernel side sees -EPIPE
    and the channel can be attached again."""
    with variant_kupsim(variant_out, *MODULES) as sim:
        proc = subprocess.Popen(
            [str(variant_out / "test_kup"), "hold", "5"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=sim.env(sanitizer_env()),
        )
        try:
            read_line(proc, "ATTACHED 5")
            assert "chan 5: peer gone" not in sim.stderr()
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        wait_for(lambda: "echo: chan 5: peer gone (-EPIPE)" in sim.stderr(), "kernel -EPIPE")
        stdout = run_scenario(variant_out, sim, "reattach", "5")
        assert "OK reattach" in stdout


@pytest.mark.parametrize(
    ("variant", "reason"),
    [
        ("badlen", "length beyond the data area (4294967280, limit/expected 4096)"),
        ("badlen1", "length beyond the data area (4097, limit/expected 4096)"),
        ("badkind", "bad message kind (99"),
        ("seqgap", "sequence gap (3, limit/expected 1)"),
        ("seqrep", "repeated sequence number (1, limit/expected 2)"),
        ("badturn", "garbage in the turn word"),
    ],
)
def test_hostile_user_refused(variant_out: Path, variant: str, reason: str) -> None:
    """A user process writing garbage into the control area: the kernel side
    refuses with -EPROTO before reading any payload (kupsim runs under ASan:
    an out-of-bounds read would be reported and fail the test)."""
    with variant_kupsim(variant_out, *MODULES) as sim:
        stdout = run_scenario(variant_out, sim, "hostile_user", variant, "80")
        assert f"OK hostile_user {variant}" in stdout
        log = sim.stderr()
        assert "echo: chan 80: protocol error (-EPROTO)" in log, log
        assert f"kup: echo chan 80: protocol error from user: {reason}" in log, log


def test_hostile_kernel_refused(variant_out: Path) -> None:
    """A kernel side handing over bad sequence numbers, lengths, kinds or
    turn words: libkup reports EKU_PROTO and keeps refusing."""
    with variant_kupsim(variant_out, *MODULES) as sim:
        stdout = run_scenario(variant_out, sim, "hostile_kernel")
        for cmd in ("seqgap", "seqrep", "badlen", "badkind", "badturn"):
            assert f"refused {cmd}" in stdout
        assert "OK hostile_kernel" in stdout


def test_rundir_lock(variant_out: Path) -> None:
    """A second kupsim on a RUNDIR held by a live one refuses to start and
    leaves the first one's sockets alone."""
    with variant_kupsim(variant_out, *MODULES) as sim:
        proc = subprocess.run(
            [str(variant_out / "kupsim"), "-d", str(sim.rundir), str(variant_out / "echo.so")],
            capture_output=True,
            text=True,
            timeout=60,
            env=sanitizer_env(),
            check=False,
        )
        assert proc.returncode != 0
        assert "held by another running kupsim" in proc.stderr
        assert "ready" not in proc.stdout
        stdout = run_scenario(variant_out, sim, "transforms")
        assert "OK transforms" in stdout


def test_bad_command_lines(variant_out: Path, tmp_path: Path) -> None:
    """kupsim names what was wrong: no module, a missing module file."""
    exe = str(variant_out / "kupsim")
    proc = subprocess.run(
        [exe, "-d", str(tmp_path / "a")],
        capture_output=True,
        text=True,
        timeout=60,
        env=sanitizer_env(),
        check=False,
    )
    assert proc.returncode == 2
    assert "no module given" in proc.stderr
    missing = str(tmp_path / "nosuch.so")
    proc = subprocess.run(
        [exe, "-d", str(tmp_path / "b"), missing],
        capture_output=True,
        text=True,
        timeout=60,
        env=sanitizer_env(),
        check=False,
    )
    assert proc.returncode == 1
    assert f"cannot load module {missing}" in proc.stderr


def test_attach_before_announce(variant_out: Path) -> None:
    """echo announces 5 s after init: an attach before that is EKU_NOTREADY,
    the device fd reports the announce, then attach works.  (The program's
    first look must come before the announce: starting a sanitizer build on
    a loaded machine can take a good part of a second, so the delay is not
    the 2 s it once was.)"""
    env = {**os.environ, "KUP_PARAM_ECHO_ANNOUNCE_DELAY_MS": "5000"}
    with variant_kupsim(variant_out, *MODULES, env=env) as sim:
        stdout = run_scenario(variant_out, sim, "notready")
        assert "OK notready" in stdout
        # echo logs the announce just after making it: the program may have
        # seen it, attached and finished before that line is written
        wait_for(lambda: "echo: device echo announced" in sim.stderr(), "echo's announce line")


def test_kupsim_killed_receiver_sees_shutdown(variant_out: Path) -> None:
    """kupsim dies without unloading (SIGKILL): a user blocked in receive
    notices the host's end of the attachment closing and reports EKU_SHUTDOWN."""
    with kupsim(
        *(str(variant_out / f"{m}.so") for m in MODULES),
        binary=variant_out / "kupsim",
        env=sanitizer_env(),
        ready_timeout=60.0,
        check_exit=False,
    ) as sim:
        proc = subprocess.Popen(
            [str(variant_out / "test_kup"), "shutdown_wait"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=sim.env(sanitizer_env()),
        )
        try:
            read_line(proc, "WAITING")
            time.sleep(0.3)
            sim.signal(signal.SIGKILL)
            result = read_line(proc, "RESULT")
            out, err = finish(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert result.split()[1] == "1001", f"{result}\n{err}"
        assert proc.returncode == 0, f"{out}\n{err}"
        assert_clean("test_kup", err)
