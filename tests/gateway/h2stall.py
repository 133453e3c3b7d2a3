"""A unix-socket proxy in front of kupd that holds back what kupd sends
after its first reply message: the window in which kupd has written an RPC's
reply (for kupd it is delivered) and the client's gRPC library has it, but
not the RPC's status, so a unary call is not over yet.

Frames are forwarded untouched, both ways; the proxy only reads their
9-byte headers (RFC 9113).  From kupd's first DATA frame with a payload on,
it forwards that frame and keeps every later one of kupd's (in order: the
client's HPACK state stays kupd's) until the client resets that stream
(RST_STREAM: it cancelled the call) or :meth:`StallProxy.close` -- but for
PINGs, which carry no state: kupd's answers to the client's pings go
through, or the client would drop the connection as dead within seconds.
:meth:`StallProxy.resume` ends the hold for good (a later client then
connects through), :meth:`StallProxy.cut` breaks the connection too.
``stalled`` is set once the reply went through and ``status_held`` once
kupd's status (a HEADERS frame ending that stream) is held: kupd is done
with the RPC.  One client connection at a time.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
from collections.abc import Iterator

__all__ = ["FrameProxy", "StallProxy"]

DATA, HEADERS, RST_STREAM, PING = 0, 1, 3, 6
_END_STREAM = 0x1
_PREFACE_LEN = 24  # the client's connection preface, before its first frame


def _read_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def _frames(sock: socket.socket) -> Iterator[tuple[int, int, int, bytes]]:
    """(type, flags, stream, raw bytes of the whole frame) until EOF."""
    while True:
        try:
            head = _read_exact(sock, 9)
            payload = _read_exact(sock, struct.unpack(">I", b"\0" + head[:3])[0])
        except (EOFError, OSError):
            return
        stream = struct.unpack(">I", head[5:9])[0] & 0x7FFFFFFF
        yield head[3], head[4], stream, head + payload


class FrameProxy:
    """A unix-socket proxy at ``path`` in front of ``upstream`` (kupd's
    socket): for each client connection, one to kupd and a thread each
    way running :meth:`_from_client` and :meth:`_from_kupd`, which a
    subclass defines (over :func:`_frames`).  A subclass sets its own
    state before calling this ``__init__``: connections are accepted as
    soon as it returns."""

    def __init__(self, path: str, upstream: str) -> None:
        self.path = path
        self.upstream = upstream
        self._socks: list[socket.socket] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._listener.bind(path)
        self._listener.listen(4)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self._listener.accept()
            except OSError:
                return
            up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            up.connect(self.upstream)
            self._socks += [down, up]
            threading.Thread(target=self._from_client, args=(down, up), daemon=True).start()
            threading.Thread(target=self._from_kupd, args=(up, down), daemon=True).start()

    def _from_client(self, down: socket.socket, up: socket.socket) -> None:
        raise NotImplementedError

    def _from_kupd(self, up: socket.socket, down: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._listener.close()
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class StallProxy(FrameProxy):
    def __init__(self, path: str, upstream: str) -> None:
        self.stalled = threading.Event()
        self.status_held = threading.Event()
        self.reset_seen = threading.Event()
        self._resume = threading.Event()
        self._stream = 0
        self._held: list[bytes] = []
        self._lock = threading.Lock()
        super().__init__(path, upstream)

    def _from_client(self, down: socket.socket, up: socket.socket) -> None:
        try:
            up.sendall(_read_exact(down, _PREFACE_LEN))
        except (EOFError, OSError):
            return
        for ftype, _, stream, raw in _frames(down):
            self._client_frame(ftype, stream)
            with contextlib.suppress(OSError):
                up.sendall(raw)
            if ftype == RST_STREAM and stream == self._stream:
                self.reset_seen.set()
                self._release(down)
        with contextlib.suppress(OSError):
            up.shutdown(socket.SHUT_WR)

    def _from_kupd(self, up: socket.socket, down: socket.socket) -> None:
        for ftype, flags, stream, raw in _frames(up):
            with self._lock:
                if self._stream and not self._resume.is_set() and ftype != PING:
                    self._held.append(raw)
                    if ftype == HEADERS and stream == self._stream and flags & _END_STREAM:
                        self.status_held.set()
                    continue
                with contextlib.suppress(OSError):
                    down.sendall(raw)
                if not self._stream and self._stalls_on(ftype, stream, raw):
                    self._stream = stream
                    self.stalled.set()
        with contextlib.suppress(OSError):
            down.shutdown(socket.SHUT_WR)

    def _client_frame(self, ftype: int, stream: int) -> None:
        """Each frame from the client, before it is forwarded (for a
        subclass that follows the client's streams)."""

    def _stalls_on(self, ftype: int, stream: int, raw: bytes) -> bool:
        """Whether this frame from kupd, forwarded, starts the hold (of
        what follows on its stream): kupd's first DATA frame with a
        payload -- a reply."""
        return ftype == DATA and len(raw) > 9

    def _release(self, down: socket.socket) -> None:
        """Forward what was held, and everything from now on."""
        with self._lock:
            self._resume.set()
            for raw in self._held:
                with contextlib.suppress(OSError):
                    down.sendall(raw)
            self._held.clear()

    def resume(self) -> None:
        """Hold nothing more: from now on the proxy forwards everything, for
        a later connection too (a client that went away without resetting
        the stream -- a process that exited -- never releases the hold).
        What was held is dropped: its connection is gone."""
        with self._lock:
            self._resume.set()
            self._held.clear()

    def cut(self) -> None:
        """Break the connections open now, both ways (as a network would:
        shut down, so a thread blocked on them wakes), and :meth:`resume`:
        a later client connects through."""
        self.resume()
        for sock in self._socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._resume.set()
        super().close()
