"""A tenant cannot fill kupd's log through gRPC core's own lines.

A request whose header block passes gRPC's metadata limit with many fields
(here HPACK references to one 4 000-byte entry of the connection's dynamic
table: 10 000 of them in 14 KB) is refused by gRPC with a summary of its
fields, too long for the trailers; gRPC's encoder then logs "Ignoring key
value pair due to size limit" on kupd's stderr -- one line per such
request, below kupd's Python, so none of kupd's budgets applied.
kupd.nativelog passes native lines on under a budget and counts the rest,
in a helper process: what native code writes as kupd dies (an abort's
message, a fatal signal's) reaches the log all the same, budget or not.
Real kupd, gRPC, a hand-framed HTTP/2 client."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import sys
import threading
import time

import pytest
from tenancy_helpers import StartTenants, TenantKupd

from kupapi import kup_pb2
from kupd.nativelog import NATIVE_LINES_BURST, NATIVE_LINES_PER_SECOND, NATIVE_RING, NativeStderr
from kupd.testing import REPO_ROOT, wait_until

sys.path.insert(0, str(REPO_ROOT / "tests" / "gateway"))

from h2raw import HEADERS, _frame, _hpack, _hpack_int

__all__: list[str] = []

BODY = """
[[device]]
name = "echo"

[[tenant]]
name = "noisy"
socket = "@DIR@/noisy.sock"
max_sessions = 4
max_message_bytes = 64
max_connections = 2
[[tenant.grant]]
device = "echo"

[[tenant]]
name = "quiet"
socket = "@DIR@/quiet.sock"
[[tenant.grant]]
device = "echo"
"""

#: requests that each make gRPC core log one line (far more than the burst)
BOMBS = 250
#: gRPC's line for each
GRPC_LINE = "Ignoring key value pair due to size limit"
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_HEADERS = [
    (":method", "POST"),
    (":scheme", "http"),
    (":path", "/kup.v1.Kup/ListDevices"),
    (":authority", "localhost"),
    ("content-type", "application/grpc"),
    ("te", "trailers"),
]


def _bomb() -> bytes:
    """A header block: the request's headers, one 4 000-byte field added to
    the dynamic table (literal with incremental indexing, 0x40), then
    10 000 one-byte references to it (index 62: the newest entry)."""
    return (
        _hpack(_HEADERS)
        + b"\x40"
        + _hpack_int(1, 7)
        + b"a"
        + _hpack_int(4000, 7)
        + b"b" * 4000
        + b"\xbe" * 10_000
    )


def _ended(frames: bytes) -> set[int]:
    """The streams ``frames`` (what kupd sent, whole frames) end."""
    ended = set()
    pos = 0
    while pos + 9 <= len(frames):
        length = int.from_bytes(frames[pos : pos + 3], "big")
        ftype, flags = frames[pos + 3], frames[pos + 4]
        sid = struct.unpack(">I", frames[pos + 5 : pos + 9])[0] & 0x7FFFFFFF
        if ftype == HEADERS and flags & 0x1:
            ended.add(sid)
        pos += 9 + length
    return ended


def send_bombs(k: TenantKupd, n: int) -> float:
    """``n`` requests on the noisy tenant's socket that each make gRPC core
    log one line, then an ordinary one; returns once all are answered --
    gRPC writes its line as it encodes a refusal, before sending it --
    with the seconds it took."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(k.sock("noisy"))
    got = bytearray()

    def read() -> None:
        try:
            while chunk := s.recv(1 << 16):
                got.extend(chunk)
        except OSError:
            pass

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        start = time.monotonic()
        s.sendall(_PREFACE + _frame(4, 0, 0))
        for i in range(n):
            s.sendall(_frame(HEADERS, 0x5, 1 + 2 * i, _bomb()))  # END_STREAM | END_HEADERS
        # and one ordinary request after them: kupd serves on
        last = 1 + 2 * n
        msg = kup_pb2.ListDevicesRequest().SerializeToString()
        s.sendall(
            _frame(HEADERS, 0x4, last, _hpack(_HEADERS))
            + _frame(0, 0x1, last, b"\x00" + struct.pack(">I", len(msg)) + msg)
        )
        streams = {1 + 2 * i for i in range(n + 1)}
        wait_until(lambda: streams <= _ended(bytes(got)), timeout=120, what="the answers")
        return time.monotonic() - start
    finally:
        s.close()


def left_out_lines(log: str) -> list[dict[str, int]]:
    """The "native log lines left out" lines in kupd's log ``log``."""
    return [
        json.loads(line)
        for line in log.splitlines()
        if line.startswith("{") and '"native log lines left out"' in line
    ]


