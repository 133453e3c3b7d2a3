"""kupd as a system under test: two kupsim echo hosts, kupd in front, clients.

* kupsim "many": the echo module with 1024 channels of a few pages (round
  trips, scale, idle, memory: up to 1000 Sessions + the Call pool at once);
  kupd serves it as device ``echo`` (found through ``kupsim_dir``).
* kupsim "big": echo with a few channels of KUP_MAX_PAGES pages (the largest
  message a channel holds), served by kupd under its socket path.

Clients: the kupclient library (what users get) for Session / lease / Call
round trips and the scale shapes, and the raw kup.v1 stubs for what the
protocol allows beyond the library (requests pipelined on one Session
stream; distinct Call ``caller`` keys for 256 clients).  A request/reply is
an ``exchange`` (one request, one response) unless the echoer is built with
``exchange=False`` (a ``send`` then a ``receive``: two of each).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from .context import RunCtx, log
from .kupsim_echo import echo_sim
from .procs import BenchError
from .shapes import pattern

if TYPE_CHECKING:
    from kupd.testing import Kupd

__all__ = ["CallEcho", "ClientSession", "KupdSut", "LeaseEcho", "RawCallEcho", "RawSession",
           "StripedPump"]

MANY_CHANNELS = 1024          # KUP_MAX_CHANNELS: 1000 Sessions + Call pool + spare
MANY_PAGES = 16               # 64 KiB messages
BIG_CHANNELS = 3              # pump_echoers; + the striped pumps' Sessions (Config.stripe_sessions)
BIG_PAGES = 1024              # KUP_MAX_PAGES: the largest message a channel holds
OP_TIMEOUT_S = 30.0


class ClientSession:
    """A channel held through kupclient's AsyncChannel (a Session stream)."""

    def __init__(self, ch: Any, exchange: bool = True) -> None:
        self.ch = ch
        self.exchange = exchange

    @classmethod
    async def open(cls, client: Any, device: str, exchange: bool = True) -> ClientSession:
        ch = await (await client.open(device)).channel()
        first = await ch.receive(timeout=OP_TIMEOUT_S)  # echo hands the turn over: PASS
        del first
        return cls(ch, exchange)

    async def rt(self, data: bytes) -> bytes:
        if self.exchange:
            m = await self.ch.exchange(data, timeout=OP_TIMEOUT_S)
        else:
            await self.ch.send(data)
            m = await self.ch.receive(timeout=OP_TIMEOUT_S)
        return bytes(m.data)

    async def pump(self, data: bytes, count: int) -> int:
        got = 0
        for _ in range(count):
            got += len(await self.rt(data))
        return got

    async def close(self) -> None:
        try:
            await self.ch.close()
        except TypeError:
            # kupclient's AsyncChannel.close awaits the StreamStreamCall, which
            # grpc.aio does not allow (reported in bench findings): end it here.
            self.ch._call.cancel()


class RawSession:
    """A Session stream driven with the raw stubs: requests are written back
    to back (pipelined), responses read in order.  Each echo is one
    ``exchange`` request, or (``exchange=False``) a ``send`` and a ``receive``."""

    def __init__(self, stub: Any, pb: Any, device: str, exchange: bool = True) -> None:
        self.pb = pb
        self.device = device
        self.exchange = exchange
        self.call: Any = stub.Session()
        self.next_id = 0
        self.max_msg = 0

    def _req(self, **op: Any) -> Any:
        self.next_id += 1
        return self.pb.SessionRequest(request_id=self.next_id, **op)

    async def _read(self) -> Any:
        resp = await self.call.read()
        if resp is grpc.aio.EOF:
            raise BenchError(f"kupd Session on {self.device} ended")
        if resp.WhichOneof("result") == "error":
            raise BenchError(f"kupd Session op failed: {resp.error.kind}: {resp.error.message}")
        return resp

    async def open(self) -> RawSession:
        await self.call.write(self._req(attach=self.pb.SessionAttach(device=self.device)))
        resp = await self._read()
        self.max_msg = int(resp.attached.max_message_bytes)
        await self.call.write(self._req(receive=self.pb.SessionReceive()))
        await self._read()  # the echo module's first PASS
        return self

    async def _write_echo(self, data: bytes) -> None:
        if self.exchange:
            await self.call.write(self._req(exchange=self.pb.SessionExchange(data=data)))
        else:
            await self.call.write(self._req(send=self.pb.SessionSend(data=data)))
            await self.call.write(self._req(receive=self.pb.SessionReceive()))

    async def _read_echo(self) -> bytes:
        if self.exchange:
            return bytes((await self._read()).exchanged.message.data)
        await self._read()
        return bytes((await self._read()).received.message.data)

    async def rt(self, data: bytes) -> bytes:
        await self._write_echo(data)
        return await self._read_echo()

    async def pump(self, data: bytes, count: int) -> int:
        async def writer() -> None:
            for _ in range(count):
                await self._write_echo(data)

        wtask = asyncio.create_task(writer())
        got = 0
        try:
            for _ in range(count):
                got += len(await self._read_echo())
            await wtask
        finally:
            if not wtask.done():
                wtask.cancel()
        return got

    async def close(self) -> None:
        with contextlib.suppress(grpc.RpcError, asyncio.CancelledError):
            await self.call.done_writing()
        self.call.cancel()


