"""A SOCK_SEQPACKET proxy in front of a real kupsim device socket: every
packet (and the fds it carries) is forwarded as is, both ways.  A test can
delay the requests of one op (a host slow to answer WATCH or ATTACH), or
hold them until it lets them go (a host that answers when the test says),
send a device event on the WATCH connections, and drop every connection
(kupd then sees the device gone and opens it again through the proxy).
The ops and the event's layout are kupsim's (kmod/kupsim/kupsim_proto.h)."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time
from pathlib import Path

OP_INFO, OP_ATTACH, OP_WATCH = 1, 2, 3
#: the longest a held request waits for its release (a bound, not a timing)
HOLD_MAX = 120.0


class SimProxy:
    def __init__(self, upstream: str, path: str) -> None:
        self.upstream = upstream
        self.path = path
        self.delay: dict[int, float] = {}  # op -> seconds
        #: op -> event: its requests wait (at most HOLD_MAX s) until it is set
        self.hold: dict[int, threading.Event] = {}
        self.seen: list[tuple[float, int]] = []  # (monotonic, op) of requests
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        #: client-side sockets of WATCH connections (kupd's event fds)
        self.watchers: list[socket.socket] = []
        self._stop = False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._ls = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._ls.bind(path)
        self._ls.listen(128)
        self._t = threading.Thread(target=self._accept, daemon=True)
        self._t.start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                c, _ = self._ls.accept()
            except OSError:
                return
            u = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                u.connect(self.upstream)
            except OSError:
                c.close()
                u.close()
                continue
            with self._lock:
                self._conns += [c, u]
            threading.Thread(target=self._pump, args=(c, u, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(u, c, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, requests: bool) -> None:
        try:
            while True:
                data, fds, _flags, _addr = socket.recv_fds(src, 1 << 16, 8)
                if not data:
                    break
                if requests and len(data) >= 4:
                    op = struct.unpack_from("I", data)[0]
                    self.seen.append((time.monotonic(), op))
                    if op == OP_WATCH:
                        self.watchers.append(src)
                    d = self.delay.get(op, 0.0)
                    if d:
                        time.sleep(d)
                    held = self.hold.get(op)
                    if held is not None:
                        held.wait(HOLD_MAX)
                try:
                    socket.send_fds(dst, [data], fds) if fds else dst.send(data)
                finally:
                    for fd in fds:
                        os.close(fd)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def count(self, op: int) -> int:
        """Requests of ``op`` seen so far."""
        return sum(1 for _, o in self.seen if o == op)

    def inject_event(self) -> None:
        """A device event (kupsim_event: op EVENT, status 0, what, announced,
        notify_gen) on every WATCH connection, as kupsim sends on announce."""
        for w in list(self.watchers):
            with contextlib.suppress(OSError):
                w.send(struct.pack("IiIIQ", 4, 0, 1, 0, 0))

    def drop_all(self) -> None:
        """Break every connection (the device looks gone to its users)."""
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._stop = True
        self.drop_all()
        with contextlib.suppress(OSError):
            self._ls.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def proxy_dir(tmp: Path, sim_rundir: Path, device: str = "echo") -> tuple[Path, SimProxy]:
    d = tmp / "proxy"
    d.mkdir(exist_ok=True)
    return d, SimProxy(str(sim_rundir / f"{device}.sock"), str(d / f"{device}.sock"))
