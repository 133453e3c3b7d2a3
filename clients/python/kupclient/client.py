"""Synchronous kupd client: libkup's API on top of the kup.v1 gRPC service."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kupapi import kup_pb2, kup_pb2_grpc
from kupclient import _wire
from kupclient._args import call_timeout_ms, channel_arg, data_arg, device_arg
from kupclient._errors import error_from_pb, error_from_rpc
from kupclient._types import (
    DeviceInfo,
    Lease,
    Message,
    WatchEvent,
    channel_options,
    default_caller,
    device_from_pb,
    lease_from_pb,
    message_from_pb,
    receive_mode,
    target_for,
)
from kupd import errors

__all__ = ["Channel", "Client", "DeviceHandle", "Watch"]

_END = object()


def _deadline(timeout: float | None) -> float | None:
    # Give the server time to answer DEADLINE_EXCEEDED itself (with the
    # kupd error attached) before the client's own deadline fires.
    return None if timeout is None else timeout + 5.0


class Client:
    """A connection to kupd on a unix socket.

    ``Client(path)``; ``devices()``, ``open(device)``, ``call(...)``,
    ``watch()``, the lease operations and ``health()``.  Errors are
    :mod:`kupd.errors` exceptions.  Use as a context manager or ``close()``.
    """

    def __init__(self, path: str, *, caller: str | None = None) -> None:
        self.path = path
        self.caller = caller if caller is not None else default_caller()
        self._channel = grpc.insecure_channel(target_for(path), options=channel_options())
        self._stub = kup_pb2_grpc.KupStub(self._channel)

    # -- plumbing ---------------------------------------------------------
    def _unary(self, method: str, request: Any, timeout: float | None = None) -> Any:
        try:
            return getattr(self._stub, method)(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- devices ----------------------------------------------------------
    def devices(self, device: str = "") -> list[DeviceInfo]:
        """Devices kupd serves (or only ``device``), with channel states."""
        resp = self._unary("ListDevices", kup_pb2.ListDevicesRequest(device=device), 30.0)
        return [device_from_pb(d) for d in resp.devices]

    def open(self, device: str) -> DeviceHandle:
        """A handle on ``device`` (checked to exist: NotFound otherwise)."""
        self.devices(device_arg(device))
        return DeviceHandle(self, device)

    def health(self, service: str = "") -> str:
        """The health status name ("SERVING", "NOT_SERVING", ...) of ``service``."""
        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=30.0)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        name: str = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
        return name

    # -- calls ------------------------------------------------------------
    def call(self, device: str, data: bytes, timeout: float | None = None) -> Message:
        """Send ``data`` on a pooled channel of ``device`` and return the reply."""
        req = kup_pb2.CallRequest(
            device=device_arg(device),
            data=data_arg(data),
            timeout_ms=call_timeout_ms(timeout),
            caller=self.caller,
        )
        resp = self._unary("Call", req, _deadline(timeout))
        return message_from_pb(resp.reply)

    # -- watch ------------------------------------------------------------
    def watch(self, device: str | None = None, *, initial_state: bool = False) -> Watch:
        """Device and lease events (an iterator; ``cancel()`` or ``with`` to stop)."""
        req = kup_pb2.WatchRequest(device=device or "", initial_state=initial_state)
        return Watch(self._stub.Watch(req))

    # -- leases -----------------------------------------------------------
    def attach(self, device: str, chan_id: int | None = None) -> Lease:
        """Take a lease on a channel (any free one if ``chan_id`` is None)."""
        req = kup_pb2.AttachRequest(device=device_arg(device))
        chan = channel_arg(chan_id)
        if chan is not None:
            req.channel = chan
        return lease_from_pb(self._unary("Attach", req, 30.0))

    def lease_send(self, lease_id: str, data: bytes) -> None:
        self._unary("Send", kup_pb2.SendRequest(lease_id=lease_id, data=data_arg(data)), 30.0)

    def lease_pass(self, lease_id: str) -> None:
        self._unary("Pass", kup_pb2.PassRequest(lease_id=lease_id), 30.0)

    def lease_receive(self, lease_id: str, timeout: float | None = None) -> Message:
        """Receive on a lease: None blocks, 0 raises NotReady when nothing is there."""
        mode, ms = receive_mode(timeout)
        req = kup_pb2.ReceiveRequest(lease_id=lease_id, mode=mode, timeout_ms=ms)
        resp = self._unary("Receive", req, _deadline(timeout))
        if resp.not_ready:
            raise errors.NotReady(f"lease {lease_id}: no message yet")
        return message_from_pb(resp.message)

    def lease_exchange(self, lease_id: str, data: bytes, timeout: float | None = None) -> Message:
        """Send ``data`` on a lease and wait for the reply, in one RPC (Send
        with wait_reply).  ``timeout`` as for :meth:`lease_receive`; when the
        wait fails (e.g. DeadlineExceeded) the data was sent and the reply is
        still owed: :meth:`lease_receive` gets it."""
        mode, ms = receive_mode(timeout)
        req = kup_pb2.SendRequest(
            lease_id=lease_id,
            data=data_arg(data),
            wait_reply=True,
            reply_mode=mode,
            reply_timeout_ms=ms,
        )
        resp = self._unary("Send", req, _deadline(timeout))
        if not resp.HasField("reply"):  # a kupd without wait_reply: it only sent
            return self.lease_receive(lease_id, timeout)
        if resp.reply.not_ready:
            raise errors.NotReady(f"lease {lease_id}: no message yet")
        return message_from_pb(resp.reply.message)

    def release(self, lease_id: str) -> None:
        self._unary("Release", kup_pb2.ReleaseRequest(lease_id=lease_id), 30.0)


class DeviceHandle:
    """A device seen through kupd (``client.open(name)``)."""

    def __init__(self, client: Client, name: str) -> None:
        self.client = client
        self.name = name

    def info(self) -> DeviceInfo:
        return self.client.devices(self.name)[0]

    def channel(self, chan_id: int | None = None) -> Channel:
        """Open a Session holding channel ``chan_id`` (None: any free one)."""
        return Channel(self.client, self.name, channel_arg(chan_id))

    def call(self, data: bytes, timeout: float | None = None) -> Message:
        return self.client.call(self.name, data, timeout)

    def close(self) -> None:
        """Nothing to release: channels are closed one by one."""

    def __enter__(self) -> DeviceHandle:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class Channel:
    """One channel held through a Session stream for as long as it is open."""

    def __init__(self, client: Client, device: str, chan_id: int | None) -> None:
        self.device = device
        self._requests: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._next_id = 0
        self._lock = threading.Lock()
        self._closed = False
        # the data path's own wire codec (kupclient._wire), not the stub's
        self._responses: Iterator[kup_pb2.SessionResponse | _wire.WireReply] = (
            client._channel.stream_stream(
                _wire.SESSION_METHOD,
                request_serializer=_wire.serialize,
                response_deserializer=_wire.deserialize,
            )(self._request_iter())
        )
        attach = kup_pb2.SessionAttach(device=device)
        if chan_id is not None:
            attach.channel = chan_id
        try:
            resp = self._op(kup_pb2.SessionRequest(attach=attach))
        except BaseException:
            self.close()
            raise
        assert isinstance(resp, kup_pb2.SessionResponse)
        self.lease = lease_from_pb(resp.attached)
        self.id = self.lease.channel
        self.max_msg = self.lease.max_message_bytes

    def _request_iter(self) -> Iterator[kup_pb2.SessionRequest | _wire.WireOp]:
        while True:
            item = self._requests.get()
            if item is _END:
                return
            assert isinstance(item, (kup_pb2.SessionRequest, _wire.WireOp))
            yield item

    def _op(
        self, req: kup_pb2.SessionRequest | _wire.WireOp
    ) -> kup_pb2.SessionResponse | _wire.WireReply:
        with self._lock:
            if self._closed:
                raise errors.InvalidArgument(f"channel of {self.device} is closed")
            self._next_id += 1
            req.request_id = self._next_id
            self._requests.put(req)
            try:
                resp = next(self._responses)
            except StopIteration:
                raise errors.PeerGone(f"session on {self.device} ended") from None
            except grpc.RpcError as exc:
                self._closed = True
                raise error_from_rpc(exc) from None
        if isinstance(resp, _wire.WireReply):
            return resp
        if resp.WhichOneof("result") == "error":
            raise error_from_pb(resp.error)
        return resp

    def send(self, data: bytes) -> None:
        """Send ``data`` and hand the turn to the kernel."""
        self._op(_wire.WireOp.send(data))

    def pass_(self) -> None:
        """Hand the turn to the kernel without data."""
        self._op(kup_pb2.SessionRequest(pass_turn=kup_pb2.SessionPass()))

    def receive(self, timeout: float | None = None) -> Message:
        """Wait for the kernel's message: None blocks, 0 raises NotReady, >0 seconds."""
        mode, ms = receive_mode(timeout)
        resp = self._op(
            kup_pb2.SessionRequest(receive=kup_pb2.SessionReceive(mode=mode, timeout_ms=ms))
        )
        not_ready, msg = _wire.reply_of(resp, "received")
        if not_ready:
            raise errors.NotReady(f"channel {self.id} of {self.device}: no message yet")
        assert msg is not None  # reply_of: None only when not_ready
        return msg

    def exchange(self, data: bytes, timeout: float | None = None) -> Message:
        """``send(data)`` then ``receive(timeout)`` as one request on the
        stream (half the messages).  A failed send sent nothing; when the wait
        fails (e.g. DeadlineExceeded) the data was sent and the reply is still
        owed: :meth:`receive` gets it."""
        mode, ms = receive_mode(timeout)
        resp = self._op(_wire.WireOp.exchange(data, mode, ms))
        not_ready, msg = _wire.reply_of(resp, "exchanged")
        if not_ready:
            raise errors.NotReady(f"channel {self.id} of {self.device}: no message yet")
        assert msg is not None  # reply_of: None only when not_ready
        return msg

    def try_receive(self) -> Message | None:
        """Non-blocking receive: the message, or None when the turn is not back."""
        try:
            return self.receive(0)
        except errors.NotReady:
            return None

    def close(self) -> None:
        """End the session (the lease is released by kupd)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._requests.put(_END)
        cancel = getattr(self._responses, "cancel", None)
        try:
            for _ in self._responses:
                pass
        except grpc.RpcError:
            pass
        if cancel is not None:
            cancel()

    def __enter__(self) -> Channel:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class Watch:
    """An iterator of :class:`WatchEvent`; ends when cancelled or kupd stops.

    A kupd shutdown ends the iteration by raising :class:`kupd.errors.Shutdown`
    (after the SERVER_SHUTTING_DOWN event).
    """

    def __init__(self, call: Any) -> None:
        self._call = call

    def __iter__(self) -> Iterator[WatchEvent]:
        return self

    def __next__(self) -> WatchEvent:
        try:
            return WatchEvent.from_pb(next(self._call))
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED:
                raise StopIteration from None
            raise error_from_rpc(exc) from None

    def cancel(self) -> None:
        self._call.cancel()

    def __enter__(self) -> Watch:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cancel()
