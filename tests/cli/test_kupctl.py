"""kupctl end to end: the installed console script against a real kupd +
kupsim (echo module) over unix sockets.

The echo module answers DATA with DATA of the same length: unchanged on even
channels, ASCII upper-cased on odd ones; PASS with PASS; ``!hold`` is never
answered (the kernel keeps the turn).  kupd's Call pool holds channels 0 and
1; the lease and session tests use explicit channels from 8 up so they never
meet each other.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest
from cli_gateway import Gateway, Kupctl, console_script, spawn_kupctl

from kupclient import errors as kerr
from kupclient import kupctl as kupctl_mod
from kupd.testing import REPO_ROOT, kupd, kupsim

EXIT_NOT_FOUND = 3
EXIT_BUSY = 4
EXIT_NOT_YOUR_TURN = 5
EXIT_TOO_BIG = 7
EXIT_NOT_READY = 10
EXIT_UNAVAILABLE = 17


def one_error_line(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """stderr is exactly one line starting 'kupctl:' and naming every needle."""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one error line, got: {proc.stderr!r}"
    line = lines[0]
    assert line.startswith("kupctl: "), line
    for n in needles:
        assert n in line, f"{n!r} not in {line!r}"
    return line


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"rc={proc.returncode} stderr={proc.stderr!r}"
    return proc.stdout


# ---------------------------------------------------------------- exit codes


def test_exit_codes_are_distinct_and_cover_every_error_class() -> None:
    codes = [code for _, code in kupctl_mod.EXIT_CODES]
    reserved = {
        kupctl_mod.EXIT_OK,
        kupctl_mod.EXIT_FAILURE,
        kupctl_mod.EXIT_USAGE,
        kupctl_mod.EXIT_NOT_SERVING,
    }
    assert len(set(codes)) == len(codes)
    assert not reserved & set(codes)
    classes = {cls for cls, _ in kupctl_mod.EXIT_CODES}
    for name in kerr.__all__:
        cls = getattr(kerr, name)
        if isinstance(cls, type) and issubclass(cls, kerr.KupError) and cls is not kerr.KupError:
            # a refinement (Releasing, a Busy) exits as the class it refines
            assert any(c in classes for c in cls.__mro__), f"{name} has no exit code"
    assert kupctl_mod.exit_code_for(kerr.Releasing("x")) == 4
    # The table in the module docstring and docs/kupctl.md say the same.
    doc = (Path(__file__).resolve().parents[2] / "docs" / "kupctl.md").read_text()
    for cls, code in kupctl_mod.EXIT_CODES:
        assert f"| {code} | `{cls.__name__}`" in doc, f"docs/kupctl.md lacks {code} {cls.__name__}"


# ---------------------------------------------------------------- devices / health


def test_devices_table(kupctl: Kupctl) -> None:
    out = ok(kupctl("devices"))
    assert out.splitlines()[0].split()[:2] == ["DEVICE", "STATE"]
    row = next(line.split() for line in out.splitlines() if line.startswith("echo "))
    assert row[1] == "ok"
    assert row[3] == "128"  # channels
    assert row[7:] == ["2", "0", "0"]  # call pool, calls in flight, queued
    assert "echo: channels 2 calls" in out


def test_devices_json(kupctl: Kupctl) -> None:
    doc = json.loads(ok(kupctl("devices", "--json")))
    (dev,) = doc["devices"]
    assert dev["name"] == "echo"
    assert dev["reachable"] is True
    assert dev["channel_count"] == len(dev["channels"]) == 128
    assert dev["max_message_bytes"] == 4096
    states = {c["id"]: c["state"] for c in dev["channels"]}
    assert states[0] == states[1] == "calls"
    assert states[127] == "free"


def test_devices_unknown_device(kupctl: Kupctl) -> None:
    p = kupctl("devices", "nosuch")
    assert p.returncode == EXIT_NOT_FOUND
    one_error_line(p, "NotFound", "nosuch")


def test_health(kupctl: Kupctl) -> None:
    assert ok(kupctl("health")).strip() == "SERVING"
    assert json.loads(ok(kupctl("--json", "health"))) == {"service": "", "status": "SERVING"}
    assert ok(kupctl("health", "--service", "kup.v1.Kup/echo")).strip() == "SERVING"


def test_health_unknown_service_names_the_known_ones(kupctl: Kupctl) -> None:
    p = kupctl("health", "--service", "echo")
    assert p.returncode == EXIT_NOT_FOUND
    line = one_error_line(p, "NotFound", "no health status for service 'echo'")
    assert "'kup.v1.Kup/echo'" in line and "'kup.v1.Kup'" in line


def test_socket_flag_overrides_env_and_unreachable_daemon(kupctl: Kupctl, gw: Gateway) -> None:
    env = gw.env()
    env["KUPD_SOCKET"] = "/nonexistent/kupd.sock"
    p = kupctl("health", env=env)
    assert p.returncode == EXIT_UNAVAILABLE
    one_error_line(p, "Unavailable", "nothing at /nonexistent/kupd.sock", "$KUPD_SOCKET")
    assert ok(kupctl("--socket", gw.socket, "health", env=env)).strip() == "SERVING"
    assert ok(kupctl("health", "--socket", gw.socket, env=env)).strip() == "SERVING"


def test_unreachable_socket_hints_name_the_cause(kupctl: Kupctl, tmp_path: Path) -> None:
    # a socket file nobody accepts on (a kupd killed without cleaning up)
    dead = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(dead))
    s.close()
    p = kupctl("--socket", str(dead), "health")
    assert p.returncode == EXIT_UNAVAILABLE
    one_error_line(p, "Unavailable", f"{dead} exists but nobody accepts on it")
    # gRPC's own wording of EACCES; a socket kupctl cannot stat is only named
    # (test_kupctl_probe_fixes provokes it and checks the owner/group/mode hint)
    denied = "connect failed: ... error: Permission denied"
    hint = kupctl_mod.unavailable_hint(denied, str(tmp_path / "gone.sock"))
    assert hint == f" (no permission to connect to {tmp_path / 'gone.sock'}; docs/security.md)"
    assert kupctl_mod.unavailable_hint("deadline", "/x.sock") == " (is kupd running on /x.sock?)"


# ---------------------------------------------------------------- call


def test_call_text_and_json(kupctl: Kupctl) -> None:
    out = ok(kupctl("call", "echo", "hello kupctl")).strip()
    # "#SEQ DATA (12 bytes): payload" -- payload case depends on the pool channel
    head, _, payload = out.partition(": ")
    assert head.endswith("DATA (12 bytes)")
    assert payload in ("hello kupctl", "HELLO KUPCTL")
    doc = json.loads(ok(kupctl("call", "echo", "abc", "--json")))
    assert doc["device"] == "echo"
    msg = doc["message"]
    assert msg["kind"] == "data"
    assert msg["data"] in ("abc", "ABC")
    assert msg["data_hex"] == msg["data"].encode().hex()
    assert msg["size"] == 3
    assert msg["seq"] >= 2
    # the pool channel that carried it: odd channels upper-case (echo)
    assert isinstance(doc["channel"], int)
    assert msg["data"] == ("ABC" if doc["channel"] % 2 else "abc"), doc


def test_call_data_sources_and_output_forms(kupctl: Kupctl, tmp_path: Path) -> None:
    payload = bytes([0, 1, 2, 0x80, 0xFF])  # no letters: every channel echoes it unchanged
    f = tmp_path / "payload.bin"
    f.write_bytes(payload)
    out = ok(kupctl("call", "echo", f"@{f}", "--hex")).strip()
    assert out.endswith(": " + payload.hex())
    out = ok(kupctl("call", "echo", "--hex-in", payload.hex(), "--hex")).strip()
    assert out.endswith(": " + payload.hex())
    # stdin, raw output
    out = ok(kupctl("call", "echo", "-", "--raw", input="123 456"))
    assert out == "123 456"
    # non-printable payload without --hex is shown as hex:...
    out = ok(kupctl("call", "echo", f"@{f}")).strip()
    assert out.endswith(": hex:" + payload.hex())


def test_call_errors(kupctl: Kupctl, tmp_path: Path) -> None:
    p = kupctl("call", "nosuch", "x")
    assert p.returncode == EXIT_NOT_FOUND
    one_error_line(p, "NotFound", "nosuch")
    p = kupctl("call", "echo", "x" * 5000)
    assert p.returncode == EXIT_TOO_BIG
    one_error_line(p, "TooBig", "4096")
    p = kupctl("call", "echo", f"@{tmp_path}/missing.bin")
    assert p.returncode == 1
    one_error_line(p, "missing.bin")
    p = kupctl("call", "echo", "--hex-in", "zz")
    assert p.returncode == 1
    one_error_line(p, "hex")
    p = kupctl("call", "echo")
    assert p.returncode == 2  # usage
    assert "DATA" in p.stderr or "data" in p.stderr


# ---------------------------------------------------------------- leases


def test_lease_round_trip(kupctl: Kupctl) -> None:
    lease = ok(kupctl("attach", "echo", "--channel", "9")).strip()
    assert lease and " " not in lease
    try:
        assert ok(kupctl("recv", lease)).strip() == "#1 PASS"
        assert ok(kupctl("send", lease, "lease data")).strip() == "sent 10 bytes"
        assert (
            ok(kupctl("recv", lease, "--timeout", "20")).strip() == "#2 DATA (10 bytes): LEASE DATA"
        )
        # we hold the turn and consumed the reply: receive can only be NotYourTurn
        p = kupctl("recv", lease, "--nb")
        assert p.returncode == EXIT_NOT_YOUR_TURN
        one_error_line(p, "NotYourTurn")
        assert ok(kupctl("pass", lease)).strip() == "passed the turn"
        doc = json.loads(ok(kupctl("--json", "recv", lease)))
        assert doc["ready"] is True
        assert doc["message"]["kind"] == "pass"
        assert doc["message"]["seq"] == 3
        # the kernel keeps the turn after !hold: non-blocking receive is not ready
        ok(kupctl("send", lease, "!hold"))
        p = kupctl("recv", lease, "--nb")
        assert p.returncode == EXIT_NOT_READY
        assert "not ready" in p.stdout
        p = kupctl("recv", lease, "--nb", "--json")
        assert p.returncode == EXIT_NOT_READY
        assert json.loads(p.stdout) == {"lease_id": lease, "ready": False}
        p = kupctl("pass", lease)
        assert p.returncode == EXIT_NOT_YOUR_TURN
        one_error_line(p, "NotYourTurn")
    finally:
        released = kupctl("release", lease)
    assert ok(released).strip() == f"released {lease}"
    p = kupctl("recv", lease)
    assert p.returncode == EXIT_NOT_FOUND
    one_error_line(p, "NotFound", lease)


def test_attach_json(kupctl: Kupctl) -> None:
    doc = json.loads(ok(kupctl("attach", "echo", "--channel", "10", "--json")))
    try:
        assert doc["device"] == "echo"
        assert doc["channel"] == 10
        assert doc["max_message_bytes"] == 4096
        assert doc["idle_timeout_ms"] > 0
        devs = json.loads(ok(kupctl("devices", "echo", "--json")))["devices"]
        chan = devs[0]["channels"][10]
        assert chan == {"id": 10, "state": "lease", "lease_id": doc["lease_id"]}
        assert json.loads(ok(kupctl("--json", "send", doc["lease_id"], "x"))) == {
            "lease_id": doc["lease_id"],
            "sent": 1,
        }
    finally:
        assert json.loads(ok(kupctl("--json", "release", doc["lease_id"]))) == {
            "lease_id": doc["lease_id"],
            "released": True,
        }


def test_attach_whose_id_cannot_be_shown_releases_its_lease(
    kupctl: Kupctl, gw: Gateway
) -> None:
    """kupctl attach whose output goes nowhere (its reader gone before the
    lease id was written; or Ctrl-C just then) left a lease no one knew the
    id of, holding its channel until it idled out.  It releases it."""
    exe = str(console_script("kupctl"))
    r, w = os.pipe()
    os.close(r)  # the reader is gone before kupctl writes
    try:
        p = subprocess.run(
            [exe, "attach", "echo", "--channel", "12"],
            stdout=w, stderr=subprocess.PIPE, text=True, env=gw.env(), timeout=120,
            check=False,
        )
    finally:
        os.close(w)
    assert "Traceback" not in p.stderr, p.stderr
    devs = json.loads(ok(kupctl("devices", "echo", "--json")))["devices"]
    assert devs[0]["channels"][12]["state"] == "free", devs[0]["channels"][12]


def test_lease_errors(kupctl: Kupctl) -> None:
    p = kupctl("attach", "nosuch")
    assert p.returncode == EXIT_NOT_FOUND
    one_error_line(p, "NotFound", "nosuch")
    p = kupctl("attach", "echo", "--channel", "0")  # the Call pool's
    assert p.returncode == EXIT_BUSY
    one_error_line(p, "Busy", "channel 0")
    for cmd in (
        ("send", "nolease", "x"),
        ("recv", "nolease"),
        ("pass", "nolease"),
        ("release", "nolease"),
    ):
        p = kupctl(*cmd)
        assert p.returncode == EXIT_NOT_FOUND, cmd
        one_error_line(p, "NotFound", "nolease")
    p = kupctl("attach", "echo", "--channel", "-1")
    assert p.returncode == 2
    assert "channel" in p.stderr


# ---------------------------------------------------------------- session


def test_session_interactive(kupctl: Kupctl) -> None:
    script = "\n".join(
        [
            ":recv",  # the kernel's first PASS
            "hello session",  # plain text = send
            ":recv",
            ":recv",  # NotYourTurn, reported, session goes on
            ":pass",
            ":recv 20",
            ":bogus",
            "::colon",  # a leading ':' doubled sends ':colon'
            ":recv",
            ":hex 00ff",
            ":recv",
            ":hex 01",  # one byte: "1 byte", not "1 bytes"
            ":recv",
            ":quit",
            "never sent",
        ]
    )
    out = ok(kupctl("session", "echo", "--channel", "11", input=script + "\n"))
    lines = out.splitlines()
    assert lines[0].startswith("attached echo channel 11 (lease ")
    assert lines[1:] == [
        "#1 PASS",
        "sent 13 bytes",
        "#2 DATA (13 bytes): HELLO SESSION",
        "error: NotYourTurn: " + lines[4].partition("error: NotYourTurn: ")[2],
        "passed the turn",
        "#3 PASS",
        "error: unknown session command ':bogus' (try :help)",
        "sent 6 bytes",
        "#4 DATA (6 bytes): :COLON",
        "sent 2 bytes",
        "#5 DATA (2 bytes): hex:00ff",
        "sent 1 byte",
        "#6 DATA (1 byte): hex:01",
        "session ended",
    ]
    assert "channel 11" in lines[4]
    # the lease ended with the session
    devs = json.loads(ok(kupctl("devices", "echo", "--json")))["devices"]
    assert devs[0]["channels"][11]["state"] == "free"


def test_session_json_and_end_of_input(kupctl: Kupctl) -> None:
    # ``:nb`` right after attach raced the kernel's first PASS (kupd does not
    # wait for it), so it is asked where its answer is certain: after
    # ``!hold`` the kernel keeps the turn, so it must report not ready.
    script = ":recv\nabc\n:recv\n!hold\n:nb\n"
    out = ok(kupctl("--json", "session", "echo", "--channel", "12", input=script))
    docs = [json.loads(line) for line in out.splitlines()]
    assert docs[0]["op"] == "attach"
    assert docs[0]["channel"] == 12
    assert docs[1]["op"] == "recv" and docs[1]["message"]["kind"] == "pass"
    assert docs[2] == {"op": "send", "size": 3}
    assert docs[3]["op"] == "recv"
    assert docs[3]["message"]["data"] == "abc"  # even channel: unchanged
    assert docs[3]["message"]["seq"] == 2
    assert docs[4] == {"op": "send", "size": 5}
    assert docs[5] == {"op": "recv", "ready": False}
    assert docs[6] == {"op": "end"}


def test_session_errors(kupctl: Kupctl) -> None:
    p = kupctl("session", "nosuch", input=":quit\n")
    assert p.returncode == EXIT_NOT_FOUND
    one_error_line(p, "NotFound", "nosuch")
    p = kupctl("session", "echo", "--channel", "1", input=":quit\n")
    assert p.returncode == EXIT_BUSY
    one_error_line(p, "Busy")
    p = kupctl("session", "echo", "--channel", "14", input=":recv\n" + "y" * 5000 + "\n:quit\n")
    assert p.returncode == 0  # a failed send is reported and the session goes on
    assert "error: TooBig:" in p.stdout and "4096" in p.stdout


# ---------------------------------------------------------------- watch


def _read_json_line(proc: subprocess.Popen[str]) -> dict[str, object]:
    """The next event of a running ``kupctl --json watch`` (it flushes each
    one; a hang is bounded by the test timeout)."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, f"watch ended early: rc={proc.poll()}"
    doc: dict[str, object] = json.loads(line)
    return doc


