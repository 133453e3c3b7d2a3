"""kupclient refuses a bad argument itself, naming it, before anything goes
on the wire (kupclient._args): a Client on a socket nobody serves still
answers TypeError / ValueError, not Unavailable.  Good arguments of every
accepted type still work against a real kupd."""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from gateway_helpers import Kupd

from kupclient import AsyncClient, Client
from kupclient._args import MAX_PAYLOAD, ArgumentError
from kupclient.admin import AdminClient
from kupd import errors

# (what, the call on a client, the exception, a regex of its message)
BAD: list[tuple[str, Callable[[Any], Any], type[Exception], str]] = [
    ("call data None", lambda c: c.call("echo", None), TypeError,
     "data must be bytes, not NoneType"),
    ("call data str", lambda c: c.call("echo", "hi"), TypeError, "data must be bytes, not str"),
    ("call timeout < 0", lambda c: c.call("echo", b"x", timeout=-1), ValueError,
     r"timeout must be None or a finite number > 0 seconds, not -1"),
    ("call timeout 0", lambda c: c.call("echo", b"x", timeout=0), ValueError,
     r"> 0 seconds, not 0"),
    ("call timeout nan", lambda c: c.call("echo", b"x", timeout=math.nan), ValueError, "not nan"),
    ("call timeout str", lambda c: c.call("echo", b"x", timeout="1"), TypeError,
     "timeout must be a number of seconds or None, not str"),
    ("call device ''", lambda c: c.call("", b"x"), ValueError, "device name is required"),
    ("open ''", lambda c: c.open(""), ValueError, "device name is required"),
    ("open None", lambda c: c.open(None), TypeError, "device must be a str, not NoneType"),
    ("attach channel -5", lambda c: c.attach("echo", -5), ValueError,
     "channel must be >= 0, not -5"),
    ("attach channel str", lambda c: c.attach("echo", "3"), TypeError,
     "channel must be an int or None, not str"),
    ("attach channel bool", lambda c: c.attach("echo", True), TypeError, "not bool"),
    ("lease_send data None", lambda c: c.lease_send("l", None), TypeError, "data must be bytes"),
    ("lease_exchange data int", lambda c: c.lease_exchange("l", 5), TypeError,
     "data must be bytes, not int"),
    ("lease_receive timeout < 0", lambda c: c.lease_receive("l", timeout=-0.5), ValueError,
     r">= 0 seconds, not -0.5"),
    ("lease_receive timeout inf", lambda c: c.lease_receive("l", timeout=math.inf), ValueError,
     "not inf"),
    # past what the wire holds (uint32): "Value out of range" naming nothing before
    ("call timeout 1e10", lambda c: c.call("echo", b"x", 1e10), ValueError,
     r"timeout must be at most 4294967.295 seconds \(uint32 milliseconds on the wire\)"),
    ("call timeout huge int", lambda c: c.call("echo", b"x", 10**400), ValueError,
     "timeout must be None or a finite number"),
    ("lease_receive timeout 1e10", lambda c: c.lease_receive("l", 1e10), ValueError,
     "timeout must be at most 4294967.295 seconds"),
    ("lease_exchange timeout 1e10", lambda c: c.lease_exchange("l", b"x", 1e10), ValueError,
     "timeout must be at most"),
    ("attach channel 2**32", lambda c: c.attach("echo", 2**32), ValueError,
     r"channel must be <= 4294967295 \(channel ids are uint32\), not 4294967296"),
    # device names and lease ids are checked too
    ("devices int", lambda c: c.devices(5), TypeError, "device must be a str, not int"),
    ("lease_send lease int", lambda c: c.lease_send(5, b"x"), TypeError,
     "lease id must be a str, not int"),
    ("lease_pass lease None", lambda c: c.lease_pass(None), TypeError,
     "lease id must be a str, not NoneType"),
    ("lease_receive lease ''", lambda c: c.lease_receive(""), ValueError, "lease id is required"),
    ("release lease not UTF-8", lambda c: c.release("\udcff"), ValueError,
     "lease id must be valid UTF-8 text"),
    ("attach device not UTF-8", lambda c: c.attach("\udcff"), ValueError,
     "device must be valid UTF-8 text"),
    # attach(timeout=): the RPC's deadline, > 0 (kupd has no attach timeout of its own)
    ("attach timeout < 0", lambda c: c.attach("echo", timeout=-2), ValueError,
     r"timeout must be None or a finite number > 0 seconds, not -2"),
    ("attach timeout 0", lambda c: c.attach("echo", timeout=0), ValueError,
     r"> 0 seconds, not 0"),
    ("attach timeout nan", lambda c: c.attach("echo", timeout=math.nan), ValueError, "not nan"),
    ("attach timeout 1e10", lambda c: c.attach("echo", timeout=1e10), ValueError,
     r"timeout must be at most 4294967.295 seconds"),
    ("attach timeout str", lambda c: c.attach("echo", timeout="2"), TypeError,
     "timeout must be a number of seconds or None, not str"),
]


@pytest.mark.parametrize(("what", "op", "exc", "msg"), BAD, ids=[b[0] for b in BAD])
def test_sync_client_refuses_before_the_wire(
    tmp_path: Path, what: str, op: Callable[[Any], Any], exc: type[Exception], msg: str
) -> None:
    with Client(str(tmp_path / "nobody.sock")) as c, pytest.raises(exc, match=msg):
        op(c)