class WireSession(RawSession):
    """A pipelined Session like :class:`RawSession`, written and read with
    kupclient's own Session codec (``kupclient._wire``: the payload joined
    with its few header bytes on the way out, sliced out on the way in)
    instead of the generated classes -- what the bare echo's client does
    with its raw bytes, so that the stream throughput rows time kupd, not
    the client's protobuf library (the generated-stub rows stay, as
    ``kupd.pump_pb_*``)."""

    def __init__(self, channel: Any, pb: Any, device: str) -> None:
        from kupclient import _wire

        self.pb = pb
        self.device = device
        self.exchange = True
        self._wire = _wire
        self.call = channel.stream_stream(
            _wire.SESSION_METHOD,
            request_serializer=_wire.serialize,
            response_deserializer=_wire.deserialize,
        )()
        self.next_id = 0
        self.max_msg = 0

    async def _read(self) -> Any:
        resp = await self.call.read()
        if resp is grpc.aio.EOF:
            raise BenchError(f"kupd Session on {self.device} ended")
        if isinstance(resp, self._wire.WireReply):
            return resp
        if resp.WhichOneof("result") == "error":
            raise BenchError(f"kupd Session op failed: {resp.error.kind}: {resp.error.message}")
        return resp

    async def _write_echo(self, data: bytes) -> None:
        op = self._wire.WireOp.exchange(data, 0, 0)
        self.next_id += 1
        op.request_id = self.next_id
        await self.call.write(op)

    async def _read_echo(self) -> bytes:
        not_ready, m = self._wire.reply_of(await self._read(), "exchanged")
        if not_ready or m is None:
            raise BenchError(f"kupd Session on {self.device}: exchange answered not_ready")
        return m.data


class StripedPump:
    """One client's pump striped over several Sessions (channels): the turn
    protocol allows one message in flight per channel, so a client that
    wants throughput spreads its messages over channels.  ``pump`` splits
    the messages as evenly as it can and runs every Session's pipelined pump
    at once."""

    def __init__(self, sessions: list[RawSession]) -> None:
        self.sessions = sessions

    async def rt(self, data: bytes) -> bytes:
        return await self.sessions[0].rt(data)

    async def pump(self, data: bytes, count: int) -> int:
        n = len(self.sessions)
        shares = [count // n + (1 if i < count % n else 0) for i in range(n)]
        got = await asyncio.gather(
            *(s.pump(data, k) for s, k in zip(self.sessions, shares, strict=True) if k))
        return sum(got)

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self.sessions), return_exceptions=True)


class LeaseEcho:
    """A unary lease: Attach, then per round trip one Send with wait_reply
    (``lease_exchange``), or (``exchange=False``) Send + Receive: two RPCs."""

    def __init__(self, client: Any, lease_id: str, exchange: bool = True) -> None:
        self.client = client
        self.lease_id = lease_id
        self.exchange = exchange

    @classmethod
    async def open(cls, client: Any, device: str, exchange: bool = True) -> LeaseEcho:
        lease = await client.attach(device)
        self = cls(client, lease.lease_id, exchange)
        await client.lease_receive(self.lease_id, timeout=OP_TIMEOUT_S)  # first PASS
        return self

    async def rt(self, data: bytes) -> bytes:
        if self.exchange:
            m = await self.client.lease_exchange(self.lease_id, data, timeout=OP_TIMEOUT_S)
            return bytes(m.data)
        await self.client.lease_send(self.lease_id, data)
        m = await self.client.lease_receive(self.lease_id, timeout=OP_TIMEOUT_S)
        return bytes(m.data)

    async def pump(self, data: bytes, count: int) -> int:
        raise BenchError("a unary lease has no stream to pump")

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.client.release(self.lease_id)


class CallEcho:
    def __init__(self, client: Any, device: str) -> None:
        self.client = client
        self.device = device

    async def rt(self, data: bytes) -> bytes:
        m = await self.client.call(self.device, data, timeout=OP_TIMEOUT_S)
        return bytes(m.data)

    async def pump(self, data: bytes, count: int) -> int:
        raise BenchError("Call has no stream to pump")

    async def close(self) -> None:
        return None


