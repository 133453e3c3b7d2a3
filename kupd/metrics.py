"""Prometheus metrics of kupd (``prometheus-client``), served only when
``metrics_port`` is configured, and only on a loopback address.

Each :class:`Metrics` has its own registry, so several servers (tests) can
live in one process.

The per-message series (``kupd_messages``, ``kupd_bytes``,
``kupd_turn_wait_seconds``) and the per-Call ``kupd_calls`` are plain
Python ints and floats bumped on the hot path and turned into metric
families only when scraped (a custom collector): a ``Counter.inc`` /
``Histogram.observe`` takes a lock and walks value objects per call, which
showed as 2-4% of kupd's CPU per message
(bench/results/FINDINGS.md F2).  The exposition is the same as the client
library's own Counter / Histogram (``_total`` and ``_created`` samples,
cumulative ``le`` buckets with ``+Inf``, ``_count``, ``_sum``).
"""

from __future__ import annotations

import bisect
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

__all__ = ["CallCount", "ChannelMetrics", "Metrics", "TenantCollector", "TurnWait"]

TURN_WAIT_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30)


class TurnWait:
    """One device's turn-wait histogram: counts per bucket, kept as plain
    numbers (``observe`` is a bisect and two additions)."""

    __slots__ = ("counts", "created", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(TURN_WAIT_BUCKETS) + 1)  # the last one: +Inf
        self.sum = 0.0
        self.created = time.time()

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(TURN_WAIT_BUCKETS, seconds)] += 1
        self.sum += seconds


class CallCount:
    """Finished Calls of one (device, code): a plain number, turned into
    ``kupd_calls_total`` at scrape time (a prometheus Counter takes a lock
    per ``inc``)."""

    __slots__ = ("created", "n")

    def __init__(self) -> None:
        self.n = 0
        self.created = time.time()


class ChannelMetrics:
    """The counters of one (device, channel): looked up once per lease, so a
    message costs two integer additions per direction."""

    __slots__ = (
        "created",
        "recv_bytes",
        "recv_msgs",
        "sent_bytes",
        "sent_msgs",
        "turn_wait",
    )

    def __init__(self, turn_wait: TurnWait) -> None:
        self.sent_msgs = 0
        self.sent_bytes = 0
        self.recv_msgs = 0
        self.recv_bytes = 0
        self.turn_wait = turn_wait
        self.created = time.time()

    def sent(self, nbytes: int) -> None:
        self.sent_msgs += 1
        self.sent_bytes += nbytes

    def received(self, nbytes: int) -> None:
        self.recv_msgs += 1
        self.recv_bytes += nbytes


class _MessageCollector(Collector):
    """Builds the per-message families from :class:`ChannelMetrics` /
    :class:`TurnWait` when the registry is scraped."""

    def __init__(self, m: Metrics) -> None:
        self._m = m

    def collect(self) -> Iterator[Metric]:
        labels = ["device", "channel", "direction"]
        msgs = CounterMetricFamily("kupd_messages", "Messages moved", labels=labels)
        nbytes = CounterMetricFamily("kupd_bytes", "Payload bytes moved", labels=labels)
        # a snapshot: the event loop may add channels while the HTTP thread reads
        for (device, chan), cm in list(self._m._channels.items()):
            c = str(chan)
            out, inn = [device, c, "to_kernel"], [device, c, "from_kernel"]
            msgs.add_metric(out, cm.sent_msgs, created=cm.created)
            msgs.add_metric(inn, cm.recv_msgs, created=cm.created)
            nbytes.add_metric(out, cm.sent_bytes, created=cm.created)
            nbytes.add_metric(inn, cm.recv_bytes, created=cm.created)
        yield msgs
        yield nbytes
        calls = CounterMetricFamily("kupd_calls", "Calls finished", labels=["device", "code"])
        for (device, code), cc in list(self._m._calls.items()):
            calls.add_metric([device, code], cc.n, created=cc.created)
        yield calls
        hist = HistogramMetricFamily(
            "kupd_turn_wait_seconds",
            "Time waiting for the kernel to hand the turn back",
            labels=["device"],
        )
        for device, tw in list(self._m._turn_waits.items()):
            counts = list(tw.counts)
            cumulative: list[tuple[str, float]] = []
            acc = 0
            for bound, n in zip((*TURN_WAIT_BUCKETS, float("inf")), counts, strict=True):
                acc += n
                cumulative.append((floatToGoString(bound), acc))  # type: ignore[no-untyped-call]
            hist.add_metric([device], cumulative, tw.sum)
            hist.samples.append(
                Sample("kupd_turn_wait_seconds_created", {"device": device}, tw.created)
            )
        yield hist


