"""kupsim's wire protocol (kmod/kupsim/kupsim_proto.h) spoken by hand over
its SOCK_SEQPACKET socket: well-formed requests get the documented replies,
malformed ones a KUP_E_* status naming the problem, never a crash (kupsim
runs under ASan+UBSan / TSan and must exit 0 with no sanitizer report)."""

from __future__ import annotations

import array
import os
import socket
import struct
import time
from pathlib import Path

from kmod_util import variant_kupsim

__all__: list[str] = []

OP_INFO, OP_ATTACH, OP_WATCH = 1, 2, 3
PROTO = 1
ABI = 1
ANY = 0xFFFFFFFF
E_OK, E_VERSION, E_NOENT, E_INVAL, E_BUSY = 0, 1007, 1009, 1011, 1008
REQ = struct.Struct("<8I")
HDR = struct.Struct("<Ii")
INFO_SIZE = 8 + 32 + 4 * 6 + 4 + 4 + 8 + 1024
ATTACH_REPLY = struct.Struct("<IiIIIIQ")


def req(op: int, chan: int = 0, abi: int = ABI, pages: int = 0, proto: int = PROTO) -> bytes:
    return REQ.pack(op, proto, chan, abi, pages, 0, 0, 0)


def connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(30)
    s.connect(path)
    return s


def status(s: socket.socket, packet: bytes) -> tuple[int, int]:
    s.send(packet)
    op, st = HDR.unpack_from(s.recv(4096))
    return op, st


def info(s: socket.socket) -> tuple[str, bytes]:
    s.send(req(OP_INFO))
    data = s.recv(4096)
    assert len(data) == INFO_SIZE
    op, st = HDR.unpack_from(data)
    assert (op, st) == (OP_INFO, E_OK)
    name = data[8:40].split(b"\0", 1)[0].decode()
    attached = data[80 : 80 + 1024]
    return name, attached


def attach(s: socket.socket, chan: int, **kw: int) -> tuple[int, list[int], bytes]:
    s.send(req(OP_ATTACH, chan, **kw))
    fds = array.array("i")
    msg, anc, _flags, _addr = s.recvmsg(4096, socket.CMSG_SPACE(8 * fds.itemsize))
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    _op, st = HDR.unpack_from(msg)
    return st, list(fds), msg


def test_wire_protocol(variant_out: Path) -> None:
    with variant_kupsim(variant_out, "echo") as sim:
        path = sim.device_path("echo")
        with connect(path) as s:
            name, attached = info(s)
            assert name == "echo"
            assert attached[7] == 0
            # malformed requests: each answered with a status, connection kept
            s.send(b"short")
            assert HDR.unpack_from(s.recv(4096))[1] == E_INVAL
            assert status(s, req(OP_INFO, proto=99)) == (OP_INFO, E_VERSION)
            assert status(s, REQ.pack(OP_INFO, PROTO, 0, 0, 0, 1, 0, 0))[1] == E_INVAL
            assert status(s, req(77)) == (77, E_INVAL)
            s.send(b"x" * 300)  # longer than any request
            assert HDR.unpack_from(s.recv(4096))[1] == E_INVAL
            # attach refusals
            for kw, want in (
                ({"chan": 7, "abi": 2}, E_VERSION),
                ({"chan": 999}, E_NOENT),
                ({"chan": 7, "pages": 5}, E_INVAL),
            ):
                st, fds, _ = attach(s, **kw)
                assert st == want, (kw, st)
                assert fds == []
            assert info(s)[0] == "echo"  # still served
        with connect(path) as a:
            st, fds, msg = attach(a, 7)
            assert st == E_OK and len(fds) == 3
            _op, _st, chan, pages, page_size, _pad, nbytes = ATTACH_REPLY.unpack_from(msg)
            assert (chan, pages) == (7, 1)
            assert nbytes == page_size * 3
            assert os.fstat(fds[0]).st_size >= nbytes
            for fd in fds:
                os.close(fd)
            # one attachment per connection; no WATCH on it
            assert attach(a, 8)[0] == E_INVAL
            assert status(a, req(OP_WATCH)) == (OP_WATCH, E_INVAL)
            with connect(path) as b:
                assert attach(b, 7)[0] == E_BUSY
                assert info(b)[1][7] == 1
        # the connection's end is the attachment's end
        with connect(path) as c:
            deadline = time.monotonic() + 30
            while info(c)[1][7] != 0:
                assert time.monotonic() < deadline, "channel 7 never detached"
                time.sleep(0.02)
            st, fds, _ = attach(c, ANY)
            assert st == E_OK
            for fd in fds:
                os.close(fd)
            assert status(c, req(OP_INFO))[1] == E_OK  # INFO on an attached connection
