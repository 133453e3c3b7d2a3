"""kup.v1's messages in protobuf's wire format, by hand: the readers and
writers both sides share.

Why by hand: a Session carries payloads up to a channel's size (MiBs), and
the generated classes copy a payload at each step (parse, field read,
serialize).  kupd's Session codec (:mod:`kupd.wire`) and the Python
client's (``kupclient._wire``) read and write the few messages on that
path themselves, with these primitives, and leave everything else --
anything not as they expect, field for field -- to the generated classes
(:class:`Unexpected`), so the wire format stays kup.v1's.
"""

from __future__ import annotations

__all__ = [
    "LEN",
    "VARINT",
    "Unexpected",
    "fields",
    "read_varint",
    "scalar",
    "span",
    "varint",
]

VARINT, LEN = 0, 2


class Unexpected(Exception):
    """Not a message a hand-written reader takes field for field: the
    generated class reads it instead."""


def varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def read_varint(buf: bytes | memoryview, i: int, end: int) -> tuple[int, int]:
    """(value, next index) of the varint at buf[i]; Unexpected if it runs
    past ``end`` or past 64 bits."""
    val = shift = 0
    while True:
        if i >= end or shift > 63:
            raise Unexpected
        b = buf[i]
        i += 1
        val |= (b & 0x7F) << shift
        if b < 0x80:
            return val, i
        shift += 7


def fields(
    buf: bytes | memoryview, i: int, end: int, known: frozenset[int]
) -> dict[int, tuple[int, int, int]]:
    """field -> (wire type, a, b) of the message at buf[i:end]: a varint's
    value in a (b 0), a length-delimited field's span buf[a:b].  Unexpected
    for a field not in ``known``, another wire type, a field seen twice or
    a length past ``end``.  At the first field not known, not after
    collecting them all: a 4 MiB message of 900 000 distinct unknown
    fields took 0.8 s of the event loop to refuse, the generated parser
    (which then reads it) 6 ms."""
    out: dict[int, tuple[int, int, int]] = {}
    while i < end:
        key, i = read_varint(buf, i, end)
        field, wire = key >> 3, key & 7
        if field not in known or field in out:
            raise Unexpected
        if wire == VARINT:
            v, i = read_varint(buf, i, end)
            out[field] = (VARINT, v, 0)
        elif wire == LEN:
            n, i = read_varint(buf, i, end)
            if i + n > end:
                raise Unexpected
            out[field] = (LEN, i, i + n)
            i += n
        else:
            raise Unexpected
    return out


def scalar(f: dict[int, tuple[int, int, int]], n: int, bits: int) -> int:
    """Varint field n of :func:`fields`' result (0 when absent), for a field
    of ``bits`` bits: a larger value (a varint may carry 70) is Unexpected,
    so that the generated parser applies protobuf's own truncation and the
    two paths cannot disagree."""
    wire, v, _ = f.get(n, (VARINT, 0, 0))
    if wire != VARINT or v >> bits:
        raise Unexpected
    return v


def span(f: dict[int, tuple[int, int, int]], n: int) -> tuple[int, int]:
    """(start, stop) of length-delimited field n (empty when absent)."""
    wire, a, b = f.get(n, (LEN, 0, 0))
    if wire != LEN:
        raise Unexpected
    return a, b