def test_watch_sees_lease_events(kupctl: Kupctl, gw: Gateway) -> None:
    watch = spawn_kupctl(gw, "--json", "watch", "echo", "--initial")
    try:
        first = _read_json_line(watch)  # the initial state: the stream is live
        assert first["initial"] is True
        assert first["device"] == "echo"
        lease = ok(kupctl("attach", "echo", "--channel", "13")).strip()
        ok(kupctl("release", lease))
        seen: list[dict[str, object]] = []
        while not any(e["type"] == "lease_released" for e in seen):
            ev = _read_json_line(watch)
            if not ev["initial"]:
                seen.append(ev)
        taken = next(e for e in seen if e["type"] == "lease_taken")
        released = next(e for e in seen if e["type"] == "lease_released")
        for e in (taken, released):
            assert e["lease_id"] == lease
            assert e["channel"] == 13
            assert e["holder"] == "lease"
        assert released["reason"] == "released"
    finally:
        watch.terminate()
        watch.communicate(timeout=30)


def test_watch_table_and_count(kupctl: Kupctl) -> None:
    out = ok(kupctl("watch", "echo", "--initial", "--count", "1")).strip()
    fields = out.split()
    assert fields[1] == "device_appeared"
    assert fields[2] == "echo"
    assert "(initial)" in out
    p = kupctl("watch", "nosuch", "--count", "1")
    assert p.returncode == EXIT_NOT_FOUND
    one_error_line(p, "NotFound", "nosuch")
    # a count that could never stop the watch is a usage error, not "forever"
    for bad, why in (("0", "must be >= 1"), ("-3", "must be >= 1"), ("x", "not a number")):
        p = kupctl("watch", "echo", "--count", bad)
        assert p.returncode == 2, (bad, p.stderr)
        assert f"argument --count: {why}" in p.stderr, p.stderr


