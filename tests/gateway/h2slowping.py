"""A unix-socket proxy in front of kupd that delays the client's answers to
kupd's HTTP/2 PINGs: a live client too busy to answer a ping at once (a
Node event loop running a long callback, a Python process holding the GIL).

Frames are forwarded untouched and in order, both ways, except the client's
PING acknowledgements (RFC 9113 6.7: a PING with the ACK flag), each of which
is sent ``delay`` seconds after it arrived.  A PING carries no state, so the
order of the rest is what the client wrote.  ``acks_delayed`` counts them;
``goaways`` collects the GOAWAY frames kupd sent (their debug data, e.g.
b"ping_timeout").  One client connection at a time.
"""

from __future__ import annotations

import contextlib
import socket
import threading

from h2stall import PING, FrameProxy, _frames, _read_exact

__all__ = ["SlowPingProxy"]

GOAWAY = 7
_ACK = 0x1
_PREFACE_LEN = 24


class SlowPingProxy(FrameProxy):
    def __init__(self, path: str, upstream: str, delay: float) -> None:
        self.delay = delay
        self.acks_delayed = 0
        self.goaways: list[bytes] = []
        self._send_lock = threading.Lock()
        self._timers: list[threading.Timer] = []
        super().__init__(path, upstream)

    def _send_up(self, up: socket.socket, raw: bytes) -> None:
        # the ack timers and the forwarding thread write to the same socket:
        # one frame at a time, never interleaved
        with self._send_lock, contextlib.suppress(OSError):
            up.sendall(raw)

    def _from_client(self, down: socket.socket, up: socket.socket) -> None:
        try:
            self._send_up(up, _read_exact(down, _PREFACE_LEN))
        except (EOFError, OSError):
            return
        for ftype, flags, _, raw in _frames(down):
            if ftype == PING and flags & _ACK:
                self.acks_delayed += 1
                timer = threading.Timer(self.delay, self._send_up, args=(up, raw))
                timer.daemon = True
                self._timers.append(timer)
                timer.start()
                continue
            self._send_up(up, raw)
        with contextlib.suppress(OSError):
            up.shutdown(socket.SHUT_WR)

    def _from_kupd(self, up: socket.socket, down: socket.socket) -> None:
        for ftype, _, _, raw in _frames(up):
            if ftype == GOAWAY:
                self.goaways.append(raw[9 + 8 :])  # last stream id, error code, then debug data
            with contextlib.suppress(OSError):
                down.sendall(raw)
        with contextlib.suppress(OSError):
            down.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        for timer in self._timers:
            timer.cancel()
        super().close()
