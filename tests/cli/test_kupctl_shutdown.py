"""kupctl when kupd shuts down under it (SIGTERM): ``watch`` prints the
server_shutting_down event and exits with Shutdown's code; an open
``session`` ends with Shutdown's code at its next operation; gRPC's own log
lines stay off kupctl's stderr."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cli_gateway import console_script, gateway, spawn_kupctl

from kupd.testing import wait_until

EXIT_SHUTDOWN = 6
TIMEOUT = 60.0

#: A line of gRPC's core log: "I1127 15:14:19.999591 ... file.cc:1403] ...".
GRPC_LOG_LINE = re.compile(r"^[IWEF]\d{4} ", re.MULTILINE)


def test_watch_and_session_end_on_kupd_shutdown() -> None:
    with gateway(("echo:2",)) as gw:
        watch = spawn_kupctl(gw, "--json", "watch", "--initial")
        session = spawn_kupctl(gw, "session", "echo", "--channel", "5", stdin=True)
        try:
            assert watch.stdout is not None and session.stdout is not None
            assert session.stdin is not None
            assert json.loads(watch.stdout.readline())["initial"] is True
            assert session.stdout.readline().startswith("attached echo channel 5 ")
            session.stdin.write(":recv\n")
            session.stdin.flush()
            assert session.stdout.readline().strip() == "#1 PASS"

            gw.proc.send_signal(signal.SIGTERM)

            w_out, w_err = watch.communicate(timeout=TIMEOUT)
            events = [json.loads(line) for line in w_out.splitlines()]
            why = f"watch rc={watch.returncode} stdout={w_out!r} stderr={w_err!r}\n{gw.log()}"
            assert any(e["type"] == "server_shutting_down" for e in events), why
            assert watch.returncode == EXIT_SHUTDOWN, why
            # --json: the error too is one JSON object (docs/kupctl.md)
            assert len(w_err.splitlines()) == 1, why
            assert json.loads(w_err)["error"] == "Shutdown", why

            s_out, s_err = session.communicate("hello\n", timeout=TIMEOUT)
            why = f"session rc={session.returncode} stdout={s_out!r} stderr={s_err!r}\n{gw.log()}"
            assert session.returncode == EXIT_SHUTDOWN, why
            assert s_err.startswith("kupctl: Shutdown: ") and len(s_err.splitlines()) == 1, why
            assert "EKU_SHUTDOWN" in s_err, why
        finally:
            for p in (watch, session):
                if p.poll() is None:
                    p.kill()
                    p.communicate()


def _stopped(pid: int) -> bool:
    """The process is stopped (SIGSTOP has taken effect): Linux /proc."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] == "T"


@pytest.mark.parametrize(
    ("how", "verbosity"),
    [("console script", None), ("python -m", None), ("console script", "INFO")],
)
def test_grpc_log_lines_stay_off_stderr(how: str, verbosity: str | None) -> None:
    """kupd stopping its sockets with a client still connected sends it a
    GOAWAY ("Cancelling all calls", after a 1 s grace), and gRPC's core logs
    that on the client's stderr ("I1127 ... Got goaway [2] ...").  kupctl
    keeps to its one error line -- unless the user set GRPC_VERBOSITY.  The
    watch is stopped (SIGSTOP) while kupd drains, so its connection is still
    there at that point."""
    if how == "console script":
        argv = [str(console_script("kupctl"))]
    else:
        argv = [sys.executable, "-m", "kupclient.kupctl"]
    with gateway(("echo:2",)) as gw:
        env = gw.env()
        env.pop("GRPC_VERBOSITY", None)
        if verbosity is not None:
            env["GRPC_VERBOSITY"] = verbosity
        watch = subprocess.Popen(
            [*argv, "watch", "--initial"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=env,
        )  # fmt: skip
        try:
            assert watch.stdout is not None
            assert "(initial)" in watch.stdout.readline()
            watch.send_signal(signal.SIGSTOP)
            wait_until(lambda: _stopped(watch.pid), what="kupctl watch stopped")
            gw.proc.send_signal(signal.SIGTERM)
            assert gw.proc.wait(TIMEOUT) == 0, gw.log()
            watch.send_signal(signal.SIGCONT)
            out, err = watch.communicate(timeout=TIMEOUT)
        finally:
            if watch.poll() is None:
                watch.kill()
                watch.communicate()
    why = f"rc={watch.returncode} stdout={out!r} stderr={err!r}"
    assert watch.returncode == EXIT_SHUTDOWN, why
    assert "server_shutting_down" in out, why
    if verbosity is None:
        assert not GRPC_LOG_LINE.search(err), why
        assert err.startswith("kupctl: Shutdown: ") and err.count("\n") == 1, why
    else:  # the user's own GRPC_VERBOSITY: gRPC's lines are what they asked for
        assert "Got goaway [2]" in err, why
        assert err.splitlines()[-1].startswith("kupctl: Shutdown: "), why