# ---------------------------------------------------------------- stats


def test_stats(kupctl: Kupctl, gw: Gateway) -> None:
    for i in range(3):
        ok(kupctl("call", "echo", f"stats {i}"))
    assert kupctl("call", "nosuch", "x").returncode == EXIT_NOT_FOUND
    doc = json.loads(ok(kupctl("stats", "--json", "--metrics", gw.metrics_url)))
    pool = [r for r in doc["channels"] if r["device"] == "echo" and r["channel"] in ("0", "1")]
    assert sum(int(r["msgs_to_kernel"]) for r in pool) >= 3
    assert sum(int(r["bytes_to_kernel"]) for r in pool) >= 3 * len("stats 0")
    (dev,) = [r for r in doc["devices"] if r["device"] == "echo"]
    assert int(dev["calls"]) >= 3
    assert any(e["code"] == "NOT_FOUND" and int(e["count"]) >= 1 for e in doc["errors"])
    # the table, with the endpoint given as HOST:PORT
    hostport = gw.metrics_url.removeprefix("http://").removesuffix("/metrics")
    out = ok(kupctl("stats", "--metrics", hostport))
    assert out.splitlines()[0].split()[:3] == ["DEVICE", "CHANNEL", "MSGS_TO_KERNEL"]
    assert any(
        line.split()[:2] == ["echo", "0"] or line.split()[:2] == ["echo", "1"]
        for line in out.splitlines()
    )
    assert "NOT_FOUND" in out


