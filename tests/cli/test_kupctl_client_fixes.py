"""kupctl's answers to bad input and interruptions: one line and a usage
exit code instead of a traceback; ^C during a session's receive exits 130;
``--json revoke`` prints JSON; the "is kupd running?" hint only when the
connection itself failed, not for kupd's own Unavailable, nor when kupd
closed it (keepalive); an empty path variable is a usage error; an Admin
call on a socket without Admin is NotFound."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cli_gateway import Gateway, console_script, spawn_kupctl

from kupclient import Client
from kupclient import errors as kerr
from kupclient._errors import error_from_status, is_connection_failure
from kupclient.admin import AdminClient
from kupclient.kupctl import unavailable_hint
from kupd.testing import Kupd, kupsim, start_kupd, wait_until

EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_UNAVAILABLE = 17
TIMEOUT = 60.0


def one_line(p: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert lines, p
    return lines[-1]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("call", "echo", "hello", "--timeout", "inf"), "argument --timeout"),
        (("call", "echo", "hello", "--timeout", "1e10"), "at most 4294967.295 seconds"),
        (("recv", "somelease", "--timeout", "nan"), "argument --timeout"),
        (("attach", "echo", "--channel", "99999999999"), "channel must be <= 4294967295"),
        (("session", "echo", "--channel", str(2**32)), "channel must be <= 4294967295"),
        (("call", "", "hi"), "call: device name is required"),
        (("attach", ""), "attach: device name is required"),
        (("session", ""), "session: device name is required"),
        (("devices", "\udcff"), "device must be valid UTF-8"),
        (("recv", "\udcff\udcfe"), "recv: lease id must be valid UTF-8"),
        (("send", "\udcff", "x"), "send: lease id must be valid UTF-8"),
        (("release", ""), "release: lease id is required"),
        (("--socket", "", "health"), "argument --socket: must not be empty"),
        (("health", "--socket", ""), "argument --socket: must not be empty"),
        (("revoke", "x", "--admin-socket", ""), "argument --admin-socket: must not be empty"),
        (("stats", "--metrics", ""), "argument --metrics: must not be empty"),
    ],
)
def test_bad_arguments_are_usage_errors(
    gw: Gateway, args: tuple[str, ...], needle: str
) -> None:
    # argv as bytes, so a non-UTF-8 argument reaches kupctl as it would from a shell
    exe = str(console_script("kupctl"))
    argv = [os.fsencode(a) for a in (exe, *args)]
    p = subprocess.run(
        argv, capture_output=True, text=True, env=gw.env(), timeout=TIMEOUT, check=False
    )
    assert p.returncode == EXIT_USAGE, (p.returncode, p.stderr)
    assert needle in one_line(p), p.stderr


def test_json_errors_are_json_objects(gw: Gateway, tmp_path: Path) -> None:
    """With --json a failure is one JSON object on stderr (it was the plain
    line, which a script reading JSON had to parse apart); the exit code is
    the same.  Without --json it is the plain line still."""

    def run(*args: str) -> tuple[int, dict[str, object]]:
        p = subprocess.run(
            [str(console_script("kupctl")), *args],
            capture_output=True, text=True, env=gw.env(), timeout=TIMEOUT, check=False,
        )  # fmt: skip
        assert p.stderr.count("\n") == 1, p.stderr
        doc = json.loads(p.stderr)
        assert doc["exit_code"] == p.returncode, doc
        return p.returncode, doc

    code, doc = run("--json", "devices", "no-such-device")
    assert code == EXIT_NOT_FOUND
    assert doc == {
        "error": "NotFound", "message": doc["message"], "exit_code": EXIT_NOT_FOUND,
        "command": "devices", "kup_code": 1009, "grpc_code": "NOT_FOUND",
        "connection_failure": False,
    }, doc  # fmt: skip
    assert str(doc["message"]).startswith("EKU_NOENT: ") and "no-such-device" in str(doc["message"])
    code, doc = run("call", "", "hi", "--json")
    assert (code, doc) == (EXIT_USAGE, {
        "error": "usage", "message": "device name is required", "exit_code": EXIT_USAGE,
        "command": "call",
    }), doc  # fmt: skip
    code, doc = run("--json", "--socket", str(tmp_path / "nobody.sock"), "health")
    assert code == EXIT_UNAVAILABLE and doc["error"] == "Unavailable", doc
    assert doc["connection_failure"] is True and doc["grpc_code"] == "UNAVAILABLE", doc
    assert "is kupd running" in str(doc["message"]), doc  # the hint too
    code, doc = run("--json", "send", "no-lease", "@" + str(tmp_path / "no-such-file"))
    assert code == 1 and doc["error"] == "failure" and "no-such-file" in str(doc["message"]), doc
    p = subprocess.run(
        [str(console_script("kupctl")), "devices", "no-such-device"],
        capture_output=True, text=True, env=gw.env(), timeout=TIMEOUT, check=False,
    )  # fmt: skip
    assert one_line(p).startswith("kupctl: NotFound: EKU_NOENT: "), p.stderr


@pytest.mark.parametrize(
    ("var", "args"),
    [
        ("KUPD_SOCKET", ("health",)),
        ("KUPD_SOCKET", ("devices", "--json")),
        ("KUPD_ADMIN_SOCKET", ("leases",)),
        ("KUPD_METRICS", ("stats",)),
    ],
)
def test_empty_variables_are_usage_errors(gw: Gateway, var: str, args: tuple[str, ...]) -> None:
    """An empty path or URL variable is refused like the empty option, not
    silently replaced by the default (which may be another kupd)."""
    p = subprocess.run(
        [str(console_script("kupctl")), *args],
        capture_output=True, text=True, env={**gw.env(), var: ""}, timeout=TIMEOUT, check=False,
    )  # fmt: skip
    assert p.returncode == EXIT_USAGE, (p.returncode, p.stderr)
    assert one_line(p) == f"kupctl: error: ${var} is set but empty: unset it for the default"
    # the option still wins over the variable, empty or not
    if var == "KUPD_SOCKET":
        p = subprocess.run(
            [str(console_script("kupctl")), "--socket", gw.socket, *args],
            capture_output=True, text=True, env={**gw.env(), var: ""}, timeout=TIMEOUT,
            check=False,
        )  # fmt: skip
        assert p.returncode == 0, p.stderr


def test_data_argument_that_is_not_utf8_is_sent_as_its_bytes(gw: Gateway) -> None:
    exe = str(console_script("kupctl"))
    p = subprocess.run(
        [os.fsencode(exe), b"call", b"echo", b"\xff\x01\xfe", b"--hex"],
        capture_output=True, text=True, env=gw.env(), timeout=TIMEOUT, check=False,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().endswith(": ff01fe"), p.stdout


def test_session_bad_lines_are_reported_and_the_session_goes_on(gw: Gateway) -> None:
    script = b":recv\n:recv inf\n:recv 1e10\n:\xff\n\xff\xfe\n:recv 20\n:quit\n"
    p = subprocess.run(
        [str(console_script("kupctl")), "session", "echo", "--channel", "40"],
        input=script, capture_output=True, env=gw.env(), timeout=TIMEOUT, check=False,
    )  # fmt: skip
    out, err = p.stdout.decode(), p.stderr.decode()
    assert p.returncode == 0, err
    assert "Traceback" not in err, err
    lines = out.splitlines()
    assert lines[1:] == [
        "#1 PASS",
        "error: :recv timeout must be None or a finite number > 0 seconds, not inf",
        "error: :recv timeout must be at most 4294967.295 seconds (uint32 milliseconds on "
        "the wire), not 10000000000.0",
        "error: session command is not valid UTF-8: b':\\xff'",
        "sent 2 bytes",  # a data line that is not UTF-8: its bytes are sent
        "#2 DATA (2 bytes): hex:fffe",
        "session ended",
    ], out


def test_interrupt_during_a_session_receive_exits_130(gw: Gateway) -> None:
    session = spawn_kupctl(gw, "session", "echo", "--channel", "41", stdin=True)
    try:
        assert session.stdin is not None and session.stdout is not None
        session.stdin.write(":recv\n!hold\n:recv\n")  # echo never answers !hold
        session.stdin.flush()
        assert session.stdout.readline().startswith("attached echo channel 41 ")
        assert session.stdout.readline().strip() == "#1 PASS"
        assert session.stdout.readline().strip() == "sent 5 bytes"
        time.sleep(0.5)  # the last :recv waits in kupd
        session.send_signal(signal.SIGINT)
        _, err = session.communicate(timeout=TIMEOUT)
        assert session.returncode == 130, (session.returncode, err)
        assert err == "", err
    finally:
        if session.poll() is None:
            session.kill()
            session.communicate()
    with Client(gw.socket) as c:
        wait_until(
            lambda: c.devices("echo")[0].channels[41].state == "free", what="channel 41 free"
        )


def _loading_grpc(pid: int) -> bool:
    """Whether process ``pid`` has mapped gRPC's extension (kupctl loads it
    after Python's own start-up, a ^C there is kupctl's to handle)."""
    try:
        return "cygrpc" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def test_interrupt_while_kupctl_loads_exits_quietly(gw: Gateway) -> None:
    """A ^C while kupctl is still loading (grpc, protobuf: a third of a
    second) exits 130 with nothing on stderr; it printed a KeyboardInterrupt
    traceback from the import."""
    for _ in range(3):
        p = spawn_kupctl(gw, "watch")
        deadline = time.monotonic() + TIMEOUT
        while not _loading_grpc(p.pid) and p.poll() is None:
            assert time.monotonic() < deadline, "kupctl never loaded grpc"
            time.sleep(0.001)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=TIMEOUT)
        assert p.returncode == 130, (p.returncode, err)
        assert err == "", err


# ---------------------------------------------------------------- Unavailable hint


def test_unavailable_hint_only_for_connection_failures() -> None:
    refused = error_from_status(grpc.StatusCode.UNAVAILABLE, "failed to connect", None)
    assert isinstance(refused, kerr.Unavailable) and is_connection_failure(refused)
    kupds = error_from_status(
        grpc.StatusCode.UNAVAILABLE, "device echo has no Call pool", [("kup-error", "Unavailable")]
    )
    assert isinstance(kupds, kerr.Unavailable) and not is_connection_failure(kupds)
    assert not is_connection_failure(kerr.Unavailable("made by hand"))


def test_hint_when_kupd_closed_the_connection() -> None:
    hint = unavailable_hint("ping timeout", "/x.sock")
    assert hint == (
        " (kupd closed the connection: keepalive ping not answered in time "
        "(client too slow or stopped))"
    )
    goaway = "GOAWAY received; Error code: 11; Debug Text: ping_timeout"
    assert unavailable_hint(goaway, "/x.sock") == hint
    cancelled = "GOAWAY received; Error code: 2; Debug Text: Cancelling all calls"
    assert unavailable_hint(cancelled, "/x.sock") == (
        " (kupd closed the connection: it is stopping -- or a reload moved or removed this "
        "socket and this request ran on there past call_timeout)"
    )
    # written to after kupd closed it: kupd stopped, or dropped this client
    broken = unavailable_hint("Stream removed (sendmsg: Broken pipe (32))", "/x.sock")
    assert broken.startswith(" (kupd closed the connection: it stopped, or it dropped "), broken
    assert "keepalive ping not answered in time" in broken, broken
    # read the end of the connection (kupd was killed): is it running?
    assert unavailable_hint("Stream removed (Socket closed)", "/x.sock") == (
        " (is kupd running on /x.sock?)"
    )


def test_client_dropped_by_keepalive_is_told_so(gw: Gateway) -> None:
    """kupd drops a client that does not answer its keepalive pings (here:
    stopped with SIGSTOP until kupd has freed its channel); the session's
    next operation says so, not "is kupd running?" -- kupd is."""
    session = spawn_kupctl(gw, "session", "echo", "--channel", "43", stdin=True)
    try:
        assert session.stdout is not None
        assert session.stdout.readline().startswith("attached echo channel 43 ")
        session.send_signal(signal.SIGSTOP)
        with Client(gw.socket) as c:
            wait_until(
                lambda: c.devices("echo")[0].channels[43].state == "free",
                timeout=TIMEOUT,
                what="the stopped client dropped by keepalive",
            )
        session.send_signal(signal.SIGCONT)
        _, err = session.communicate(":recv\n", timeout=TIMEOUT)
    finally:
        if session.poll() is None:
            session.kill()
            session.communicate()
    assert session.returncode == EXIT_UNAVAILABLE, err
    # gRPC's reason depends on whether the resumed client first reads kupd's
    # "ping timeout" or first writes to the closed socket ("Broken pipe"):
    # kupclient explains the first itself (kupclient._errors.PING_TIMEOUT,
    # and kupctl adds nothing), kupctl the second
    assert err.startswith("kupctl: Unavailable: ") and err.count("\n") == 1, err
    if err.startswith("kupctl: Unavailable: ping timeout ("):
        assert "a keepalive ping went unanswered: kupd drops a client" in err, err
    else:
        assert " (kupd closed the connection: " in err, err
        assert "keepalive ping not answered in time (client too slow or stopped))" in err, err
    assert "is kupd running" not in err, err


@pytest.fixture(scope="module")
def admin_gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Kupd, str]]:
    """kupd with an admin socket, serving echo without a Call pool."""
    tmp = tmp_path_factory.mktemp("admin")
    with kupsim("echo", check_exit=False) as sim:
        admin = str(tmp / "admin.sock")
        conf = tmp / "kupd.toml"
        conf.write_text(
            f'socket = "{tmp}/kupd.sock"\n'
            f'admin_socket = "{admin}"\n'
            f'kupsim_dir = "{sim.rundir}"\n'
            '[[device]]\nname = "echo"\ncall_channels = 0\n'
        )
        k = start_kupd(config=conf, socket=tmp / "kupd.sock", log=tmp / "kupd.log", sim=sim)
        try:
            yield k, admin
        finally:
            k.stop()


def _run(k: Kupd, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(console_script("kupctl")), *args],
        capture_output=True, text=True, env=k.env(), timeout=TIMEOUT, check=False,
    )  # fmt: skip


def test_kupds_own_unavailable_gets_no_connection_hint(admin_gw: tuple[Kupd, str]) -> None:
    k, _ = admin_gw
    p = _run(k, "call", "echo", "x")
    assert p.returncode == EXIT_UNAVAILABLE
    line = one_line(p)
    assert "has no Call pool" in line, line
    assert "is kupd running" not in line and k.socket not in line, line
    # a connection that failed still gets it
    p = _run(k, "--socket", str(Path(k.socket).parent / "none.sock"), "health")
    assert p.returncode == EXIT_UNAVAILABLE
    assert "nothing at" in one_line(p)


def test_admin_call_on_a_socket_without_admin_is_not_found(admin_gw: tuple[Kupd, str]) -> None:
    """kupd's client socket serves no Admin method: gRPC's UNIMPLEMENTED is
    NotFound (the method is not found there), not a SystemFailure."""
    k, _ = admin_gw
    with AdminClient(k.socket) as a, pytest.raises(kerr.NotFound, match="admin_socket"):
        a.list_leases()
    p = _run(k, "leases", "--admin-socket", k.socket)
    assert p.returncode == EXIT_NOT_FOUND, p.stderr
    assert one_line(p).startswith("kupctl: NotFound: the server on this socket does not serve")


def test_revoke_json(admin_gw: tuple[Kupd, str]) -> None:
    k, admin = admin_gw
    lease = _run(k, "attach", "echo", "--channel", "5").stdout.strip()
    assert lease
    p = _run(k, "--json", "revoke", lease, "--admin-socket", admin)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == {"lease_id": lease, "revoked": True}
    p = _run(k, "revoke", "nolease", "--admin-socket", admin)
    assert p.returncode == 3, p.stderr


def test_hint_for_a_connection_closed_as_it_was_made() -> None:
    """gRPC's words for a connection closed at once (the socket's
    max_connections): the hint names the limit -- but not for the admin
    socket, which has none."""
    for why in ("Connection reset by peer", "Broken pipe", "Socket closed"):
        msg = f"failed to connect to all addresses; last error: UNAVAILABLE: unix:/x.sock: {why}"
        assert "/x.sock is likely at its max_connections limit" in unavailable_hint(
            msg, "/x.sock"
        ), why
        admin = unavailable_hint(msg, "/a.sock", "--admin-socket", capped=False)
        assert "max_connections" not in admin, admin


# ---------------------------------------------------------------- closed standard descriptors

#: run argv[2:] with the descriptors listed in argv[1] closed (as a shell's
#: `2>&-` does), SIGINT at its default as a terminal's
_CLOSED = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "[os.close(int(fd)) for fd in sys.argv[1].split(',')]; "
    "os.execv(sys.argv[2], sys.argv[2:])"
)


def _with_closed(fds: str, *args: str, **kw: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen(  # type: ignore[call-overload,no-any-return]
        [sys.executable, "-c", _CLOSED, fds, str(console_script("kupctl")), *args], **kw
    )


def test_closed_stderr_keeps_the_exit_code(gw: Gateway, tmp_path: Path) -> None:
    """Started with its stderr closed, kupctl exits with the error's own
    code: it exited 1 (an AttributeError writing to a None sys.stderr)."""
    p = _with_closed("2", "--socket", str(tmp_path / "nothing.sock"), "devices")
    assert p.wait(TIMEOUT) == EXIT_UNAVAILABLE
    p = _with_closed("2", "--socket", gw.socket, "recv", "no-such-lease", "--nb")
    assert p.wait(TIMEOUT) == EXIT_NOT_FOUND
    # and what it prints still goes where it should
    out = tmp_path / "out"
    with out.open("wb") as f:
        p = _with_closed("2", "--socket", gw.socket, "devices", stdout=f)
        assert p.wait(TIMEOUT) == 0
    assert "echo" in out.read_text()


def test_interrupt_with_stderr_closed_exits_130(gw: Gateway) -> None:
    """A ^C of a recv waiting in kupd, its stderr closed: exit 130 (it
    exited 1), and the lease goes on."""
    with Client(gw.socket) as c:
        lease = c.attach("echo")
        try:
            assert c.lease_receive(lease.lease_id, 10).kind.name == "PASS"
            c.lease_send(lease.lease_id, b"!hold")  # echo never answers it
            p = _with_closed("2", "--socket", gw.socket, "recv", lease.lease_id)
            try:
                # past Python's start-up (a ^C at any point from there on
                # exits 130), likely waiting in kupd
                wait_until(lambda: _loading_grpc(p.pid) or p.poll() is not None, what="kupctl")
                time.sleep(0.5)
                assert p.poll() is None, p.returncode
                p.send_signal(signal.SIGINT)
                assert p.wait(TIMEOUT) == 130
            finally:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            # still the lease's: the next receive waits for the owed reply
            with pytest.raises(kerr.NotReady):
                c.lease_receive(lease.lease_id, 0)
        finally:
            c.release(lease.lease_id)
