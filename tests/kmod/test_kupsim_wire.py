"""kupsim's wire protocol (kmod/kupsim/kupsim_proto.h) spoken by hand over
its SOCK_SEQPACKET socket: well-formed requests get the documented replies,
malformed ones a KUP_E_* status naming the problem, never a crash (kupsim
runs under ASan+UBSan / TSan and must exit 0 with no sanitizer report)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from kmod_util import (
    ANY,
    ATTACH_REPLY,
    E_BUSY,
    E_INVAL,
    E_NOENT,
    E_OK,
    E_VERSION,
    HDR,
    OP_INFO,
    OP_WATCH,
    PROTO,
    REQ,
    variant_kupsim,
    wire_attach,
    wire_connect,
    wire_info,
    wire_req,
    wire_status,
)

__all__: list[str] = []


def test_wire_protocol(variant_out: Path) -> None:
    with variant_kupsim(variant_out, "echo") as sim:
        path = sim.device_path("echo")
        with wire_connect(path) as s:
            name, attached = wire_info(s)
            assert name == "echo"
            assert attached[7] == 0
            # malformed requests: each answered with a status, connection kept
            s.send(b"short")
            assert HDR.unpack_from(s.recv(4096))[1] == E_INVAL
            assert wire_status(s, wire_req(OP_INFO, proto=99)) == (OP_INFO, E_VERSION)
            assert wire_status(s, REQ.pack(OP_INFO, PROTO, 0, 0, 0, 1, 0, 0))[1] == E_INVAL
            assert wire_status(s, wire_req(77)) == (77, E_INVAL)
            s.send(b"x" * 300)  # longer than any request
            assert HDR.unpack_from(s.recv(4096))[1] == E_INVAL
            # attach refusals
            for kw, want in (
                ({"chan": 7, "abi": 2}, E_VERSION),
                ({"chan": 999}, E_NOENT),
                ({"chan": 7, "pages": 5}, E_INVAL),
            ):
                st, fds, _ = wire_attach(s, **kw)
                assert st == want, (kw, st)
                assert fds == []
            assert wire_info(s)[0] == "echo"  # still served
        with wire_connect(path) as a:
            st, fds, msg = wire_attach(a, 7)
            assert st == E_OK and len(fds) == 3
            _op, _st, chan, pages, page_size, _pad, nbytes = ATTACH_REPLY.unpack_from(msg)
            assert (chan, pages) == (7, 1)
            assert nbytes == page_size * 3
            assert os.fstat(fds[0]).st_size >= nbytes
            for fd in fds:
                os.close(fd)
            # one attachment per connection; no WATCH on it
            assert wire_attach(a, 8)[0] == E_INVAL
            assert wire_status(a, wire_req(OP_WATCH)) == (OP_WATCH, E_INVAL)
            with wire_connect(path) as b:
                assert wire_attach(b, 7)[0] == E_BUSY
                assert wire_info(b)[1][7] & 1  # KUP_INFO_ATTACHED
        # the connection's end is the attachment's end
        with wire_connect(path) as c:
            deadline = time.monotonic() + 30
            while wire_info(c)[1][7] & 1:
                assert time.monotonic() < deadline, "channel 7 never detached"
                time.sleep(0.02)
            st, fds, _ = wire_attach(c, ANY)
            assert st == E_OK
            for fd in fds:
                os.close(fd)
            assert wire_status(c, wire_req(OP_INFO))[1] == E_OK  # INFO on an attached connection