def test_stats_unreachable_endpoint(kupctl: Kupctl, gw: Gateway) -> None:
    p = kupctl("stats", "--metrics", "127.0.0.1:1")
    assert p.returncode == EXIT_UNAVAILABLE
    line = one_error_line(p, "127.0.0.1:1", "metrics")
    # the documented `kupctl: Kind: message`, like every other error
    assert line.startswith("kupctl: Unavailable: cannot reach the metrics endpoint "), line
    # the same when the URL comes from $KUPD_METRICS
    env = {**gw.env(), "KUPD_METRICS": "http://127.0.0.1:1/metrics"}
    p = kupctl("stats", env=env)
    assert p.returncode == EXIT_UNAVAILABLE
    line = one_error_line(p, "http://127.0.0.1:1/metrics")
    assert line.startswith("kupctl: Unavailable: cannot reach the metrics endpoint "), line


def test_version_of_both_commands_is_the_project_version() -> None:
    want = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
    for name, text in (
        ("kupctl", f"kupctl {want} (API kup.v1)"),
        ("kupd", f"kupd {want} (API kup.v1, KUP ABI version 1)"),
    ):
        p = subprocess.run(
            [str(console_script(name)), "--version"], capture_output=True, text=True, timeout=60
        )
        assert p.returncode == 0, p.stderr
        assert p.stdout.strip() == text