@pytest.mark.parametrize(("what", "op", "exc", "msg"), BAD, ids=[b[0] for b in BAD])
def test_async_client_refuses_before_the_wire(
    tmp_path: Path, what: str, op: Callable[[Any], Any], exc: type[Exception], msg: str
) -> None:
    async def go() -> None:
        async with AsyncClient(str(tmp_path / "nobody.sock")) as c:
            with pytest.raises(exc, match=msg):
                await op(c)

    asyncio.run(go())


def test_refusals_are_argument_errors(tmp_path: Path) -> None:
    """kupctl tells a refused argument (a usage error) from any other
    ValueError / TypeError by this class."""
    with Client(str(tmp_path / "nobody.sock")) as c:
        for _, op, _, _ in BAD:
            with pytest.raises(ArgumentError):
                op(c)


@pytest.mark.parametrize("cls", [Client, AsyncClient, AdminClient])
def test_an_empty_socket_path_is_refused_at_once(cls: Any) -> None:
    """"" was taken for the current directory: the client was made, and its
    first call failed "connect failed ... " naming no argument."""
    for path in ("", "unix:"):
        with pytest.raises(ArgumentError, match="socket path must not be empty"):
            cls(path)
    with pytest.raises(TypeError, match="socket path must be a str, not NoneType"):
        cls(None)


def test_a_path_object_is_a_socket_path(kupd: Kupd) -> None:
    with Client(Path(kupd.socket)) as c:
        assert c.path == kupd.socket
        assert c.call("echo", b"x", timeout=10).data.lower() == b"x"


def test_sync_watch_checks_its_device(tmp_path: Path) -> None:
    with Client(str(tmp_path / "nobody.sock")) as c:
        with pytest.raises(TypeError, match="device must be a str, not int"):
            c.watch(5)  # type: ignore[arg-type]


def test_async_watch_checks_its_device(tmp_path: Path) -> None:
    async def go() -> None:
        async with AsyncClient(str(tmp_path / "nobody.sock")) as c:
            with pytest.raises(TypeError, match="device must be a str, not int"):
                async for _ in c.watch(5):  # type: ignore[arg-type]
                    pass

    asyncio.run(go())


def test_a_channel_of_a_bad_id_is_refused_by_the_handle(kupd: Kupd) -> None:
    with kupd.client() as c:
        h = c.open("echo")
        with pytest.raises(ValueError, match=re.escape("channel must be >= 0, not -1")):
            h.channel(-1)
        with pytest.raises(TypeError, match="channel must be an int or None, not str"):
            h.channel("2")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="channel must be <= 4294967295"):
            h.channel(2**32 + 40)  # wrapped to channel 40 on the wire before


def test_a_session_refuses_data_of_a_wrong_type_as_an_argument_error(kupd: Kupd) -> None:
    """A Session channel's send / exchange refuse data that is not bytes
    with the library's ArgumentTypeError (a plain TypeError before), and
    the session goes on."""
    from kupclient.errors import ArgumentTypeError

    async def go_async() -> None:
        async with AsyncClient(kupd.socket) as c:
            async with await (await c.open("echo")).channel() as ch:
                await ch.receive(timeout=5)
                for bad in ("str", 5, None):
                    with pytest.raises(ArgumentTypeError, match="data must be bytes, not"):
                        await ch.send(bad)  # type: ignore[arg-type]
                    with pytest.raises(ArgumentTypeError, match="data must be bytes, not"):
                        await ch.exchange(bad, timeout=5)  # type: ignore[arg-type]
                assert (await ch.exchange(b"ok", timeout=5)).data == b"ok"

    with kupd.client() as c, c.open("echo").channel() as ch:
        ch.receive(timeout=5)
        for bad in ("str", 5, None):
            with pytest.raises(ArgumentTypeError, match="data must be bytes, not"):
                ch.send(bad)  # type: ignore[arg-type]
            with pytest.raises(ArgumentTypeError, match="data must be bytes, not"):
                ch.exchange(bad, timeout=5)  # type: ignore[arg-type]
        assert ch.exchange(b"ok", timeout=5).data == b"ok"
    asyncio.run(go_async())


def test_every_accepted_type_still_works(kupd: Kupd) -> None:
    with kupd.client() as c:
        for data in (b"abc", bytearray(b"abc"), memoryview(b"xabcx")[1:4]):
            assert c.call("echo", data, timeout=5).data.lower() == b"abc"
        assert c.call("echo", b"t", timeout=1).data.lower() == b"t"  # an int timeout
        lease = c.attach("echo", 6)
        try:
            assert c.lease_receive(lease.lease_id, timeout=5).data == b""  # echo's first PASS
            got = c.lease_exchange(lease.lease_id, bytearray(b"even"), timeout=5)
            assert got.data == b"even"
        finally:
            c.release(lease.lease_id)


def test_a_payload_past_grpcs_limit_is_toobig_before_the_wire(tmp_path: Path) -> None:
    """A Call or lease Send past gRPC's message limit died in gRPC itself
    ("ResourceExhausted: CLIENT: Sent message larger than max"): TooBig
    naming the limit, refused on a socket nobody serves (nothing sent)."""
    big = b"x" * (MAX_PAYLOAD + 1)
    said = f"data of {MAX_PAYLOAD + 1} bytes is larger than any message kupd carries"
    with Client(str(tmp_path / "nobody.sock")) as c:
        with pytest.raises(errors.TooBig, match=said):
            c.call("echo", big)
        with pytest.raises(errors.TooBig, match=said):
            c.lease_send("l", bytearray(big))

    async def go() -> None:
        async with AsyncClient(str(tmp_path / "nobody.sock")) as c:
            with pytest.raises(errors.TooBig, match=said):
                await c.call("echo", big)

    asyncio.run(go())