def helpers(k: TenantKupd) -> list[int]:
    """The pids of kupd's helper processes (python -m kupd.nativelog):
    one, unless it could not be started."""
    found = []
    for task in os.listdir(f"/proc/{k.proc.pid}/task"):
        with open(f"/proc/{k.proc.pid}/task/{task}/children") as f:
            found += [
                int(pid) for pid in f.read().split() if b"kupd.nativelog" in _cmdline(int(pid))
            ]
    return found


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _running(pid: int) -> bool:
    """Whether ``pid`` is the helper and has not exited (a zombie, left to
    whoever its parent is now, has exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z" and b"kupd.nativelog" in _cmdline(pid)


def wait_gone(pids: list[int]) -> None:
    """Wait for the helpers to end: they end at end of file on the pipe,
    once kupd is gone, after passing on what is left."""
    wait_until(
        lambda: not any(_running(pid) for pid in pids), timeout=30, what=f"helpers {pids} to end"
    )


def test_grpc_core_lines_a_tenant_causes_are_budgeted(start_tenants: StartTenants) -> None:
    k = start_tenants(BODY)
    with k.client("quiet") as c:  # up, and the quiet tenant served
        assert [d.name for d in c.devices()] == ["echo"]
    start = time.monotonic()
    elapsed = send_bombs(k, BOMBS)

    def left_out() -> int:
        return sum(x["left_out"] for x in left_out_lines(k.log()))

    def passed() -> int:
        return sum(GRPC_LINE in line for line in k.log().splitlines())

    # the lines left out are said once the pipe has been quiet a moment
    wait_until(
        lambda: passed() + left_out() >= BOMBS,
        timeout=30,
        what=f"kupd's log to account for {BOMBS} lines of gRPC's",
    )
    allowed = NATIVE_LINES_BURST + NATIVE_LINES_PER_SECOND * (time.monotonic() - start) + 1
    assert passed() <= allowed, (
        f"{passed()} of gRPC's lines in kupd's log in {elapsed:.1f} s: more than the budget"
    )
    assert left_out() > 0
    assert passed() + left_out() == BOMBS, (passed(), left_out())
    # kupd's own lines are not budgeted with them, and it serves on
    with k.client("quiet") as c:
        assert [d.name for d in c.devices()] == ["echo"]


def test_a_line_native_code_wrote_as_kupd_was_killed_is_logged(
    start_tenants: StartTenants,
) -> None:
    k = start_tenants(BODY)
    running = helpers(k)
    send_bombs(k, 1)  # answered: gRPC's line is written
    k.proc.kill()
    k.proc.wait()
    wait_gone(running)
    assert sum(GRPC_LINE in line for line in k.log().splitlines()) == 1, k.log()


def test_a_fatal_error_message_is_logged(
    start_tenants: StartTenants, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python's fault handler (C, in the signal handler) writes "Fatal
    Python error: Aborted" and every thread's stack on descriptor 2, last
    the extension modules loaded, and re-raises the signal: kupd is gone
    microseconds after that last line was written, as after a gRPC
    assertion.  The thread that read the pipe inside kupd lost it."""
    monkeypatch.setenv("PYTHONFAULTHANDLER", "1")
    k = start_tenants(BODY)
    running = helpers(k)
    k.proc.send_signal(signal.SIGABRT)
    assert k.proc.wait() == -signal.SIGABRT
    wait_gone(running)
    log = k.log()
    assert "Fatal Python error: Aborted" in log, log
    assert re.search(r"^Extension modules: .*\(total: \d+\)$", log, re.M), log


def _last_left_out(log: str) -> list[str]:
    """The lines the helper passed on at the end, after its "left out"
    line that says how many follow (checked: the last such line, followed
    by them)."""
    lines = log.splitlines()
    ends = [i for i, x in enumerate(lines) if x.startswith("{") and '"last": ' in x]
    assert ends, f"no 'native log lines left out' line with last in:\n{log}"
    head = json.loads(lines[ends[-1]])
    assert head["event"] == "native log lines left out"
    return lines[ends[-1] + 1 : ends[-1] + 1 + head["last"]]


def _accounted(log: str) -> int:
    """gRPC's lines in ``log``, passed on at once or at the end, plus those
    counted as left out: each line once."""
    said = left_out_lines(log)
    passed = sum(GRPC_LINE in line for line in log.splitlines())
    again = sum(x.get("last_counted_before", 0) for x in said)
    return passed + sum(x["left_out"] for x in said) - again


def test_the_last_lines_left_out_are_logged_when_kupd_dies(start_tenants: StartTenants) -> None:
    k = start_tenants(BODY)
    running = helpers(k)
    send_bombs(k, BOMBS)  # far past the burst
    k.proc.kill()
    k.proc.wait()
    wait_gone(running)
    log = k.log()
    last = _last_left_out(log)
    assert len(last) == NATIVE_RING
    assert all(GRPC_LINE in line for line in last), last
    assert _accounted(log) == BOMBS, log


def test_ctrl_c_to_kupds_group_ends_kupd_and_its_last_lines_are_logged(
    start_tenants: StartTenants,
) -> None:
    """A ^C at a terminal is SIGINT to the foreground process group: kupd
    drains and stops; the helper must not be ended by it first (its last
    lines, those left out under the budget among them, would be lost)."""
    k = start_tenants(BODY)
    running = helpers(k)
    send_bombs(k, BOMBS)
    os.killpg(k.proc.pid, signal.SIGINT)  # start_kupd: kupd leads its own group
    assert k.proc.wait(60) == 0
    wait_gone(running)
    log = k.log()
    assert '"kupd stopped"' in log
    last = _last_left_out(log)
    assert len(last) == NATIVE_RING and all(GRPC_LINE in line for line in last), last
    assert _accounted(log) == BOMBS, log


def test_no_process_is_left_behind_when_kupd_stops(start_tenants: StartTenants) -> None:
    k = start_tenants(BODY)
    [helper] = helpers(k)
    assert k.kupd.terminate() == 0
    # kupd waited for its helper and reaped it: no such process, not even
    # a zombie handed on to init
    assert not os.path.exists(f"/proc/{helper}")


def test_without_a_helper_descriptor_2_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The helper cannot be started (here: no such interpreter): kupd runs
    on, its descriptor 2 and sys.stderr as they were, and says why."""
    monkeypatch.setattr(sys, "executable", "/nonexistent/python3")
    before = os.fstat(2)
    prior = sys.stderr
    native = NativeStderr()
    try:
        native.start()
        assert native.proc is None
        assert "/nonexistent/python3 -m kupd.nativelog" in native.failed
        after = os.fstat(2)
        assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
        assert sys.stderr is prior
    finally:
        native.stop()