def test_both_programs_run_as_modules_are_the_console_scripts() -> None:
    # `python -m kupd` and `python -m kupclient.kupctl` are the same programs
    # as the console scripts: the same --version and --help, exit status 0
    for name, module in (("kupd", "kupd"), ("kupctl", "kupclient.kupctl")):
        for flag in ("--version", "--help"):
            script = subprocess.run(
                [str(console_script(name)), flag], capture_output=True, text=True, timeout=60
            )
            as_module = subprocess.run(
                [sys.executable, "-m", module, flag], capture_output=True, text=True, timeout=60
            )
            assert script.returncode == 0, script.stderr
            assert as_module.returncode == 0, (module, flag, as_module.stderr)
            assert as_module.stdout == script.stdout, (module, flag)
            assert as_module.stdout.startswith(f"{name} " if flag == "--version" else "usage: ")


def test_reload_on_the_wrong_socket_says_which(kupctl: Kupctl, gw: Gateway, tmp_path: Path) -> None:
    # nothing at the admin socket: the hint names it and how it was given
    gone = str(tmp_path / "admin.sock")
    p = kupctl("reload", "--admin-socket", gone)
    assert p.returncode == EXIT_UNAVAILABLE
    one_error_line(p, "Unavailable", f"nothing at {gone}", "--admin-socket / $KUPD_ADMIN_SOCKET")
    # the client socket instead of the admin one: it serves no Admin method,
    # which is NotFound (exit 3), not a system call failing in kupd
    for cmd in ("reload", "leases"):
        p = kupctl(cmd, "--admin-socket", gw.socket)
        assert p.returncode == EXIT_NOT_FOUND, (cmd, p.stderr)
        line = one_error_line(p, "does not serve that method", "admin_socket")
        assert line.startswith("kupctl: NotFound: the server on this socket "), line


