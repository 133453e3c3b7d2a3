"""Tenants and their policy: who may use which devices and channels, with
which operations, under which limits.

A tenant is identified by the unix socket its requests arrive on (see
``kupd.tenants``); this module only knows names.  Configuration (TOML)::

    [[tenant]]
    name = "alice"
    socket = "/run/kupd/t/alice.sock"
    owner = "alice"            # user name or uid of the socket (default: kupd's)
    group = "alice"            # group name or gid (default: kupd's)
    mode = "0600"              # socket permission bits (default 0600)
    ops = ["session", "lease", "call", "watch"]   # default: all four
    max_sessions = 16          # sessions + Attach leases open at once (0: no limit)
    max_calls_in_flight = 64   # Calls running or queued at once (0: no limit)
    max_pool_channels = 3      # a device's Call pool channels its Calls hold at once (0: no limit)
    max_message_bytes = 4096   # largest send / Call payload (0: the channel's limit)
    calls_per_second = 100.0   # token bucket (> 0; 0: no limit), burst = one second's
                               # worth, at least 1 call; a refusal says when the
                               # next token is due (retry_after_ms)
    channel_ops_per_second = 1000.0   # send / exchange / receive / pass on its Sessions
                               # and leases: paced beyond it, burst = one second's worth;
                               # a refusal (a wait too long) says when to retry
    requests_per_second = 200.0   # ListDevices, Attach, opening a Session or
                               # a Watch, health checks: the RPCs no rate above covers,
                               # all together; paced beyond it as channel_ops_per_second,
                               # burst = one second's worth (default 200; 0: no limit)
    max_connections = 8        # connections at once on its socket (0: no limit)

    [[tenant.grant]]
    device = "echo"
    channels = "0-15,32"       # default: every channel

Every denial raises :class:`kupd.errors.PermissionDenied` or
:class:`kupd.errors.ResourceExhausted` with a message naming the tenant and
the rule (``ops``, ``grant``, ``channels``, ``max_sessions``, ...), and
writes one audit line (``kupd.audit``).  One rule is answered otherwise:
``lease-owner`` (another tenant's lease id) is the NotFound of a lease id
that names nothing, so that the answer does not tell the id is live; only
its audit line says what it was.

Without any ``[[tenant]]`` kupd serves one socket as the tenant
``default`` with everything allowed (the behaviour before tenants).
"""

from __future__ import annotations

import asyncio
import contextvars
import grp
import math
import pwd
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from kupd import errors
from kupd.abi import KUP_MAX_CHANNELS
from kupd.calls import TENANT_GROUP
from kupd.devices import SHOWN_MAX, DeviceManager, ManagedDevice, device_arg, shown
from kupd.retirement import fresh_error, waiting_on

if TYPE_CHECKING:
    from kupd.sessions import Lease

__all__ = [
    "ADMIN",
    "AUDIT_DENIALS_BURST",
    "AUDIT_DENIALS_PER_SECOND",
    "DEFAULT",
    "OPS",
    "PACE_LIMIT",
    "REQUESTS_PER_SECOND",
    "TENANT_KEYS",
    "Budget",
    "Grant",
    "Guard",
    "Policy",
    "Tenant",
    "check_socket",
    "current_tenant",
    "parse_channels",
    "parse_tenants",
    "raise_if_ended",
    "refuse_retired",
    "retry_after_ms",
    "sendable",
    "shown_ms",
    "socket_moved",
    "socket_removed",
    "socket_retired",
    "tenant_key",
    "use_tenant",
]

#: The names of kupd's own tenants (the admin socket's; the plain socket's
#: without [[tenant]] tables): no [[tenant]] may take them.
ADMIN_NAME = "admin"
DEFAULT_NAME = "default"

#: The operations a tenant may be allowed.
OPS = ("session", "lease", "call", "watch")


def _config_error(key: str, problem: str) -> Exception:
    from kupd.config import ConfigError  # config imports this module lazily

    return ConfigError(key, problem)


@dataclass(frozen=True)
class Grant:
    device: str
    #: None: every channel; else the granted channel ids.
    channels: frozenset[int] | None = None
    #: The text of the rule, for messages ("0-15,32" or "all").
    text: str = "all"

    def allows(self, chan: int) -> bool:
        return self.channels is None or chan in self.channels


#: A tenant's requests_per_second unless its [[tenant]] table sets one: no
#: legitimate client notices it -- its burst (one second's worth) lets a
#: client starting up attach 64 channels, list the devices and open its
#: watches at once, with room to spare, and a client that keeps 200 such
#: RPCs a second going is one re-attaching in a loop, not using its
#: channels -- while a tenant flooding kupd with them gets no more than
#: that share of its one event loop, whatever its connections allow.
REQUESTS_PER_SECOND = 200.0


@dataclass(frozen=True)
class Tenant:
    name: str
    socket: str = ""
    owner: int | None = None
    group: int | None = None
    mode: int = 0o600
    ops: frozenset[str] = frozenset(OPS)
    #: None: every device, every channel.
    grants: tuple[Grant, ...] | None = None
    max_sessions: int = 0
    max_calls_in_flight: int = 0
    #: a device's Call pool channels its Calls hold at once, busy or
    #: quarantined after a timeout (0: no limit); beyond it they wait
    max_pool_channels: int = 0
    max_message_bytes: int = 0
    calls_per_second: float = 0.0
    #: send / exchange / receive / pass operations on the tenant's Sessions
    #: and leases per second, all together (0: no limit); see Guard.pace
    channel_ops_per_second: float = 0.0
    #: the tenant's other RPCs per second, all together (0: no limit):
    #: ListDevices, Attach, Release, opening a Session or a Watch, the
    #: health service's Check and Watch -- paced as channel operations are
    #: (Guard.request_turn).  kupd's own tenants (admin, the plain socket's
    #: default) are not paced: the operator's, and one no other shares kupd with
    requests_per_second: float = REQUESTS_PER_SECOND
    #: connections at once on the tenant's socket (0: no limit): a gRPC
    #: option of its server, so a reload changes it only with the socket
    max_connections: int = 0
    admin: bool = False

    @property
    def plain(self) -> bool:
        """The tenant of the plain socket (no [[tenant]] tables): "default",
        a name no [[tenant]] may take."""
        return self.name == DEFAULT_NAME and not self.admin

    def grant(self, device: str) -> Grant | None:
        if self.grants is None:
            return Grant(device)
        for g in self.grants:
            if g.device == device:
                return g
        return None

    def may_see(self, device: str, chan: int | None = None) -> bool:
        g = self.grant(device)
        return g is not None and (chan is None or g.allows(chan))