class TenantCollector(Collector):
    """Per-tenant series, read from kupd's own bookkeeping when scraped
    (nothing is counted twice, and the hot path pays nothing):

    * ``kupd_tenant_leases{tenant, holder}``: open Sessions (``session``)
      and Attach leases (``lease``);
    * ``kupd_tenant_calls_in_flight{tenant}``;
    * ``kupd_tenant_denials_total{tenant, rule}``: PERMISSION_DENIED /
      RESOURCE_EXHAUSTED answers by the rule that refused (as the audit log);
    * ``kupd_tenant_paced_total{tenant}`` and
      ``kupd_tenant_paced_seconds_total{tenant}``: channel operations that
      waited for their turn under channel_ops_per_second (counted as their
      wait begins), and the seconds they waited (as each wait ends: one
      cancelled before its turn counts what it waited);
    * ``kupd_tenant_requests_paced_total{tenant}`` and
      ``kupd_tenant_requests_paced_seconds_total{tenant}``: the same for the
      requests paced under requests_per_second (ListDevices, Attach,
      Release, opening a Session or a Watch, health checks).
    """

    def __init__(
        self,
        holders: Callable[[], Iterable[tuple[str, str]]],
        in_flight: Callable[[], Mapping[str, int]],
        denials: Callable[[], Mapping[tuple[str, str], int]],
        paced: Callable[[], tuple[Mapping[str, int], Mapping[str, float]]] | None = None,
        requests_paced: Callable[[], tuple[Mapping[str, int], Mapping[str, float]]] | None = None,
    ) -> None:
        self._holders = holders
        self._in_flight = in_flight
        self._denials = denials
        self._paced = paced
        self._requests_paced = requests_paced

    def collect(self) -> Iterator[Metric]:
        leases = GaugeMetricFamily(
            "kupd_tenant_leases", "Open Sessions and leases per tenant", labels=["tenant", "holder"]
        )
        # every tenant (the in-flight map names them all), so that a tenant
        # with no lease reads 0 rather than a series that goes stale
        flights = dict(self._in_flight())
        counts: dict[tuple[str, str], int] = {
            (tenant, holder): 0 for tenant in flights for holder in ("lease", "session")
        }
        for key in self._holders():
            counts[key] = counts.get(key, 0) + 1
        for (tenant, holder), n in sorted(counts.items()):
            leases.add_metric([tenant, holder], n)
        yield leases
        calls = GaugeMetricFamily(
            "kupd_tenant_calls_in_flight", "Calls in flight per tenant", labels=["tenant"]
        )
        for tenant, n in sorted(flights.items()):
            calls.add_metric([tenant], n)
        yield calls
        denied = CounterMetricFamily(
            "kupd_tenant_denials",
            "Requests refused by the tenant policy, by rule",
            labels=["tenant", "rule"],
        )
        for (tenant, rule), n in sorted(dict(self._denials()).items()):
            denied.add_metric([tenant, rule], n)
        yield denied
        if self._paced is not None:
            yield from _paced_families(
                "kupd_tenant_paced", "Channel operations", "channel_ops_per_second", self._paced()
            )
        if self._requests_paced is not None:
            yield from _paced_families(
                "kupd_tenant_requests_paced", "Requests", "requests_per_second",
                self._requests_paced(),
            )


def _paced_families(
    name: str, what: str, rule: str, counted: tuple[Mapping[str, int], Mapping[str, float]]
) -> Iterator[Metric]:
    """The two per-tenant counters of a pace (``Guard.pace``'s ``rule``):
    ``what`` waited for its turn, and the seconds they waited."""
    counts_p, seconds_p = counted
    paced = CounterMetricFamily(
        name, f"{what} that waited for their turn under {rule}", labels=["tenant"]
    )
    waited = CounterMetricFamily(
        f"{name}_seconds", f"Seconds {what.lower()} waited under {rule}", labels=["tenant"]
    )
    for tenant, n in sorted(dict(counts_p).items()):
        paced.add_metric([tenant], n)
        waited.add_metric([tenant], dict(seconds_p).get(tenant, 0.0))
    yield paced
    yield waited