def test_reload_timeout_is_checked_as_attachs(kupctl: Kupctl) -> None:
    """reload --timeout S takes what attach --timeout takes: a bad S is a
    usage error naming it (exit 2), nothing sent."""
    for bad, why in (
        ("0", "must be > 0 seconds"),
        ("-1", "must be > 0 seconds"),
        ("soon", "not a number of seconds: 'soon'"),
        ("inf", "finite"),
        ("5000000", "at most"),
    ):
        p = kupctl("reload", "--admin-socket", "/nonexistent/admin.sock", "--timeout", bad)
        assert p.returncode == 2, (bad, p.stderr)
        assert "argument --timeout" in p.stderr and why in p.stderr, (bad, p.stderr)


def test_reload_of_a_stopped_kupd_fails_at_its_timeout() -> None:
    """kupd SIGSTOPped: its admin socket still takes the connection, and
    nothing answers.  reload --timeout 1 fails then -- exit 9, one line
    saying kupd did not answer the reload within 1 s and what that means --
    rather than after the 30 s it used to wait (service kupd reload too)."""
    d = Path(tempfile.mkdtemp(prefix="kupd-rs-"))  # short: a unix socket's path
    try:
        config = d / "kupd.toml"
        admin = d / "admin.sock"
        with kupsim("echo", check_exit=False) as sim:
            config.write_text(
                f'socket = "{d}/kupd.sock"\nadmin_socket = "{admin}"\n'
                f'kupsim_dir = "{sim.rundir}"\npid_file = "-"\n[[device]]\nname = "echo"\n'
            )
            with kupd(
                config=config, health_socket=d / "kupd.sock", env=sim.env(), start_timeout=60.0
            ) as k:
                os.kill(k.pid, signal.SIGSTOP)
                try:
                    p = subprocess.run(
                        [str(console_script("kupctl")), "reload", "--admin-socket", str(admin),
                         "--timeout", "1"],
                        capture_output=True, text=True, timeout=60, env=sim.env(),
                    )  # fmt: skip
                finally:
                    os.kill(k.pid, signal.SIGCONT)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    assert p.returncode == 9, p.stderr
    line = one_error_line(
        p, "kupd did not answer the reload within 1 s", "stopped or hung", "--timeout"
    )
    assert line.startswith("kupctl: DeadlineExceeded: "), line


def test_admin_client_reload_timeout_is_checked() -> None:
    """AdminClient.reload(timeout=) is checked as every timeout of the
    client's: not a finite number > 0 -- an ArgumentError, nothing sent."""
    from kupclient.admin import AdminClient

    with AdminClient("/nonexistent/admin.sock") as a:
        for bad in (0, -1.0, float("nan"), float("inf")):
            with pytest.raises(kerr.ArgumentValueError, match="timeout must be"):
                a.reload(timeout=bad)
        with pytest.raises(kerr.ArgumentTypeError, match="timeout must be a number"):
            a.reload(timeout="10")  # type: ignore[arg-type]
