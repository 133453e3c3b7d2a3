"""Prometheus metrics of kupd (``prometheus-client``), served only when
``metrics_port`` is configured, and only on a loopback address.

Each :class:`Metrics` has its own registry, so several servers (tests) can
live in one process.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["ChannelMetrics", "Metrics"]


class ChannelMetrics:
    """The labelled children of one (device, channel): looked up once, so a
    message costs no ``labels()`` call (a lock, str conversions, a dict)."""

    __slots__ = ("recv_bytes", "recv_msgs", "sent_bytes", "sent_msgs", "turn_wait")

    def __init__(self, m: Metrics, device: str, channel: int) -> None:
        c = str(channel)
        self.sent_msgs = m.messages.labels(device, c, "to_kernel")
        self.sent_bytes = m.bytes.labels(device, c, "to_kernel")
        self.recv_msgs = m.messages.labels(device, c, "from_kernel")
        self.recv_bytes = m.bytes.labels(device, c, "from_kernel")
        self.turn_wait = m.turn_wait.labels(device)

    def sent(self, nbytes: int) -> None:
        self.sent_msgs.inc()
        self.sent_bytes.inc(nbytes)

    def received(self, nbytes: int) -> None:
        self.recv_msgs.inc()
        self.recv_bytes.inc(nbytes)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.messages = Counter(
            "kupd_messages", "Messages moved", ["device", "channel", "direction"], registry=r
        )
        self.bytes = Counter(
            "kupd_bytes", "Payload bytes moved", ["device", "channel", "direction"], registry=r
        )
        self.turn_wait = Histogram(
            "kupd_turn_wait_seconds",
            "Time waiting for the kernel to hand the turn back",
            ["device"],
            buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
            registry=r,
        )
        self.sessions = Gauge("kupd_sessions", "Open Session streams", ["device"], registry=r)
        self.leases = Gauge("kupd_leases", "Open Attach leases", ["device"], registry=r)
        self.calls_queued = Gauge(
            "kupd_calls_queued", "Calls waiting for a pool channel", ["device"], registry=r
        )
        self.calls = Counter("kupd_calls", "Calls finished", ["device", "code"], registry=r)
        self.errors = Counter(
            "kupd_errors",
            "RPC errors by gRPC code, per device and channel ('' where not known)",
            ["device", "channel", "code"],
            registry=r,
        )
        self._server: Any = None
        self._channels: dict[tuple[str, int], ChannelMetrics] = {}

    def serve(self, port: int, address: str = "127.0.0.1") -> int:
        """Start the HTTP endpoint (one thread); returns the bound port."""
        server, _thread = start_http_server(port, addr=address, registry=self.registry)
        self._server = server
        bound: int = server.server_port
        return bound

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def channel(self, device: str, channel: int) -> ChannelMetrics:
        """The (cached) children of one channel; the label sets are bounded by
        the devices' channel counts, as the series themselves are."""
        key = (device, channel)
        cm = self._channels.get(key)
        if cm is None:
            cm = self._channels[key] = ChannelMetrics(self, device, channel)
        return cm

    def sent(self, device: str, channel: int, nbytes: int) -> None:
        self.channel(device, channel).sent(nbytes)

    def received(self, device: str, channel: int, nbytes: int) -> None:
        self.channel(device, channel).received(nbytes)