#: A tenant's Call pool group: the GROUP of Guard.fair_key's keys.
_GROUP = TENANT_GROUP

#: The tenant of a kupd without [[tenant]] tables: everything allowed
#: (plain_tenant: with the top-level max_message_bytes, when set).
DEFAULT = Tenant(DEFAULT_NAME, requests_per_second=0.0)
#: The tenant of the admin socket: everything allowed, plus the Admin service.
ADMIN = Tenant(ADMIN_NAME, admin=True, requests_per_second=0.0)

_CURRENT: contextvars.ContextVar[Tenant] = contextvars.ContextVar("kupd_tenant", default=DEFAULT)


def current_tenant() -> Tenant:
    """The tenant of the request being served (set per socket by kupd.tenants)."""
    return _CURRENT.get()


_RETIRED: contextvars.ContextVar[asyncio.Future[None] | None] = contextvars.ContextVar(
    "kupd_socket_retired", default=None
)


def use_tenant(
    t: Tenant, retired: asyncio.Future[None] | None = None
) -> contextvars.Token[Tenant]:
    """Serve the current request as ``t``, which came in on the socket
    whose server's retirement is ``retired`` (see :func:`socket_retired`)."""
    _RETIRED.set(retired)
    return _CURRENT.set(t)


def socket_retired() -> asyncio.Future[None] | None:
    """The retirement of the socket the request being served came in on
    (set per socket by kupd.tenants): a future that fails with
    :class:`kupd.errors.Unavailable` -- :func:`socket_moved` or
    :func:`socket_removed` -- when a reload moves or removes that socket.
    Whatever such a request waits for (a message, a pool channel, its
    lease's turn, the next event) ends then, with that error.  None: not
    served through a tenant socket (the service alone, in tests)."""
    return _RETIRED.get()


def refuse_retired() -> None:
    """Refuse the request being served if a reload has retired (moved or
    removed) the socket it came in on: a fresh copy of the retirement's
    Unavailable -- what the RPCs that waited there when it fired got.  The
    retired socket's server stays up until what it was serving has ended
    (kupd.tenants.SocketSet._retire), and its clients' open connections
    reach it meanwhile: no RPC may start there with the tenant the socket
    served.  Called where an RPC resolves its caller (:meth:`Guard.caller`,
    the health service), not mid-stream: a stream's own waits end with the
    retirement, after what came before it (a Watch's events)."""
    r = _RETIRED.get()
    if r is not None and r.done():
        exc = None if r.cancelled() else r.exception()
        if isinstance(exc, errors.KupError):
            raise type(exc)(exc.message)


def socket_moved(tenant: str, old: str, new: str) -> errors.Unavailable:
    """What a request gets on ``tenant``'s socket ``old`` once a reload
    moved it to ``new``."""
    return errors.Unavailable(
        f"tenant {tenant}: a reload moved its socket from {old} to {new}: connect there"
    )


def check_socket(t: Tenant, via: str) -> None:
    """Unavailable when a reload moved the tenant's socket away from
    ``via``, the one this request came in on: the old socket's server is
    on its way out, and a Session it served would be cut with it."""
    if via and t.socket and via != t.socket:
        raise socket_moved(t.name, via, t.socket)


def raise_if_ended(
    lease: Lease | None,
    drain: asyncio.Future[None],
    retired: asyncio.Future[None] | None = None,
) -> None:
    """Raise what ends an operation before it starts: (a fresh copy of) the
    error ``lease`` ended with, Shutdown once kupd drains (``drain``), or
    the retirement of the request's socket (``retired``)."""
    if lease is not None and lease.ended.done():
        exc = lease.ended.exception()
        if isinstance(exc, errors.KupError):
            raise type(exc)(exc.message)
    if drain.done():
        raise errors.Shutdown("kupd is shutting down")
    if retired is not None and retired.done():
        raise fresh_error(retired)


def socket_removed(tenant: str, path: str, now: str = "") -> errors.Unavailable:
    """What a request gets on ``tenant``'s socket ``path`` once a reload
    removed it (``now``: the tenant the path serves since, if any)."""
    since = f"; the path now serves tenant {now}" if now else ""
    return errors.Unavailable(f"tenant {tenant}: a reload removed its socket {path}{since}")


# ---------------------------------------------------------------- parsing


def parse_channels(text: Any, key: str) -> tuple[frozenset[int], str]:
    """``"0-15,32"`` -> ({0..15, 32}, text).  Also accepts a list of ints."""
    if isinstance(text, list):
        if not all(isinstance(c, int) and not isinstance(c, bool) for c in text):
            raise _config_error(key, f"must be a list of channel ids, not {text!r}")
        text = ",".join(str(c) for c in text)
    if not isinstance(text, str) or not text.strip():
        raise _config_error(key, f"must be a range string like '0-15,32', not {text!r}")
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        lo_s, dash, hi_s = part.partition("-")
        try:
            lo = int(lo_s)
            hi = int(hi_s) if dash else lo
        except ValueError:
            raise _config_error(key, f"bad channel range {part!r} in {text!r}") from None
        if not 0 <= lo <= hi < KUP_MAX_CHANNELS:
            raise _config_error(
                key, f"channel range {part!r} must be within 0-{KUP_MAX_CHANNELS - 1}, low <= high"
            )
        out.update(range(lo, hi + 1))
    return frozenset(out), text


