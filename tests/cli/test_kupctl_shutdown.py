"""kupctl when kupd shuts down under it (SIGTERM): ``watch`` prints the
server_shutting_down event and exits with Shutdown's code; an open
``session`` ends with Shutdown's code at its next operation."""

from __future__ import annotations

import json
import signal

from cli_gateway import gateway, spawn_kupctl

EXIT_SHUTDOWN = 6
TIMEOUT = 60.0


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
            assert w_err.startswith("kupctl: Shutdown: ") and len(w_err.splitlines()) == 1, why

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