class _MetricsHandler(WSGIRequestHandler):
    #: a client that sends nothing for this long is dropped (a per-read
    #: socket timeout: one that trickles a byte at a time keeps its slot,
    #: which max_clients bounds)
    timeout = 5.0

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: a scrape is not worth a log line."""


class _MetricsServer(ThreadingMixIn, WSGIServer):
    """prometheus_client's threaded WSGI server, bounded: it spent a thread
    per connection, and any local user can connect (loopback only is not a
    tenant boundary): a security probe grew kupd from 31 to 482 threads with
    idle connections.  At most ``max_clients`` at once; one more is closed
    at once, and each may go _MetricsHandler.timeout without sending."""

    daemon_threads = True
    allow_reuse_address = True
    max_clients = 8

    def __init__(self, *args: Any, **kw: Any) -> None:
        self._slots = threading.BoundedSemaphore(self.max_clients)
        super().__init__(*args, **kw)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _MetricsServer6(_MetricsServer):
    address_family = socket.AF_INET6


#: what the Prometheus text format appends to a family's name in its
#: # HELP / # TYPE lines (prometheus_client's generate_latest)
_PRINTED_SUFFIX = {"counter": "_total", "info": "_info"}


class _Families:
    """A registry's families whose name starts with a prefix (what
    ``generate_latest`` needs: ``collect()``)."""

    def __init__(self, registry: CollectorRegistry, prefix: str) -> None:
        self._registry, self._prefix = registry, prefix

    def collect(self) -> Iterator[Metric]:
        p = self._prefix
        for family in self._registry.collect():
            # by the name the text shows too: a counter family "kupd_calls"
            # is printed as kupd_calls_total -- in its # HELP and # TYPE
            # lines as well, which are all it prints before its first sample
            shown = family.name + _PRINTED_SUFFIX.get(family.type, "")
            if shown.startswith(p) or any(s.name.startswith(p) for s in family.samples):
                yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._channels: dict[tuple[str, int], ChannelMetrics] = {}
        self._turn_waits: dict[str, TurnWait] = {}
        self._calls: dict[tuple[str, str], CallCount] = {}
        r.register(_MessageCollector(self))
        self.sessions = Gauge("kupd_sessions", "Open Session streams", ["device"], registry=r)
        self.leases = Gauge("kupd_leases", "Open Attach leases", ["device"], registry=r)
        self.sessions_unattached = Gauge(
            "kupd_sessions_unattached",
            "Session streams that have not sent their attach yet (they count against "
            "max_sessions)",
            registry=r,
        )
        self.calls_queued = Gauge(
            "kupd_calls_queued", "Calls waiting for a pool channel", ["device"], registry=r
        )
        self.connections = Gauge(
            "kupd_connections",
            "Connections open on each socket kupd serves (by its tenant: default for the "
            "plain socket, admin for the admin socket), as gRPC's channelz counts them "
            "every few seconds",
            ["tenant"],
            registry=r,
        )
        self.connections_max = Gauge(
            "kupd_connections_max",
            "Each socket's max_connections (sockets without one are not listed): at "
            "kupd_connections >= kupd_connections_max gRPC closes every further "
            "connection as it is accepted, which kupd cannot count",
            ["tenant"],
            registry=r,
        )
        self.errors = Counter(
            "kupd_errors",
            "RPC errors by gRPC code, per device and channel ('' where not known)",
            ["device", "channel", "code"],
            registry=r,
        )
        self._server: Any = None

    def serve(self, port: int, address: str = "127.0.0.1") -> int:
        """Start the HTTP endpoint (a thread, and one per client, at most
        _MetricsServer.max_clients); returns the bound port.  OSError naming
        the address when it cannot be bound."""
        try:
            server_class = _MetricsServer6 if ":" in address else _MetricsServer
            server = make_server(
                address,
                port,
                make_wsgi_app(self.registry),
                server_class,
                handler_class=_MetricsHandler,
            )
            threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
        except OSError as exc:
            err = OSError(
                f"cannot serve metrics on {address}:{port} (metrics_port): "
                f"{exc.strerror or exc}"
            )
            err.errno = exc.errno
            raise err from None
        self._server = server
        bound: int = server.server_port
        return bound

    def exposition(self, prefix: str = "") -> str:
        """The text the endpoint serves (Prometheus text format 0.0.4), of
        the families whose name, or a sample's (``kupd_calls_total``),
        starts with ``prefix``: what the admin
        socket's GetMetrics answers, for an operator who keeps the loopback
        endpoint (readable by every local user) off."""
        return generate_latest(_Families(self.registry, prefix)).decode()

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def turn_wait(self, device: str) -> TurnWait:
        tw = self._turn_waits.get(device)
        if tw is None:
            tw = self._turn_waits[device] = TurnWait()
        return tw

    def channel(self, device: str, channel: int) -> ChannelMetrics:
        """The (cached) counters of one channel; the label sets are bounded by
        the devices' channel counts, as the series themselves are."""
        key = (device, channel)
        cm = self._channels.get(key)
        if cm is None:
            cm = self._channels[key] = ChannelMetrics(self.turn_wait(device))
        return cm

    def call_count(self, device: str, code: str) -> CallCount:
        """The (cached) count of finished Calls of ``device`` with status
        ``code`` (bounded: devices x gRPC codes)."""
        key = (device, code)
        cc = self._calls.get(key)
        if cc is None:
            cc = self._calls[key] = CallCount()
        return cc

    def sent(self, device: str, channel: int, nbytes: int) -> None:
        self.channel(device, channel).sent(nbytes)

    def received(self, device: str, channel: int, nbytes: int) -> None:
        self.channel(device, channel).received(nbytes)