def _uid(value: Any, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise _config_error(key, f"must be a user name or uid >= 0, not {value}")
        return value
    if isinstance(value, str) and value:
        try:
            return pwd.getpwnam(value).pw_uid
        except KeyError:
            raise _config_error(key, f"no such user {value!r}") from None
    raise _config_error(key, f"must be a user name or uid, not {value!r}")


def _gid(value: Any, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise _config_error(key, f"must be a group name or gid >= 0, not {value}")
        return value
    if isinstance(value, str) and value:
        try:
            return grp.getgrnam(value).gr_gid
        except KeyError:
            raise _config_error(key, f"no such group {value!r}") from None
    raise _config_error(key, f"must be a group name or gid, not {value!r}")


#: The keys of a [[tenant]] table.
TENANT_KEYS = frozenset({
    "name",
    "socket",
    "owner",
    "group",
    "mode",
    "ops",
    "grant",
    "max_sessions",
    "max_calls_in_flight",
    "max_pool_channels",
    "max_message_bytes",
    "calls_per_second",
    "channel_ops_per_second",
    "requests_per_second",
    "max_connections",
})


def _good_name(name: Any) -> bool:
    """A tenant name kupd takes: [A-Za-z0-9_-]+, not a reserved one."""
    return (
        isinstance(name, str)
        and bool(name)
        and name.replace("-", "").replace("_", "").isalnum()
        and name not in (ADMIN_NAME, DEFAULT_NAME)
    )


def tenant_key(i: int, name: Any = None) -> str:
    """How a config error names the ``i``-th [[tenant]] table: by its name
    when it has a good one (``tenant[name=alice]``: an operator looks for
    the name, and an index shifts as tables are added), else by its index
    (``tenant[3]``: a missing or bad name, or the name is the problem)."""
    return f"tenant[name={name}]" if _good_name(name) else f"tenant[{i}]"


def _int(raw: dict[str, Any], k: str, prefix: str) -> int:
    v = raw.get(k, 0)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise _config_error(prefix + k, f"must be an integer >= 0, not {v!r}")
    return v


#: The lowest channel_ops_per_second or requests_per_second (but 0, no limit): one operation in
#: about 17 minutes.  Guard.pace divides by the rate, and a tiny one (1e-310)
#: made 1/rate infinite and every wait NaN -- no pacing at all.
MIN_RATE = 0.001


def _rate(
    raw: dict[str, Any], k: str, prefix: str, least: float = 0.0, default: float = 0.0
) -> float:
    v = raw.get(k, default)
    if (
        isinstance(v, bool)
        or not isinstance(v, int | float)
        or not math.isfinite(v)  # nan and inf both read as "no limit"
        or v < 0
    ):
        raise _config_error(prefix + k, f"must be a finite number >= 0, not {v!r}")
    if 0 < v < least:
        raise _config_error(prefix + k, f"must be 0 (no limit) or at least {least:g}, not {v!r}")
    return float(v)


def _tenant(raw: Any, i: int, devices: Iterable[str]) -> Tenant:
    if not isinstance(raw, dict):
        raise _config_error(f"tenant[{i}]", "must be a table ([[tenant]])")
    name = raw.get("name")
    prefix = tenant_key(i, name) + "."
    unknown = set(raw) - TENANT_KEYS
    if unknown:
        known = ", ".join(sorted(TENANT_KEYS))
        raise _config_error(prefix + sorted(unknown)[0], f"unknown key (known: {known})")
    if not _good_name(name):  # the name is the problem: named by index
        if name in (ADMIN_NAME, DEFAULT_NAME):
            raise _config_error(f"tenant[{i}].name", f"{name!r} is reserved")
        raise _config_error(
            f"tenant[{i}].name", f"must be a name of [A-Za-z0-9_-], not {name!r}"
        )
    assert isinstance(name, str)
    sock = raw.get("socket")
    if sock is None:
        # identity is the socket: a tenant has one of its own, never a default
        raise _config_error(prefix + "socket", "is required: the absolute path of its socket")
    if not isinstance(sock, str) or not sock.startswith("/"):
        raise _config_error(prefix + "socket", f"must be an absolute path, not {sock!r}")
    owner = _uid(raw["owner"], prefix + "owner") if "owner" in raw else None
    group = _gid(raw["group"], prefix + "group") if "group" in raw else None
    mode_text = raw.get("mode", "0600")
    try:
        mode = int(mode_text, 8) if isinstance(mode_text, str) else -1
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777 or mode & 0o600 != 0o600 or mode & 0o007:
        raise _config_error(
            prefix + "mode",
            f"must be an octal string within 0770 including 0600 (no access for others), "
            f"not {mode_text!r}",
        )
    ops_raw = raw.get("ops", list(OPS))
    if not isinstance(ops_raw, list) or not all(isinstance(o, str) for o in ops_raw):
        raise _config_error(prefix + "ops", f"must be a list of strings, not {ops_raw!r}")
    bad = [o for o in ops_raw if o not in OPS]
    if bad:
        raise _config_error(
            prefix + "ops", f"unknown operation {bad[0]!r} (known: {', '.join(OPS)})"
        )
    grants: list[Grant] = []
    grants_raw = raw.get("grant", [])
    if not isinstance(grants_raw, list):
        raise _config_error(prefix + "grant", "must be an array of tables ([[tenant.grant]])")
    known_devices = set(devices)
    for j, g in enumerate(grants_raw):
        gp = f"{prefix}grant[{j}]."
        if not isinstance(g, dict):
            raise _config_error(f"{prefix}grant[{j}]", "must be a table")
        unknown = set(g) - {"device", "channels"}
        if unknown:
            raise _config_error(gp + sorted(unknown)[0], "unknown key (known: channels, device)")
        dev = g.get("device")
        if not isinstance(dev, str) or not dev:
            raise _config_error(gp + "device", f"must be a device name, not {dev!r}")
        if known_devices and dev not in known_devices:
            raise _config_error(gp + "device", f"no [[device]] named {dev!r}")
        if any(x.device == dev for x in grants):
            raise _config_error(gp + "device", f"device {dev!r} granted twice")
        if "channels" in g:
            chans, text = parse_channels(g["channels"], gp + "channels")
            grants.append(Grant(dev, chans, text))
        else:
            grants.append(Grant(dev))
    return Tenant(
        name=name,
        socket=sock,
        owner=owner,
        group=group,
        mode=mode,
        ops=frozenset(ops_raw),
        grants=tuple(grants),
        max_sessions=_int(raw, "max_sessions", prefix),
        max_calls_in_flight=_int(raw, "max_calls_in_flight", prefix),
        max_pool_channels=_int(raw, "max_pool_channels", prefix),
        max_message_bytes=message_bytes(raw, prefix),
        calls_per_second=_rate(raw, "calls_per_second", prefix),
        channel_ops_per_second=_rate(raw, "channel_ops_per_second", prefix, MIN_RATE),
        requests_per_second=_rate(
            raw, "requests_per_second", prefix, MIN_RATE, REQUESTS_PER_SECOND
        ),
        max_connections=_connections(raw, prefix),
    )


def message_bytes(raw: dict[str, Any], prefix: str = "") -> int:
    """``max_message_bytes`` of a [[tenant]] table (``prefix``: its key) or
    of the top level (the plain socket's): one rule, one message."""
    return _int(raw, "max_message_bytes", prefix)


def plain_tenant(config: Any) -> Tenant:
    """The plain socket's tenant "default" under ``config`` (a kupd.config.
    Config): everything allowed, and the top-level max_message_bytes."""
    if not config.max_message_bytes:
        return DEFAULT
    return replace(DEFAULT, max_message_bytes=config.max_message_bytes)


def _connections(raw: dict[str, Any], prefix: str) -> int:
    from kupd.config import MAX_CONNECTIONS_MAX

    n = _int(raw, "max_connections", prefix)
    if n > MAX_CONNECTIONS_MAX:
        raise _config_error(
            prefix + "max_connections",
            f"must be 0..{MAX_CONNECTIONS_MAX} (0: no limit), not {n}",
        )
    return n


def parse_tenants(raw: Any, devices: Iterable[str]) -> tuple[Tenant, ...]:
    """Validate the ``[[tenant]]`` array; every error names its key."""
    if not isinstance(raw, list):
        raise _config_error("tenant", "must be an array of tables ([[tenant]])")
    devs = list(devices)
    # Duplicate names first: every later error names its tenant by name,
    # which must then be one tenant's.  The name is the problem: by index.
    names = [t.get("name") if isinstance(t, dict) else None for t in raw]
    for i, name in enumerate(names):
        if _good_name(name) and name in names[:i]:
            raise _config_error(
                f"tenant[{i}].name", f"duplicate tenant {name!r} (also tenant[{names.index(name)}])"
            )
    out = tuple(_tenant(t, i, devs) for i, t in enumerate(raw))
    for i, t in enumerate(out):
        for prev in out[:i]:
            if prev.socket == t.socket:
                raise _config_error(
                    tenant_key(i, t.name) + ".socket",
                    f"socket {t.socket} already used by tenant {prev.name!r}",
                )
    return out


# ---------------------------------------------------------------- the running policy


@dataclass(frozen=True)
class Policy:
    """An immutable snapshot: swapped as a whole on reload."""

    tenants: tuple[Tenant, ...] = ()
    #: the plain socket's tenant when there are no tenants (plain_tenant)
    default: Tenant = DEFAULT

    @property
    def multi(self) -> bool:
        return bool(self.tenants)

    def tenant(self, name: str) -> Tenant | None:
        if name == ADMIN.name:
            return ADMIN
        if not self.tenants and name == DEFAULT.name:
            return self.default
        for t in self.tenants:
            if t.name == name:
                return t
        return None


#: The rules Guard.pace paces by: the Tenant fields of their rates.
CHANNEL_OPS = "channel_ops_per_second"
REQUESTS = "requests_per_second"

#: The longest a channel operation (a request) waits for its turn under its
#: tenant's channel_ops_per_second (requests_per_second; Guard.pace);
#: beyond it, it is refused.
PACE_LIMIT = 5.0

#: Denial lines one tenant gets in the audit log (and kupd's log): this
#: many per second, after a burst of AUDIT_DENIALS_BURST.
AUDIT_DENIALS_PER_SECOND = 10.0
AUDIT_DENIALS_BURST = 100.0


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class Budget:
    """Lines a key (a tenant) may have written: ``burst`` at once, then
    ``rate`` per second.  take() is the number of lines left out since the
    key's last one (0 or more) when one may be written, else None (counted
    as left out).  For records a client can cause at no cost to itself --
    denials, failed requests -- which would otherwise fill a disk."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, _Bucket] = {}
        self._left_out: dict[str, int] = {}

    def take(self, key: str) -> int | None:
        now = time.monotonic()
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = _Bucket(self.burst, now)
        b.tokens = min(self.burst, b.tokens + (now - b.stamp) * self.rate)
        b.stamp = now
        if b.tokens < 1.0:
            self._left_out[key] = self._left_out.get(key, 0) + 1
            return None
        b.tokens -= 1.0
        return self._left_out.pop(key, 0)


@dataclass
class Guard:
    """Checks requests against the running policy, counts per-tenant usage,
    and writes an audit line for every denial."""

    policy: Policy = field(default_factory=Policy)
    audit: Any = None  # kupd.audit.AuditLog (None: no audit file, log only)
    in_flight: dict[str, int] = field(default_factory=dict)
    #: Of in_flight, the slots of Calls that ended but left their pool
    #: channel quarantined: kept until the channel settles (kupd.calls).
    kept: dict[str, int] = field(default_factory=dict)
    #: Attaches admitted but not finished yet, per tenant (max_sessions
    #: counts them: concurrent attaches cannot overshoot the limit).
    pending: dict[str, int] = field(default_factory=dict)
    #: Devices drained by the admin: no new sessions, leases or Calls.
    drained: set[str] = field(default_factory=set)
    #: lease id -> tenant, for scoping lease ids in ListDevices / Watch
    #: (kept for released leases too, bounded).
    lease_owner: dict[str, str] = field(default_factory=dict)
    _buckets: dict[str, _Bucket] = field(default_factory=dict)
    #: per (rate, tenant): when its next channel operation (request) is due
    #: at the sustained rate (channel_ops_per_second, requests_per_second;
    #: see pace), and that rate
    _due: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)
    #: per tenant: channel operations paced, and the seconds they waited
    #: (metrics: kupd_tenant_paced_total, kupd_tenant_paced_seconds_total)
    paced: dict[str, int] = field(default_factory=dict)
    paced_seconds: dict[str, float] = field(default_factory=dict)
    #: the same for requests paced under requests_per_second (metrics:
    #: kupd_tenant_requests_paced_total, ..._seconds_total)
    requests_paced: dict[str, int] = field(default_factory=dict)
    requests_paced_seconds: dict[str, float] = field(default_factory=dict)
    #: (tenant, rule) -> denials so far (metrics: kupd_tenant_denials_total)
    denials: dict[tuple[str, str], int] = field(default_factory=dict)
    #: per tenant: its budget of denial lines (AUDIT_DENIALS_*)
    _audit_budget: Budget = field(
        default_factory=lambda: Budget(AUDIT_DENIALS_PER_SECOND, AUDIT_DENIALS_BURST)
    )

    # -- current view ---------------------------------------------------------
    def caller(self) -> Tenant:
        """The caller's tenant as its RPC starts (every RPC of kupd.service
        resolves it here first): refused with its socket's retirement if a
        reload moved or removed that socket (:func:`refuse_retired`), then
        :meth:`tenant`."""
        refuse_retired()
        return self.tenant()

    def tenant(self) -> Tenant:
        """The caller's tenant under the CURRENT policy (a reload may have
        changed or removed it: a removed tenant is denied everything)."""
        t = current_tenant()
        if t.admin:
            return t
        if t.plain and not self.policy.multi:
            # the running one: a reload's max_message_bytes applies at once
            return self.policy.default
        now = self.policy.tenant(t.name)
        if now is None:
            self.deny(t, "any", "", None, "tenant", "tenant removed by a reload")
        return now  # type: ignore[return-value]

    # -- denials ---------------------------------------------------------------
    def _record(self, t: Tenant, op: str, device: str, chan: int | None, rule: str) -> None:
        self.record(t.name, op, device, chan, rule)

    def record(
        self, tenant: str, op: str, device: str, chan: int | None, rule: str, **extra: str
    ) -> None:
        """One audit line (and one count) for a denial; ``extra``: more
        fields of the line, for the operator only (lease-owner: the lease and
        its owner).  The device is a client's string: at most SHOWN_MAX
        characters of it are recorded."""
        key = (tenant, rule)
        self.denials[key] = self.denials.get(key, 0) + 1
        if self.audit is None:
            return
        # A line per denial, up to a budget per tenant: denials cost a tenant
        # nothing, and each wrote two lines (audit file and log) -- a disk
        # filler.  Past the budget they are counted (metrics count them all)
        # and the next line says how many were left out.
        unrecorded = self._audit_budget.take(tenant)
        if unrecorded is None:
            return
        if len(device) > SHOWN_MAX:
            device = f"{device[:SHOWN_MAX]}... ({len(device.encode())} bytes)"
        self.audit.denial(tenant, op, device, chan, rule, unrecorded=unrecorded, **extra)

    def deny(self, t: Tenant, op: str, device: str, chan: int | None, rule: str, why: str) -> None:
        self._record(t, op, device, chan, rule)
        raise errors.PermissionDenied(f"tenant {t.name}: rule {rule}: {why}")

    def exhaust(
        self,
        t: Tenant,
        op: str,
        device: str,
        chan: int | None,
        rule: str,
        why: str,
        retry_after_ms: int | None = None,
    ) -> None:
        self._record(t, op, device, chan, rule)
        raise errors.ResourceExhausted(
            f"tenant {t.name}: rule {rule}: {why}", retry_after_ms=retry_after_ms
        )

    # -- checks ------------------------------------------------------------------
    def check_op(self, t: Tenant, op: str, device: str = "", chan: int | None = None) -> None:
        if op not in t.ops:
            self.deny(t, op, device, chan, "ops", f"operation {op!r} is not allowed")
        if device and t.grant(device) is None:
            self.deny(t, op, device, chan, "grant", f"device {shown(device)} is not granted")
        if device and chan is not None:
            g = t.grant(device)
            assert g is not None
            if not g.allows(chan):
                self.deny(
                    t,
                    op,
                    device,
                    chan,
                    "channels",
                    f"channel {chan} of device {device!r} is outside the granted channels {g.text}",
                )

    def channels_for(self, t: Tenant, device: str) -> frozenset[int] | None:
        g = t.grant(device)
        return None if g is None else g.channels

    def check_sessions(self, t: Tenant, op: str, device: str, open_now: int) -> None:
        if t.max_sessions and open_now >= t.max_sessions:
            self.exhaust(
                t,
                op,
                device,
                None,
                "max_sessions",
                f"{open_now} sessions and leases open (limit max_sessions={t.max_sessions})",
            )

    def check_size(self, t: Tenant, op: str, device: str, chan: int | None, n: int) -> None:
        """A message over the tenant's max_message_bytes is TooBig, as one
        over the channel's size is: the lease and ListDevices announce the
        lower of the two as the one limit, so a client handles one error
        for it (not RESOURCE_EXHAUSTED, which says "later", while this
        message never fits).  Audited like any other denial."""
        if t.max_message_bytes and n > t.max_message_bytes:
            self._record(t, op, device, chan, "max_message_bytes")
            raise errors.TooBig(
                f"tenant {t.name}: rule max_message_bytes: message of {n} bytes exceeds "
                f"max_message_bytes={t.max_message_bytes}"
            )

    def pace(
        self,
        t: Tenant,
        op: str,
        device: str,
        chan: int | None,
        limit: float | None = None,
        rule: str = CHANNEL_OPS,
    ) -> float:
        """Seconds the tenant's next channel operation waits under its
        channel_ops_per_second (0.0 at once), its place taken now; with
        ``rule`` REQUESTS, its next request under its requests_per_second
        (each rate its own slots, its own counts).

        Why pace and not refuse, as calls_per_second does: a Session is one
        stream whose operations run in order, so a refusal would break a
        conversation in the middle, while a wait is the flow control a
        stream already has (its client's sends queue behind it).  Why at
        all: kupd serves every tenant from one event loop, and one tenant's
        busy Sessions otherwise take the time of every other's Calls.

        A generic cell rate: a burst of one second's worth (at least one),
        then one operation per 1/rate s, in the order they asked; each
        waiter holds its slot, so many Sessions share the rate fairly.
        Waiting longer than ``limit`` (the RPC's deadline) or PACE_LIMIT is
        RESOURCE_EXHAUSTED (rule channel_ops_per_second), which takes no
        slot: a client with a deadline learns at once it would miss it --
        and when the same operation, asked again with the same time to
        wait, would have its turn within it (``retry_after_ms``: the wait
        less what it may wait, rounded up as calls_per_second's).

        A wait of more than 0 is counted as paced here; its seconds are
        counted by :meth:`turn_over`, which every such wait must end with
        (and which gives the slot back if the operation does not run)."""
        rate: float = getattr(t, rule)
        key = (rule, t.name)
        what = "operation" if rule == CHANNEL_OPS else "request"
        now = time.monotonic()
        interval = 1.0 / rate
        due, was = self._due.get(key, (now, rate))
        if was != rate and due > now:
            # a reload changed the rate: the tokens the tenant has left
            # (below 0: the slots of its operations waiting) are kept, at
            # most the new burst -- a raise applies at once, not once the
            # old rate's slots have run out, and a cut does not turn a
            # burst spent at the old rate into minutes of waiting
            burst = max(1.0, rate)
            left = min(max(1.0, was) - (due - now) * was, burst)
            due = now + (burst - left) / rate
        due = max(due, now)
        wait = due - now - (max(1.0, rate) - 1.0) * interval
        if wait <= 0.0:
            self._due[key] = (due + interval, rate)
            return 0.0
        cap = PACE_LIMIT if limit is None else min(limit, PACE_LIMIT)
        if wait > cap:
            # no sooner than this would the same operation's turn come
            # within what it may wait (a non-blocking one: its whole wait)
            ms = retry_after_ms(wait - cap)
            self.exhaust(
                t,
                op,
                device,
                chan,
                rule,
                f"more than {rule}={rate:g}: this {what} would wait {wait:.3g} s for "
                "its turn, "
                + (
                    "and a non-blocking one does not wait"
                    if cap <= 0.0 and rule == CHANNEL_OPS
                    else f"more than its deadline or timeout allows ({max(cap, 0.0):.3g} s)"
                    if cap < PACE_LIMIT
                    else f"more than kupd's limit of {PACE_LIMIT:g} s"
                )
                + f"; retry in {shown_ms(ms)} at the earliest (no promise: another "
                f"{what} of the tenant's may take that turn)",
                retry_after_ms=ms,
            )
        self._due[key] = (due + interval, rate)
        counts = self.paced if rule == CHANNEL_OPS else self.requests_paced
        counts[t.name] = counts.get(t.name, 0) + 1
        return wait

    def turn_over(self, t: Tenant, waited: float, used: bool, rule: str = CHANNEL_OPS) -> None:
        """The wait of an operation :meth:`pace` made wait is over, after
        ``waited`` seconds (counted in paced_seconds: what was waited, not
        what was due); ``used``: the operation runs now.

        One that does not run (its RPC cancelled, its Session stream or its
        lease ended, its socket retired) gives its slot back: the tenant's
        next slot, the one the next operation to ask takes, comes one
        interval earlier -- as if it had never asked.  Operations waiting
        already keep the slots they hold, in their order: the one that asks
        next may then be due with the last of them, never sooner, so the
        tenant never runs more operations by any moment than it would have
        had the unused one never asked (a slot of the rate the tenant's
        slots are at now: a reload may have changed it meanwhile)."""
        seconds = self.paced_seconds if rule == CHANNEL_OPS else self.requests_paced_seconds
        seconds[t.name] = seconds.get(t.name, 0.0) + waited
        key = (rule, t.name)
        if not used and key in self._due:
            due, rate = self._due[key]
            self._due[key] = (due - 1.0 / rate, rate)

    async def request_turn(
        self, op: str, limit: float | None, drain: asyncio.Future[None], device: str = ""
    ) -> None:
        """Wait for the turn of the request being served (an RPC of ``op``,
        on ``device`` if it names one) under its tenant's requests_per_second:
        the hook every RPC no other rate covers starts with (ListDevices,
        Attach, opening a Session or a Watch, the health service's; not
        Release, which gives back).

        Why pace and not refuse: refusing a request costs kupd about what
        serving it does, while one that waits for its turn costs nothing
        meanwhile, and how many a tenant can have waiting is bounded by its
        connections and their streams.  :meth:`pace` with the rule
        requests_per_second: a burst of one second's worth, then one per
        1/rate s; one that would wait longer than ``limit`` (the RPC's
        deadline) or PACE_LIMIT is refused at once, RESOURCE_EXHAUSTED with
        retry_after_ms.  The wait ends early, the request not served, when
        kupd drains (``drain``) or a reload retires the request's socket;
        then, or when the RPC is cancelled, its slot is given back
        (:meth:`turn_over`).  While kupd drains nothing is paced: the
        request's own handler answers it (an attach: kupd shutting down), where
        the pace would refuse it with a retry hint for a kupd about to be
        gone, audited as the tenant's flood; a drain lasts drain_grace."""
        t = self.caller()
        if not t.requests_per_second or drain.done():
            return
        wait = self.pace(t, op, device, None, limit, REQUESTS)
        if wait <= 0.0:
            return
        retired = socket_retired()
        ends = [drain] if retired is None else [drain, retired]
        start = time.monotonic()
        used = False
        try:
            with waiting_on(retired, op):
                await asyncio.wait(ends, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            if drain.done():
                raise errors.Shutdown("kupd is shutting down")
            refuse_retired()
            used = True
        finally:
            self.turn_over(t, min(time.monotonic() - start, wait), used, REQUESTS)

    async def take_turn(
        self,
        t: Tenant,
        holder: str,
        lease: Lease,
        drain: asyncio.Future[None],
        limit: float | None,
        kind: str,
        retired: asyncio.Future[None] | None = None,
        nonblocking: bool = False,
    ) -> float:
        """Wait for the operation's turn under the tenant's
        channel_ops_per_second (:meth:`pace`: refused past ``limit``, the
        RPC's deadline or the operation's own timeout; a ``nonblocking``
        one is refused rather than made to wait); the seconds waited.

        The wait is a wait like any other of the RPC's: the lease ending,
        the socket ``retired`` by a reload (counted in its reply as ``kind``)
        or kupd draining (``drain``) ends it with that error, the operation
        not done.  A lease that has ended already takes no slot, and a wait
        that ends so, or is cancelled (its RPC or Session stream), gives its
        slot back (:meth:`turn_over`): the tenant's next operation is not
        made to wait for a turn nobody used."""
        raise_if_ended(lease, drain, retired)
        wait = self.pace(t, holder, lease.dev.name, lease.ch.id, 0.0 if nonblocking else limit)
        if wait > 0.0:
            ends: list[asyncio.Future[Any]] = [drain, lease.ended]
            if retired is not None:
                ends.append(retired)
            start = time.monotonic()
            used = False
            try:
                with waiting_on(retired, kind, lease.ended):
                    await asyncio.wait(ends, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                raise_if_ended(lease, drain, retired)
                used = True
            finally:
                self.turn_over(t, min(time.monotonic() - start, wait), used)
        return wait

    async def take_turn_within(
        self,
        t: Tenant,
        holder: str,
        lease: Lease,
        drain: asyncio.Future[None],
        timeout: float | None,
        kind: str,
        retired: asyncio.Future[None] | None = None,
        nonblocking: bool = False,
    ) -> float | None:
        """:meth:`take_turn` for an operation that waits up to ``timeout``
        for the kernel: the wait for its turn is part of that time, and what
        is left of it is returned (a timeout of 2 s never takes 2 s plus the
        wait for its turn)."""
        wait = await self.take_turn(t, holder, lease, drain, timeout, kind, retired, nonblocking)
        if timeout is None:
            return None
        return max(timeout - wait, 0.001)

    def begin_call(self, t: Tenant, device: str, n: int) -> None:
        """Admit a Call (ops, grant, size, rate, in-flight); pair with end_call."""
        self.check_op(t, "call", device)
        self.check_size(t, "call", device, None, n)
        b: _Bucket | None = None
        if t.calls_per_second:
            now = time.monotonic()
            b = self._buckets.get(t.name)
            burst = max(1.0, t.calls_per_second)  # one second's worth, at least one call
            if b is None:
                b = self._buckets[t.name] = _Bucket(burst, now)
            b.tokens = min(burst, b.tokens + (now - b.stamp) * t.calls_per_second)
            b.stamp = now
            if b.tokens < 1.0:
                # when the bucket holds a whole token again, rounded up:
                # no Call of the tenant's is admitted sooner -- but another
                # of its clients may take that token first
                ms = retry_after_ms((1.0 - b.tokens) / t.calls_per_second)
                self.exhaust(
                    t,
                    "call",
                    device,
                    None,
                    "calls_per_second",
                    f"more than calls_per_second={t.calls_per_second:g}: retry in "
                    f"{shown_ms(ms)} at the earliest (no promise: another Call of the "
                    "tenant's may take that turn)",
                    retry_after_ms=ms,
                )
        n_in = self.in_flight.get(t.name, 0)
        if t.max_calls_in_flight and n_in >= t.max_calls_in_flight:
            kept = self.kept.get(t.name, 0)
            # a slot kept by a timed-out Call's quarantined channel shows in
            # no Call of the tenant's: say so, or "3 calls in flight" reads
            # as wrong to a tenant that has none running
            why = (
                f" ({kept} of them timed out and keep their slot until their pool "
                "channel is back from quarantine)"
                if kept
                else ""
            )
            self.exhaust(
                t,
                "call",
                device,
                None,
                "max_calls_in_flight",
                f"{n_in} calls in flight{why} (limit max_calls_in_flight="
                f"{t.max_calls_in_flight})",
            )
        if b is not None:
            # only a Call admitted spends the rate: one refused for its
            # in-flight limit must not also cost the next Call its token
            b.tokens -= 1.0
        self.in_flight[t.name] = n_in + 1

    def end_call(self, t: Tenant, kept: bool = False) -> None:
        """A Call's slot is free again; ``kept``: it was kept (:meth:`keep_call`)."""
        n = self.in_flight.get(t.name, 1) - 1
        if n <= 0:
            self.in_flight.pop(t.name, None)
        else:
            self.in_flight[t.name] = n
        if kept:
            k = self.kept.get(t.name, 1) - 1
            if k <= 0:
                self.kept.pop(t.name, None)
            else:
                self.kept[t.name] = k

    def keep_call(self, t: Tenant) -> None:
        """A Call ended but its slot stays taken until its quarantined pool
        channel settles (then ``end_call(t, kept=True)``)."""
        self.kept[t.name] = self.kept.get(t.name, 0) + 1

    def owned(self, lease_id: str, tenant: str) -> None:
        if len(self.lease_owner) > 65536:
            for k in list(self.lease_owner)[:32768]:
                del self.lease_owner[k]
        self.lease_owner[lease_id] = tenant

    def owner_of(self, lease_id: str) -> str:
        return self.lease_owner.get(lease_id, "")

    def devices_seen(
        self, mgr: DeviceManager, device: str = ""
    ) -> tuple[Tenant, list[ManagedDevice]]:
        """The caller's tenant and the devices it may see: ``device`` alone
        (NotFound if there is none such), or all of them when ""."""
        t = self.caller()
        if device:
            device = device_arg(device)
            # the grant first: a tenant learns nothing of devices it may not
            # see, not even whether they exist
            if not t.may_see(device):
                self.deny(
                    t, "list", device, None, "grant", f"device {shown(device)} is not granted"
                )
            return t, [mgr.get(device)]
        return t, [d for d in mgr.devices.values() if t.may_see(d.name)]

    def check_drained(self, device: str) -> None:
        if device in self.drained:
            raise errors.Shutdown(f"device {device} is drained by the admin")

    def fair_key(self, t: Tenant, caller: str) -> str:
        """The Call pool's round-robin key "GROUP\x1fCALLER": round-robin
        across tenants first (a tenant cannot win more turns by inventing
        caller names), then across the tenant's callers.  Without tenants
        the caller alone (the behaviour before tenants)."""
        caller = (caller or "anonymous").replace("\x1f", " ")
        if t.plain:
            return caller
        return f"{self.pool_group(t)}\x1f{caller}"

    @staticmethod
    def pool_group(t: Tenant) -> str:
        """The tenant's Call pool group (the GROUP of :meth:`fair_key`)."""
        return f"{_GROUP}{t.name}"

    def pool_shares(self) -> dict[str, int]:
        """Each tenant's max_pool_channels by its Call pool group (the
        GROUP of :meth:`fair_key`): what a reload hands every pool."""
        return {
            f"{_GROUP}{t.name}": t.max_pool_channels
            for t in self.policy.tenants
            if t.max_pool_channels
        }

    def calls_allowed(self, group: str, device: str) -> str:
        """Under the current policy: "" if the tenant of Call pool ``group``
        (fair_key's GROUP) may still Call ``device``, else the rule that
        forbids it."""
        if not group.startswith(_GROUP):
            return ""  # no tenants: the caller alone
        t = self.policy.tenant(group[len(_GROUP) :])
        if t is None:
            return "tenant"
        if "call" not in t.ops:
            return "ops"
        return "grant" if t.grant(device) is None else ""

    def still_allowed(self, tenant_name: str, op: str, device: str, chan: int) -> str:
        """Under the current policy: "" if ``tenant_name`` may still hold a
        lease on ``device``/``chan`` with ``op``, else the rule that forbids it."""
        if tenant_name in (ADMIN.name, DEFAULT.name) and not self.policy.multi:
            return ""
        if tenant_name == ADMIN.name:
            return ""
        t = self.policy.tenant(tenant_name)
        if t is None:
            return "tenant"
        if op not in t.ops:
            return "ops"
        g = t.grant(device)
        if g is None:
            return "grant"
        if not g.allows(chan):
            return "channels"
        return ""


def retry_after_ms(seconds: float) -> int:
    """``seconds`` (> 0) as whole milliseconds, rounded up, at least 1: the
    wait a client is told, never less than the real one (at most
    RETRY_AFTER_MAX_MS: a rate so small waits longer than anyone retries)."""
    return min(max(1, math.ceil(seconds * 1000.0)), errors.RETRY_AFTER_MAX_MS)


def shown_ms(ms: int) -> str:
    """``ms`` for a message: "340 ms"; from a second on, seconds rounded up
    to a tenth ("99.8 s")."""
    if ms < 1000:
        return f"{ms} ms"
    return f"{math.ceil(ms / 100) / 10:g} s"


def sendable(channel_max: int, t: Tenant) -> int:
    """The largest message ``t`` may send on a channel of ``channel_max``
    bytes: its max_message_bytes when lower (0: no limit of its own)."""
    if t.max_message_bytes and channel_max:
        return min(channel_max, t.max_message_bytes)
    return channel_max
