"""kupctl's answers to bad input and interruptions: one line and a usage
exit code instead of a traceback; ^C during a session's receive exits 130;
``--json revoke`` prints JSON; the "is kupd running?" hint only when the
connection itself failed, not for kupd's own Unavailable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cli_gateway import Gateway, console_script, spawn_kupctl

from kupclient import Client
from kupclient import errors as kerr
from kupclient._errors import error_from_status, is_connection_failure
from kupd.testing import Kupd, kupsim, start_kupd, wait_until

EXIT_USAGE = 2
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


# ---------------------------------------------------------------- Unavailable hint


def test_unavailable_hint_only_for_connection_failures() -> None:
    refused = error_from_status(grpc.StatusCode.UNAVAILABLE, "failed to connect", None)
    assert isinstance(refused, kerr.Unavailable) and is_connection_failure(refused)
    kupds = error_from_status(
        grpc.StatusCode.UNAVAILABLE, "device echo has no Call pool", [("kup-error", "Unavailable")]
    )
    assert isinstance(kupds, kerr.Unavailable) and not is_connection_failure(kupds)
    assert not is_connection_failure(kerr.Unavailable("made by hand"))


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


def test_revoke_json(admin_gw: tuple[Kupd, str]) -> None:
    k, admin = admin_gw
    lease = _run(k, "attach", "echo", "--channel", "5").stdout.strip()
    assert lease
    p = _run(k, "--json", "revoke", lease, "--admin-socket", admin)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == {"lease_id": lease, "revoked": True}
    p = _run(k, "revoke", "nolease", "--admin-socket", admin)
    assert p.returncode == 3, p.stderr
