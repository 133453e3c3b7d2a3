"""A tenant cannot fill kupd's log through gRPC core's own lines.

A request whose header block passes gRPC's metadata limit with many fields
(here HPACK references to one 4 000-byte entry of the connection's dynamic
table: 10 000 of them in 14 KB) is refused by gRPC with a summary of its
fields, too long for the trailers; gRPC's encoder then logs "Ignoring key
value pair due to size limit" on kupd's stderr -- one line per such
request, below kupd's Python, so none of kupd's budgets applied.
kupd.nativelog passes native lines on under a budget and counts the rest.
Real kupd, gRPC, a hand-framed HTTP/2 client."""

from __future__ import annotations

import json
import socket
import struct
import sys
import threading
import time

from tenancy_helpers import StartTenants, TenantKupd

from kupapi import kup_pb2
from kupd.nativelog import NATIVE_LINES_BURST, NATIVE_LINES_PER_SECOND
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
