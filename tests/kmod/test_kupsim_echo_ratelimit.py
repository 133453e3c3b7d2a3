"""echo's per-session log lines are rate-limited (kup_module.h,
kup_ratelimit_admit / kup_log_limited; echo.c, ECHO_LOG_BURST per
ECHO_LOG_WINDOW_MS).

A user that attaches and leaves in a loop used to get one kernel log line
per session (the fuzzer: 1,949 lines in 5 s on Linux 6.12).  Here a loop of
SESSIONS sessions logs the first BURST session-end lines, then one line
saying further lines are not logged, and nothing more; the first line of
the next window says how many were left out.

Runs on the ASan+UBSan and TSan builds (the limiter's atomics are shared by
every worker), which must exit 0 with no sanitizer report.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from kmod_util import variant_kupsim

from kupd.channel import Device, Kind
from kupd.errors import Releasing
from kupd.testing import wait_until

BURST = 20  # echo.c ECHO_LOG_BURST
WINDOW = 5.0  # echo.c ECHO_LOG_WINDOW_MS, in seconds
SESSIONS = 3 * BURST
CHANNELS = 8
#: a session's end: libkup's close says goodbye (CLOSE), a crash does not
GONE = re.compile(r"^echo: chan \d+: (?:user closed|peer gone \(-EPIPE\))$", re.M)
FURTHER = "echo: further lines not logged for up to 5000 ms"
NOT_LOGGED = re.compile(r"^echo: (\d+) lines not logged$", re.M)


def session(dev: Device, chan: int) -> None:
    """One session: attach, take echo's first PASS, leave (echo: user closed)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            ch = dev.channel(chan)
            break
        except Releasing:  # echo still lets go of the last user: at once
            if time.monotonic() > deadline:
                raise
            time.sleep(0.001)
    with ch:
        assert ch.receive(timeout=30).kind is Kind.PASS


def test_a_session_loop_logs_at_most_the_burst(variant_out: Path) -> None:
    with variant_kupsim(
        variant_out, "echo", env={"KUP_PARAM_ECHO_CHANNELS": str(CHANNELS)}
    ) as sim, Device.open(sim.device_path("echo")) as dev:
        t0 = time.monotonic()
        for i in range(SESSIONS):
            session(dev, i % CHANNELS)
        # the budget is spent by the BURST+1-th session end; the last
        # workers see their user gone within a moment (they sleep in
        # receive until the detach wakes them)
        wait_until(lambda: FURTHER in sim.stderr(), 30, "the budget spent")
        time.sleep(0.5)
        elapsed = time.monotonic() - t0
        log = sim.stderr()
        if elapsed < WINDOW:  # a slow sanitizer run may cross a window
            assert len(GONE.findall(log)) == BURST, log[-4000:]
            assert log.count(FURTHER) == 1, log[-4000:]
            assert not NOT_LOGGED.search(log), log[-4000:]
        else:
            assert len(GONE.findall(log)) < SESSIONS, log[-4000:]
            assert FURTHER in log, log[-4000:]
        # the burst's first lines are the ones kept
        assert GONE.search(log).start() < log.index(FURTHER), log[-4000:]
        shown = len(GONE.findall(log))

        time.sleep(max(0.0, t0 + WINDOW + 0.5 - time.monotonic()))
        session(dev, 0)  # a new window: logged, after the count left out
        wait_until(lambda: len(GONE.findall(sim.stderr())) > shown, 30, "the next window's line")
        log = sim.stderr()
        left_out = sum(int(n) for n in NOT_LOGGED.findall(log))
        assert left_out + len(GONE.findall(log)) == SESSIONS + 1, log[-4000:]
        last = NOT_LOGGED.search(log, log.rindex(FURTHER))
        assert last is not None and last.start() < GONE.search(log, last.start()).start()