class RawCallEcho:
    """Call through the raw kup.v1 stub (no kupclient): what the protocol
    costs a client, to compare with :class:`CallEcho` (kupclient)."""

    def __init__(self, stub: Any, pb: Any, device: str, caller: str = "") -> None:
        self.stub = stub
        self.pb = pb
        self.device = device
        self.caller = caller

    async def rt(self, data: bytes) -> bytes:
        resp = await self.stub.Call(
            self.pb.CallRequest(device=self.device, data=data, caller=self.caller),
            timeout=OP_TIMEOUT_S)
        return bytes(resp.reply.data)

    async def pump(self, data: bytes, count: int) -> int:
        raise BenchError("Call has no stream to pump")

    async def close(self) -> None:
        return None


class KupdSut:
    """kupd running in front of two kupsim echo hosts, plus its clients."""

    def __init__(self, ctx: RunCtx, stack: contextlib.AsyncExitStack, proc: Kupd,
                 sock: Path, big_device: str) -> None:
        from kupapi import kup_pb2, kup_pb2_grpc
        from kupclient import AsyncClient

        self.ctx = ctx
        self.stack = stack
        self.proc = proc
        self.sock = sock
        self.device = "echo"
        self.big_device = big_device
        self.pb = kup_pb2
        self.client: Any = AsyncClient(str(sock))
        self.stub: Any = kup_pb2_grpc.KupStub(self.client._channel)
        self.max_msg = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    async def start(cls, ctx: RunCtx, stack: contextlib.AsyncExitStack) -> KupdSut:
        try:
            import kupapi  # noqa: F401
            import kupclient  # noqa: F401
            from kupd.testing import KupdError, start_kupd
        except ImportError as exc:
            raise BenchError(f"kupd client not importable: {exc}") from exc
        many_dir, big_dir = ctx.tmp / "sim-many", ctx.tmp / "sim-big"
        stack.enter_context(echo_sim(MANY_PAGES, MANY_CHANNELS, rundir=many_dir))
        big_channels = BIG_CHANNELS + sum(ctx.cfg.stripe_sessions)  # all open at once
        stack.enter_context(echo_sim(BIG_PAGES, big_channels, rundir=big_dir))
        sock = ctx.tmp / "kupd.sock"
        big_device = str(big_dir / "echo.sock")
        conf = ctx.tmp / "kupd.toml"
        conf.write_text(
            f'socket = "{sock}"\n'
            f'pid_file = "-"\n'
            f'kupsim_dir = "{many_dir}"\n'
            f'log_level = "warning"\n'
            f"max_sessions = 4096\n"
            f"[[device]]\n"
            f'name = "echo"\n'
            f"call_channels = {ctx.cfg.call_channels}\n"
            f"[[device]]\n"
            f'name = "{big_device}"\n'
        )
        # kupd.testing's harness (the one the tests use): log capture, wait for
        # health SERVING, SIGTERM / SIGKILL by pid.  Health is not polled by
        # kupd itself (health_interval=None): the run measures kupd's defaults.
        # ``-P``: no cwd on sys.path, so kupd comes from ``ctx.root`` (compare.py
        # runs an older tree next to this one).
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ctx.root), str(ctx.root / "clients" / "python")])
        try:
            proc = start_kupd(
                config=conf,
                socket=sock,
                log=ctx.logs / "kupd.log",
                command=[sys.executable, "-P", "-m", "kupd.daemon"],
                env=env,
                health_interval=None,
                start_timeout=30.0,
            )
        except KupdError as exc:
            raise BenchError(f"kupd did not start: {str(exc).splitlines()[0]} "
                             f"(log: {ctx.logs / 'kupd.log'})") from exc
        stack.callback(proc.stop, 5.0)
        self = cls(ctx, stack, proc, sock, big_device)
        stack.push_async_callback(self.client.close)
        await self._wait_serving()
        return self

    async def _wait_serving(self, timeout: float = 30.0) -> None:
        """Until both echo devices are reachable and the Call pool is full."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc.proc.poll() is not None:
                raise BenchError(f"kupd exited with status {self.proc.proc.returncode} "
                                 f"(log: {self._log_tail()})")
            try:
                devs = await self.client.devices()
                ok = {d.name: d for d in devs if d.reachable}
                if self.device in ok and self.big_device in ok:
                    if ok[self.device].call_channels >= self.ctx.cfg.call_channels:
                        return
                last = f"devices: {[(d.name, d.reachable, d.error) for d in devs]}"
            except Exception as exc:
                last = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(0.1)
        raise BenchError(f"kupd not serving both echo devices after {timeout:.0f} s ({last})")

    def _log_tail(self) -> str:
        try:
            return (self.ctx.logs / "kupd.log").read_text()[-400:].replace("\n", " | ")
        except OSError:
            return "no log"

    # -- echoers ------------------------------------------------------------

    async def rt_echoers(self) -> dict[str, Any]:
        """One echoer per kupd round-trip figure; the caller closes them
        (``close_idle``) when done, so later figures run without them."""
        out: dict[str, Any] = {}
        try:
            out["kupd.session_rt"] = await ClientSession.open(self.client, self.device)
            out["kupd.session_rt_sr"] = await ClientSession.open(self.client, self.device,
                                                                 exchange=False)
            out["kupd.session_rt_pipe"] = await RawSession(self.stub, self.pb, self.device,
                                                           exchange=False).open()
            out["kupd.unary_x"] = await LeaseEcho.open(self.client, self.device)
            out["kupd.unary_sr"] = await LeaseEcho.open(self.client, self.device,
                                                        exchange=False)
            out["kupd.call_rt"] = CallEcho(self.client, self.device)
            # the same shapes through the raw stubs: what kupclient itself costs
            out["kupd.session_rt_raw"] = await RawSession(self.stub, self.pb, self.device).open()
            out["kupd.call_rt_raw"] = RawCallEcho(self.stub, self.pb, self.device)
        except BaseException:
            await self.close_idle(list(out.values()))
            raise
        return out

    async def pump_echoers(self) -> tuple[Any, Any, Any]:
        """(pipelined Session with kupclient's codec, pipelined Session with
        the generated stubs, kupclient Session) on the big device; the
        caller closes them (``close_idle``)."""
        out: list[Any] = []
        try:
            out.append(await WireSession(self.client._channel, self.pb, self.big_device).open())
            self.max_msg = out[0].max_msg
            out.append(await RawSession(self.stub, self.pb, self.big_device).open())
            out.append(await ClientSession.open(self.client, self.big_device))
        except BaseException:
            await self.close_idle(out)
            raise
        return out[0], out[1], out[2]

    async def stripes(self, n: int) -> StripedPump:
        """``n`` pipelined Sessions (kupclient's codec) on the big device,
        pumped together; the caller closes it (``close_idle``)."""
        out: list[RawSession] = []
        try:
            for _ in range(n):
                out.append(
                    await WireSession(self.client._channel, self.pb, self.big_device).open()
                )
        except BaseException:
            await self.close_idle(list(out))
            raise
        return StripedPump(out)

    async def sessions(self, k: int, raw: bool = False) -> list[ClientSession | RawSession]:
        """``k`` Sessions on the echo device: kupclient's (what users get), or
        with ``raw`` the raw kup.v1 stub's (the hop floor's client)."""
        out: list[ClientSession | RawSession] = []
        try:
            for _ in range(k):
                if raw:
                    out.append(await RawSession(self.stub, self.pb, self.device).open())
                else:
                    out.append(await ClientSession.open(self.client, self.device))
        except BaseException:
            await self.close_sessions(out)
            raise
        return out

    async def close_sessions(self, sessions: list[ClientSession | RawSession]) -> None:
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)

    def callers(self, n: int) -> list[Callable[[bytes], Awaitable[bytes]]]:
        """``n`` Call clients, each with its own fairness key (raw stubs)."""
        out = []
        for i in range(n):
            out.append(self._caller(f"bench-{os.getpid()}-{i}"))
        return out

    def _caller(self, name: str) -> Callable[[bytes], Awaitable[bytes]]:
        stub, pb, dev = self.stub, self.pb, self.device

        async def rt(data: bytes) -> bytes:
            resp = await stub.Call(pb.CallRequest(device=dev, data=data, caller=name),
                                   timeout=OP_TIMEOUT_S)
            return bytes(resp.reply.data)
        return rt

    async def idle_population(self, sessions: int, channels: int) -> list[Any]:
        """``sessions`` idle Sessions and ``channels`` idle leased channels, all
        having done one round trip (so every one is really attached)."""
        out: list[Any] = list(await self.sessions(sessions))
        try:
            for _ in range(channels):
                out.append(await LeaseEcho.open(self.client, self.device))
            await asyncio.gather(*(e.rt(pattern(64)) for e in out))
        except BaseException:
            await self.close_idle(out)
            raise
        log(f"  {sessions} idle Sessions + {channels} idle leases attached")
        return out

    async def close_idle(self, items: list[Any]) -> None:
        await asyncio.gather(*(e.close() for e in items), return_exceptions=True)
