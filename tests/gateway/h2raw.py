"""A bare HTTP/2 client over a unix socket, for tests that need what no
gRPC library lets a client do: advertise a stream window of 0 (a client
that never reads), or leave requests half-sent.  Frames by hand (RFC 9113),
header blocks as literal HPACK fields without indexing or Huffman; a
reader thread acknowledges SETTINGS, answers PINGs (so keepalive does not
end the connection) and records every frame."""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass

__all__ = ["DATA", "HEADERS", "RST_STREAM", "Frame", "H2Conn"]

DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
_END_STREAM, _ACK, _END_HEADERS = 0x1, 0x1, 0x4
_SETTINGS_INITIAL_WINDOW_SIZE = 4
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@dataclass(frozen=True)
class Frame:
    type: int
    flags: int
    stream: int
    payload: bytes


def _frame(ftype: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(
        ">I", stream
    ) + payload


def _hpack_int(n: int, prefix_bits: int) -> bytes:
    top = (1 << prefix_bits) - 1
    if n < top:
        return bytes([n])
    out = bytearray([top])
    n -= top
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _hpack(headers: list[tuple[str, str]]) -> bytes:
    out = bytearray()
    for name, value in headers:
        k, v = name.encode(), value.encode()
        # 0x00: literal header field without indexing, new name
        out += b"\x00" + _hpack_int(len(k), 7) + k + _hpack_int(len(v), 7) + v
    return bytes(out)


class H2Conn:
    """One HTTP/2 connection; ``window`` is the stream window this client
    advertises (0: the server can send headers, never data)."""

    def __init__(self, path: str, *, window: int = 65535) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self._send_lock = threading.Lock()
        self.frames: list[Frame] = []
        self.closed = False
        self._next_stream = 1
        settings = struct.pack(">HI", _SETTINGS_INITIAL_WINDOW_SIZE, window)
        self._send(_PREFACE + _frame(SETTINGS, 0, 0, settings))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _send(self, data: bytes) -> None:
        with self._send_lock:
            self.sock.sendall(data)

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return bytes(buf)

    def _read(self) -> None:
        try:
            while True:
                head = self._recv(9)
                length = int.from_bytes(head[:3], "big")
                ftype, flags = head[3], head[4]
                stream = struct.unpack(">I", head[5:9])[0] & 0x7FFFFFFF
                payload = self._recv(length)
                if ftype == SETTINGS and not flags & _ACK:
                    self._send(_frame(SETTINGS, _ACK, 0))
                elif ftype == PING and not flags & _ACK:
                    self._send(_frame(PING, _ACK, 0, payload))
                self.frames.append(Frame(ftype, flags, stream, payload))
        except (EOFError, OSError):
            self.closed = True

    def grpc_open(self, method: str, extra: list[tuple[str, str]] | None = None) -> int:
        """Open a stream calling ``method`` (/package.Service/Method): its
        headers (and ``extra`` ones, e.g. grpc-encoding) only, no request
        yet; the stream's id."""
        stream = self._next_stream
        self._next_stream += 2
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", method),
            (":authority", "localhost"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *(extra or []),
        ]
        self._send(_frame(HEADERS, _END_HEADERS, stream, _hpack(headers)))
        return stream

    def grpc_send(self, stream: int, declared: int, part: bytes, end: bool = False) -> None:
        """The start of one gRPC message on ``stream``: a length prefix of
        ``declared`` bytes, then ``part`` (all of it, or less: a message
        that never arrives whole)."""
        body = b"\x00" + struct.pack(">I", declared) + part
        self._send(_frame(DATA, _END_STREAM if end else 0, stream, body))

    def data(self, stream: int, payload: bytes, end: bool = False) -> None:
        """One DATA frame of ``payload`` (at most 16 KiB, the frame size
        limit) on ``stream``, as it is: a gRPC message's bytes in pieces."""
        self._send(_frame(DATA, _END_STREAM if end else 0, stream, payload))

    def grpc_request(self, method: str, message: bytes) -> int:
        """Open a stream calling ``method`` with one whole message."""
        stream = self.grpc_open(method)
        self.grpc_send(stream, len(message), message, end=True)
        return stream

    def cancel(self, stream: int) -> None:
        """RST_STREAM ``stream`` with CANCEL (0x8): what a gRPC client's
        cancel sends."""
        self._send(_frame(RST_STREAM, 0, stream, struct.pack(">I", 0x8)))

    def ended(self, stream: int) -> bool:
        """Whether the server ended ``stream``: trailers, or RST_STREAM."""
        return any(
            f.stream == stream
            and (f.type == RST_STREAM or (f.type == HEADERS and f.flags & _END_STREAM))
            for f in list(self.frames)
        )

    def wait_for(self, ftype: int, stream: int, timeout: float = 30.0) -> Frame:
        """The first frame of ``ftype`` on ``stream`` (AssertionError if
        none comes in ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for f in list(self.frames):
                if f.type == ftype and f.stream == stream:
                    return f
            time.sleep(0.01)
        raise AssertionError(f"no frame of type {ftype} on stream {stream}: {self.frames}")

    def close(self) -> None:
        # shutdown first: close() alone leaves the connection open while the
        # reader thread is blocked in recv() on it (the syscall holds the
        # socket), until kupd happens to send something -- a keepalive ping
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass
