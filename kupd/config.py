"""kupd configuration: a TOML file (``tomllib``), validated at start, with
command-line flags overriding it.  Every error names the offending key.

Example (``deploy/kupd.sample.toml`` has the documented version)::

    socket = "/run/kupd/kupd.sock"
    [[device]]
    name = "echo"
    call_channels = 4
"""

from __future__ import annotations

import math
import os
import re
import sys
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from kupapi.abi import KUP_MAX_CHANNELS, KUP_NAME_MAX
from kupapi.defaults import DEFAULT_SOCKET

__all__ = [
    "RELOADED_KEYS",
    "RESTART_KEYS",
    "Config",
    "ConfigError",
    "DeviceConfig",
    "advisories",
    "load_config",
    "parse_config",
    "reloaded",
    "validate",
]

#: The config keys a reload applies to the running kupd (SIGHUP,
#: Admin.Reload).  Each holder of a value gets the new one: the tenant policy
#: and its sockets, the default socket's mode (chmod in place), the Call
#: deadline, the idle timeout of leases taken from now on (a lease already
#: held keeps the one its Attach reply announced: its holder paces its use
#: by it), the Call pools' quarantine and queue limit (every pool at once),
#: the reattach grace (attaches that start from now on), the drain grace,
#: the health loop's interval (at once: the wait under way ends), kupd's
#: session limit (leases already open over a lowered limit stay), the log
#: level and the audit log (re-opened, at the new path if it
#: changed -- so a rotated file is let go at each reload).  A socket whose
#: gRPC server settings change -- its max_connections, the receive limit
#: that follows its tenant's max_message_bytes, the RPC cap above its
#: tenant's limits, or the options every server shares (keepalive_*, and
#: the bounds derived from max_sessions and max_queued_calls) -- gets a new
#: server, swapped in at its path (kupd.tenants.SocketSet.commit); the
#: plain socket's receive limit follows the top-level max_message_bytes.
RELOADED_KEYS = (
    "tenants",
    "socket_mode",
    "call_timeout",
    "lease_idle_timeout",
    "call_quarantine",
    "reattach_grace",
    "max_queued_calls",
    "drain_grace",
    "health_interval",
    "max_sessions",
    "max_connections",
    "max_message_bytes",
    "keepalive_time",
    "keepalive_timeout",
    "log_level",
    "audit_log",
)

#: The keys only a restart applies, and why.  A reload names the ones that
#: changed in the file (``needs_restart``) and keeps running with the old
#: value, which is what ``Server.config`` keeps saying.
RESTART_KEYS: dict[str, str] = {
    "socket": "bound at start, next to its lock; clients connect by this path",
    "lock_file": "held from start to exit: moving it would let a second kupd start",
    "pid_file": "written at start and removed at exit (service managers read it)",
    "ready_file": "written once kupd serves, removed at its stop (rc.d/kupd's start waits for it)",
    "devices": "each device's handle, Call pool, health and metrics are built at start",
    "kupsim_dir": "the devices are found through it when kupd opens them",
    "metrics_port": "the metrics HTTP listener is bound once, at start",
    "metrics_address": "the metrics HTTP listener is bound once, at start",
    "admin_socket": "a Reload may arrive on it: moving it would cut that very call",
}


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key, and where
    its value came from when kupd knows (``source``: the config file's path,
    or ``flag --NAME``)."""

    def __init__(self, key: str, problem: str, source: str = "") -> None:
        where = f"{source}: " if source else ""
        # a flag's own value (--config's file, --device's text): the flag
        if key.startswith("--"):
            super().__init__(f"{where}flag {key}: {problem}")
        else:
            super().__init__(f"{where}config key {key!r}: {problem}")
        self.key = key
        self.problem = problem
        self.source = source

    def sourced(self, source: str) -> ConfigError:
        """The same error, naming where the key's value came from."""
        return ConfigError(self.key, self.problem, source)


@dataclass(frozen=True)
class DeviceConfig:
    #: Device name (kupsim: RUNDIR/<name>.sock found via kupsim_dir; kernel:
    #: /dev/kup/<name>), or a path.
    name: str
    #: Channels kupd attaches at start for the Call pool (the lowest announced
    #: free ids); the rest are left for sessions and leases.
    call_channels: int = 0


@dataclass(frozen=True)
class Config:
    #: kupctl's default too (kupapi.defaults: one value for both)
    socket: str = DEFAULT_SOCKET
    #: Lock file: a second kupd on the same socket refuses to start.
    lock_file: str = ""  # default: <socket>.lock
    pid_file: str = ""  # default: <socket>.pid ; "-" for none
    #: Written ("PID ready") once kupd serves, removed when its stop begins
    #: ("" : none): a service manager's readiness check that does not depend
    #: on log_level (deploy/freebsd/rc.d/kupd).
    ready_file: str = ""
    #: Permission bits of the socket (clients need read+write).
    socket_mode: int = 0o660
    devices: tuple[DeviceConfig, ...] = ()
    #: Where kupsim publishes devices (sets $KUPSIM_DIR for the channel layer).
    kupsim_dir: str = ""
    lease_idle_timeout: float = 60.0
    call_timeout: float = 10.0
    #: A Call pool channel whose reply never came is replaced (closed, and a
    #: fresh channel attached) once it has waited this long for it.
    call_quarantine: float = 30.0
    #: An attach of a channel whose last user left and whose module has not
    #: let go of it yet (the host answers Releasing) is tried again for this
    #: many seconds before it fails Releasing (0: not tried again).
    reattach_grace: float = 10.0
    drain_grace: float = 5.0
    #: How often unreachable devices are retried and reachable ones probed.
    health_interval: float = 1.0
    max_sessions: int = 4096
    max_queued_calls: int = 10000
    #: Connections at once on ``socket`` (0: no limit); one more is closed
    #: as it is made.  Tenants' sockets: each tenant's own max_connections.
    max_connections: int = 0
    #: The largest send / Call payload on ``socket`` (0: the channel's
    #: limit), as a tenant's max_message_bytes on its socket.  Tenants'
    #: sockets: each tenant's own max_message_bytes.
    max_message_bytes: int = 0
    #: 0: metrics off; otherwise served on metrics_address:metrics_port.
    metrics_port: int = 0
    metrics_address: str = "127.0.0.1"
    #: A hung client (e.g. SIGSTOPped) holding a session is dropped within
    #: about keepalive_time + keepalive_timeout seconds (issue 4: within 5 s).
    keepalive_time: float = 2.0
    keepalive_timeout: float = 2.0
    log_level: str = "info"
    #: Root-only socket of the Admin service ("" : none).  See docs/security.md.
    admin_socket: str = ""
    #: Audit log of policy denials, one JSON line each ("" : kupd's log only).
    audit_log: str = ""
    #: [[tenant]] tables (kupd.policy.Tenant); none: ``socket`` serves one
    #: tenant "default" with everything allowed.
    tenants: tuple[Any, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def lock_path(self) -> str:
        return self.lock_file or self.socket + ".lock"

    @property
    def pid_path(self) -> str:
        if self.pid_file == "-":
            return ""
        return self.pid_file or self.socket + ".pid"

    def device(self, name: str) -> DeviceConfig | None:
        for d in self.devices:
            if d.name == name:
                return d
        return None


_LEVELS = ("debug", "info", "warning", "error")


def _typed(table: dict[str, Any], key: str, prefix: str, kind: type, default: Any) -> Any:
    if key not in table:
        return default
    value = table[key]
    full = prefix + key
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(full, f"must be a number, not {type(value).__name__} {value!r}")
        return float(value)
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(full, f"must be an integer, not {type(value).__name__} {value!r}")
        return value
    if not isinstance(value, kind):
        raise ConfigError(full, f"must be a {kind.__name__}, not {type(value).__name__} {value!r}")
    return value


def _positive(
    key: str, value: float, allow_zero: bool = False, most: float = 1e9, least: float = 0.0
) -> None:
    """A number of seconds: finite (TOML has nan and inf), > 0 (or >= 0),
    at least ``least`` and at most ``most``."""
    if not math.isfinite(value):
        raise ConfigError(key, f"must be a finite number of seconds, not {value}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(key, f"must be {'>= 0' if allow_zero else '> 0'}, not {value}")
    if value > most:
        raise ConfigError(key, f"must be at most {most:g} seconds, not {value:g}")
    if 0 < value < least:
        raise ConfigError(key, f"must be at least {least:g} seconds, not {value:g}")


#: the names kupdev_create accepts (kmod/core/kup_core.c, kup_name_ok)
_DEVICE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
#: the longest device name or path kupd serves (a path: PATH_MAX with its
#: NUL); a client's longer name is refused before it is looked up or logged
DEVICE_ARG_MAX = 4095


def _device(raw: Any, index: int) -> DeviceConfig:
    prefix = f"device[{index}]."
    if not isinstance(raw, dict):
        raise ConfigError(f"device[{index}]", "must be a table ([[device]])")
    unknown = set(raw) - {"name", "call_channels"}
    if unknown:
        raise ConfigError(prefix + sorted(unknown)[0], "unknown key (known: name, call_channels)")
    if "name" not in raw:
        raise ConfigError(prefix + "name", "is required")
    name = _typed(raw, "name", prefix, str, "")
    if not name or (len(name.encode()) >= KUP_NAME_MAX and "/" not in name):
        raise ConfigError(prefix + "name", f"must be 1..{KUP_NAME_MAX - 1} bytes, not {name!r}")
    if len(name.encode()) > DEVICE_ARG_MAX:
        raise ConfigError(prefix + "name", f"a path of at most {DEVICE_ARG_MAX} bytes")
    if "/" not in name and not _DEVICE_NAME.fullmatch(name):
        # no module can ever publish it: refused here rather than waited for
        raise ConfigError(
            prefix + "name",
            f"{name!r} is not a device name (letters, digits, '_', '-' and '.', not "
            "starting with '.', as kupdev_create takes them) nor a device path (with a '/')",
        )
    calls = _typed(raw, "call_channels", prefix, int, 0)
    if not 0 <= calls <= KUP_MAX_CHANNELS:
        raise ConfigError(prefix + "call_channels", f"must be 0..{KUP_MAX_CHANNELS}, not {calls}")
    return DeviceConfig(name=name, call_channels=calls)


_TOP = {
    "socket": str,
    "lock_file": str,
    "pid_file": str,
    "ready_file": str,
    "socket_mode": str,
    "kupsim_dir": str,
    "lease_idle_timeout": float,
    "call_timeout": float,
    "call_quarantine": float,
    "reattach_grace": float,
    "drain_grace": float,
    "health_interval": float,
    "max_sessions": int,
    "max_queued_calls": int,
    "max_connections": int,
    "max_message_bytes": int,
    "metrics_port": int,
    "metrics_address": str,
    "keepalive_time": float,
    "keepalive_timeout": float,
    "log_level": str,
    "admin_socket": str,
    "audit_log": str,
}


def parse_config(data: dict[str, Any]) -> Config:
    """Validate a parsed TOML document (or a dict of the same shape)."""
    return validate(_build(data))


def _build(data: dict[str, Any], devices_from_flags: bool = False) -> Config:
    """The file's config; ``devices_from_flags``: --device replaces its
    device list, so its tenants' grants are checked against that one, by
    validate(), not against the file's."""
    unknown = set(data) - set(_TOP) - {"device", "tenant"}
    if unknown:
        from kupd.policy import TENANT_KEYS  # policy imports ConfigError from here

        key = sorted(unknown)[0]
        where = {"call_channels": "a [[device]] key", "name": "a [[device]] or [[tenant]] key"}.get(
            key, "a [[tenant]] key" if key in TENANT_KEYS else None
        )
        raise ConfigError(key, f"unknown key here ({where})" if where else "unknown key")
    values: dict[str, Any] = {}
    for key, kind in _TOP.items():
        if key in data and key != "max_message_bytes":
            values[key] = _typed(data, key, "", kind, None)
    if "max_message_bytes" in data:
        from kupd.policy import message_bytes

        # the tenant key's rule and message, word for word
        values["max_message_bytes"] = message_bytes(data)
    if "socket_mode" in values:
        text = values["socket_mode"]
        try:
            mode = int(text, 8)
        except ValueError:
            raise ConfigError(
                "socket_mode", f"must be an octal string like '0660', not {text!r}"
            ) from None
        if not 0 <= mode <= 0o777 or mode & 0o600 != 0o600:
            raise ConfigError("socket_mode", f"must be within 0777 and include 0600, not {text!r}")
        values["socket_mode"] = mode
    devices_raw = data.get("device", [])
    if not isinstance(devices_raw, list):
        raise ConfigError("device", "must be an array of tables ([[device]])")
    devices = tuple(_device(raw, i) for i, raw in enumerate(devices_raw))
    names = [d.name for d in devices]  # duplicates: validate()
    values["devices"] = devices
    if "tenant" in data:
        from kupd.policy import parse_tenants  # policy imports ConfigError from here

        values["tenants"] = parse_tenants(data["tenant"], [] if devices_from_flags else names)
    return Config(**values)


#: The addresses metrics_address may be: loopback ones every host has.
METRICS_ADDRESSES = ("127.0.0.1", "::1", "localhost")

#: sockaddr_un's sun_path, the terminating NUL included: 108 bytes on
#: Linux, 104 on FreeBSD.  A longer path cannot be bound at all (gRPC only
#: says "Failed to bind").
SUN_PATH_MAX = 104 if sys.platform.startswith("freebsd") else 108


def _unix_socket_path(key: str, path: str) -> None:
    n = len(os.fsencode(path))
    if n >= SUN_PATH_MAX:
        raise ConfigError(
            key,
            f"a unix socket path is at most {SUN_PATH_MAX - 1} bytes (sun_path), "
            f"this one is {n}: {path}",
        )


#: gRPC's millisecond options are int32.
_GRPC_MS_MAX = 2**31 - 1
#: The health loop's shortest interval, seconds.
HEALTH_INTERVAL_MIN = 0.01
#: max_sessions' ceiling (far above what one process can hold open).
MAX_SESSIONS_MAX = 1_000_000
#: max_connections' ceiling, for the plain socket and each tenant's (gRPC's
#: option is an int; a process holds far fewer descriptors than this).
MAX_CONNECTIONS_MAX = 1_000_000


def _same_path(a: str, b: str) -> bool:
    """Two spellings of one path (``t/./a.sock``, ``t//a.sock``)."""
    return os.path.normpath(os.path.abspath(a)) == os.path.normpath(os.path.abspath(b))


def _check_paths(cfg: Config) -> None:
    """No socket may be another socket, or a file kupd writes: binding a
    unix socket replaces whatever is at its path (kupd's own lock file
    included, which would let a second kupd start)."""
    from kupd.policy import tenant_key

    sockets: list[tuple[str, str]] = []
    if not cfg.tenants:
        sockets.append(("socket", cfg.socket))
    sockets += [(tenant_key(i, t.name) + ".socket", t.socket) for i, t in enumerate(cfg.tenants)]
    if cfg.admin_socket:
        sockets.append(("admin_socket", cfg.admin_socket))
    files = [
        ("lock_file", cfg.lock_path),
        ("pid_file", cfg.pid_path),
        ("ready_file", cfg.ready_file),
        ("audit_log", cfg.audit_log),
    ]
    for i, (key, path) in enumerate(sockets):
        for other_key, other in [*sockets[:i], *files]:
            if other and _same_path(path, other):
                raise ConfigError(key, f"{path} is also {other_key} ({other})")
    # the ready file is replaced and removed: never the lock or the pid file
    for other_key, other in files[:2]:
        if cfg.ready_file and other and _same_path(cfg.ready_file, other):
            raise ConfigError("ready_file", f"{cfg.ready_file} is also {other_key} ({other})")


def validate(cfg: Config) -> Config:
    """Check cross-field rules; used after flags are applied too."""
    from kupd.policy import tenant_key  # policy imports ConfigError from here

    if not cfg.socket:
        raise ConfigError("socket", "must not be empty")
    _unix_socket_path("socket", cfg.socket)
    if cfg.admin_socket:
        _unix_socket_path("admin_socket", cfg.admin_socket)
    for i, t in enumerate(cfg.tenants):
        _unix_socket_path(tenant_key(i, t.name) + ".socket", t.socket)
    for key in ("lease_idle_timeout", "call_timeout", "call_quarantine"):
        _positive(key, getattr(cfg, key))
    # gRPC takes keepalive times as int32 milliseconds
    for key in ("keepalive_time", "keepalive_timeout"):
        _positive(key, getattr(cfg, key), most=_GRPC_MS_MAX / 1000)
    # a health loop every microsecond would spin a core
    _positive("health_interval", cfg.health_interval, least=HEALTH_INTERVAL_MIN)
    _positive("drain_grace", cfg.drain_grace, allow_zero=True)
    _positive("reattach_grace", cfg.reattach_grace, allow_zero=True)
    # max_sessions + 1024 becomes gRPC's int32 max_concurrent_streams
    if not 1 <= cfg.max_sessions <= MAX_SESSIONS_MAX:
        raise ConfigError(
            "max_sessions", f"must be 1..{MAX_SESSIONS_MAX}, not {cfg.max_sessions}"
        )
    if not 0 <= cfg.max_connections <= MAX_CONNECTIONS_MAX:
        raise ConfigError(
            "max_connections",
            f"must be 0..{MAX_CONNECTIONS_MAX} (0: no limit), not {cfg.max_connections}",
        )
    if cfg.max_message_bytes < 0:  # a flag's or a replace()'s value
        raise ConfigError(
            "max_message_bytes", f"must be an integer >= 0, not {cfg.max_message_bytes!r}"
        )
    if cfg.max_queued_calls < 1:
        raise ConfigError("max_queued_calls", f"must be >= 1, not {cfg.max_queued_calls}")
    if not 0 <= cfg.metrics_port <= 65535:
        raise ConfigError("metrics_port", f"must be 0..65535, not {cfg.metrics_port}")
    if cfg.metrics_address not in METRICS_ADDRESSES:
        # not "a loopback address": 127.0.0.2 is one, and is refused too (a
        # FreeBSD lo0 has only 127.0.0.1 unless configured)
        allowed = ", ".join(METRICS_ADDRESSES)
        raise ConfigError(
            "metrics_address",
            f"must be one of the loopback addresses {allowed}, not {cfg.metrics_address!r}",
        )
    if cfg.log_level not in _LEVELS:
        levels = ", ".join(_LEVELS)
        raise ConfigError("log_level", f"must be one of {levels}, not {cfg.log_level!r}")
    if not cfg.devices:
        raise ConfigError("device", "at least one [[device]] (or --device) is required")
    if cfg.admin_socket and not cfg.admin_socket.startswith("/"):
        raise ConfigError("admin_socket", f"must be an absolute path, not {cfg.admin_socket!r}")
    names = [d.name for d in cfg.devices]
    for i, n in enumerate(names):
        if n in names[:i]:
            raise ConfigError(f"device[{i}].name", f"duplicate device {n!r}")
    for i, t in enumerate(cfg.tenants):
        for key, own in (("socket", cfg.socket), ("admin_socket", cfg.admin_socket)):
            if own and _same_path(t.socket, own):
                raise ConfigError(
                    tenant_key(i, t.name) + ".socket", f"{t.socket} is kupd's own {key}"
                )
        for j, g in enumerate(t.grants or ()):
            if cfg.device(g.device) is None:
                raise ConfigError(
                    f"{tenant_key(i, t.name)}.grant[{j}].device",
                    f"no [[device]] named {g.device!r} (kupd serves {', '.join(names)})",
                )
    _check_paths(cfg)
    return cfg


def advisories(cfg: Config) -> list[tuple[str, str]]:
    """Valid settings that do not do what their key suggests: (key, why),
    for a warning at start and at each reload."""
    from kupd.policy import tenant_key

    out: list[tuple[str, str]] = []
    if cfg.tenants and cfg.max_connections:
        out.append((
            "max_connections",
            "unused with [[tenant]] tables (the plain socket is not served): "
            "each tenant's own max_connections caps its socket",
        ))
    if cfg.tenants and cfg.socket_mode != Config.socket_mode:
        out.append((
            "socket_mode",
            f"{cfg.socket_mode:04o} is unused with [[tenant]] tables (the plain socket is "
            "not served): each tenant's own mode is its socket's",
        ))
    if cfg.tenants and cfg.max_message_bytes:
        out.append((
            "max_message_bytes",
            "unused with [[tenant]] tables (the plain socket is not served): "
            "each tenant's own max_message_bytes limits its messages",
        ))
    for i, t in enumerate(cfg.tenants):
        # default deny: valid, but a socket that serves nothing at all
        if t.grants is not None and not t.grants:
            out.append((
                tenant_key(i, t.name) + ".grant",
                f"none: tenant {t.name} may use no device (everything is denied unless "
                "granted; ListDevices and Watch show it nothing): add a [[tenant.grant]] "
                "per device it may use",
            ))
        if not t.ops:
            out.append((
                tenant_key(i, t.name) + ".ops",
                f"empty: tenant {t.name} may do nothing (session, lease, call, watch: "
                "the default is all four)",
            ))
    out += _held_advisories(cfg)
    for d in cfg.devices:
        if not d.call_channels:
            continue
        # How many of this pool's channels each tenant that may Call the
        # device can hold at once (busy, or quarantined after a timeout):
        # its max_pool_channels, or its max_calls_in_flight (a bound for
        # every device at once), or else the whole pool.
        callers = [
            (i, t)
            for i, t in enumerate(cfg.tenants)
            if "call" in t.ops and t.grant(d.name) is not None
        ]
        holds = {
            t.name: min(
                [x for x in (t.max_pool_channels, t.max_calls_in_flight) if x],
                default=d.call_channels,
            )
            for _, t in callers
        }
        whole = False
        for i, t in callers:
            # one tenant alone holding the whole pool starves nobody else
            if len(callers) < 2 or holds[t.name] < d.call_channels:
                continue
            whole = True
            if t.max_pool_channels:
                out.append((
                    tenant_key(i, t.name) + ".max_pool_channels",
                    f"{t.max_pool_channels} is not below device {d.name}'s "
                    f"call_channels={d.call_channels}: tenant {t.name}'s Calls "
                    "can still hold that whole pool",
                ))
            else:
                by = (
                    f"max_calls_in_flight={t.max_calls_in_flight} is not below it either"
                    if t.max_calls_in_flight
                    else "nor max_calls_in_flight"
                )
                out.append((
                    tenant_key(i, t.name) + ".max_pool_channels",
                    f"not set ({by}): tenant {t.name}'s Calls can hold all of device "
                    f"{d.name}'s call_channels={d.call_channels} -- Calls that time out "
                    "quarantine them, and other tenants' Calls then find no channel; "
                    "set it below call_channels",
                ))
        total = sum(holds.values())
        if len(callers) > 1 and not whole and total >= d.call_channels:
            names = ", ".join(f"{t.name}={holds[t.name]}" for _, t in callers)
            out.append((
                "max_pool_channels",
                f"device {d.name}'s call_channels={d.call_channels}: tenants' limits "
                f"({names}) add up to {total}: together their Calls can hold the whole "
                "pool, and another tenant's Call then finds no channel",
            ))
    return out


def _held_advisories(cfg: Config) -> list[tuple[str, str]]:
    """A tenant whose requests that never arrive whole can tie up more than
    HELD_WARN_BYTES of kupd's memory (kupd.tenants.held_bound: a tenant
    without max_message_bytes, or with neither max_sessions nor
    max_calls_in_flight): named by the first of those keys it lacks."""
    from kupd.policy import tenant_key
    from kupd.tenants import (
        HELD_WARN_BYTES,
        RPC_HELD_BYTES,
        held_bound,
        stream_window,
        tenant_rpc_bound,
    )

    out: list[tuple[str, str]] = []
    for i, t in enumerate(cfg.tenants):
        held = held_bound(cfg, t)
        if held <= HELD_WARN_BYTES:
            continue
        missing = [
            k
            for k, unset in (
                ("max_message_bytes", not t.max_message_bytes),
                ("max_sessions", not t.max_sessions and bool({"session", "lease"} & set(t.ops))),
                ("max_calls_in_flight", not t.max_calls_in_flight and "call" in t.ops),
            )
            if unset
        ]
        if not missing:
            continue  # its own limits, set high: what it asked for
        size = f"up to {stream_window(t) // 1024} KiB" + (
            " (max_message_bytes + 16 KiB, at least 64 KiB and at most gRPC's whole message)"
            if t.max_message_bytes
            else " without max_message_bytes"
        )
        out.append((
            f"{tenant_key(i, t.name)}.{missing[0]}",
            f"not set ({', '.join(missing)}): tenant {t.name}'s socket admits "
            f"{tenant_rpc_bound(cfg, t)} RPCs at once, and requests that never "
            f"arrive whole can hold up to {held / (1 << 30):.1f} GiB of kupd's memory "
            f"(each RPC its request -- {size} -- plus ~{RPC_HELD_BYTES // 1024} KiB "
            "of gRPC's own); set "
            f"{' and '.join(missing)} to bound it",
        ))
    return out


def reloaded(running: Config, new: Config) -> tuple[Config, list[str], list[str]]:
    """What a reload of ``new`` makes of the ``running`` config: the config
    kupd runs with afterwards (``new``'s live keys, ``running``'s restart-only
    ones), the live keys that changed (applied) and the restart-only keys
    that changed (not applied).  ConfigError: the result breaks a rule (a
    tenant granted a device the running kupd does not serve, ...)."""
    # The settings a socket's gRPC server is built with (max_connections,
    # the receive limit that follows max_message_bytes, the RPC cap above
    # max_sessions and max_calls_in_flight) are applied too: the socket
    # gets a new server (kupd.tenants.SocketSet.commit).
    changed = [f.name for f in fields(Config) if getattr(new, f.name) != getattr(running, f.name)]
    # with [[tenant]] tables the top-level socket is not served: a changed
    # socket_mode, max_connections or max_message_bytes changes nothing,
    # and is not reported
    inert = {"socket_mode", "max_connections", "max_message_bytes"} if new.tenants else set()
    applied = [k for k in changed if k in RELOADED_KEYS and k not in inert]
    needs_restart = [k for k in changed if k in RESTART_KEYS and k not in inert]
    live = {k: getattr(new, k) for k in RELOADED_KEYS}
    try:
        cfg = validate(replace(running, **live))
    except ConfigError as exc:
        if not needs_restart:
            raise
        raise ConfigError(
            exc.key,
            f"{exc.problem} (checked against the running {', '.join(needs_restart)}: "
            "the file's new value applies only at a restart)",
            exc.source or _source(exc.key, new),
        ) from None
    return cfg, applied, needs_restart


def load_config(
    path: str | os.PathLike[str] | None, overrides: dict[str, Any] | None = None
) -> Config:
    """Read ``path`` (None: defaults only), then apply ``overrides`` (flags;
    None values are ignored; "devices" replaces the device list)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError("--config", f"no such file: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("--config", f"{path} is not valid TOML: {exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError("--config", f"{path} is not UTF-8 text (TOML): {exc}") from None
        except OSError as exc:  # a directory, no permission, ...
            raise ConfigError("--config", f"cannot read {path}: {exc.strerror}") from None
    try:
        cfg = _build(data, devices_from_flags=(overrides or {}).get("devices") is not None)
    except ConfigError as exc:  # the file's own keys: name the file
        raise exc.sourced(_in_file(str(path), exc.key)) from None
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key == "devices":
            try:
                value = tuple(
                    _device(v, i) if isinstance(v, dict) else DeviceConfig(str(v))
                    for i, v in enumerate(value)
                )
            except ConfigError as exc:
                raise exc.sourced("flag --device") from None
        cfg = replace(cfg, **{key: value})
    if path is not None or overrides:
        cfg = replace(
            cfg,
            extra={
                **({"path": str(Path(path))} if path is not None else {}),
                "flags": sorted(k for k, v in (overrides or {}).items() if v is not None),
            },
        )
    try:
        return validate(cfg)
    except ConfigError as exc:
        raise exc.sourced(exc.source or _source(exc.key, cfg)) from None


def _source(key: str, cfg: Config) -> str:
    """Where ``key``'s value came from: ``flag --NAME`` when a command-line
    flag set it, else the config file's path ("": neither is known)."""
    top = re.split(r"[.\[]", key, maxsplit=1)[0]
    field_name = "devices" if top == "device" else top
    if field_name in cfg.extra.get("flags", ()):
        return f"flag --{top.replace('_', '-')}"
    path = cfg.extra.get("path")
    return _in_file(str(path), key) if path else ""


def _in_file(path: str, key: str) -> str:
    """``path``, or ``path:LINE`` when the line that sets ``key`` can be
    told (best effort: a key set in an inline table or a dotted key, or
    one the file lacks, gets no line)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            line = key_line(f.read(), key)
    except OSError:
        return path
    return f"{path}:{line}" if line else path


_KEY_PATH = re.compile(
    r"(?:(tenant|device)\[(?:name=([A-Za-z0-9_-]+)|(\d+))\]\.)?(?:grant\[(\d+)\]\.)?"
    r"([A-Za-z0-9_]+)"
)
_TABLE_HEADER = re.compile(r"\s*\[\[?\s*([A-Za-z0-9_.\s-]+?)\s*\]\]?\s*(?:#.*)?")


def key_line(text: str, key: str) -> int | None:
    """The 1-based line of ``text`` (a config file) that sets ``key`` as a
    ConfigError names it (``call_timeout``, ``device[1].name``,
    ``tenant[name=alice].mode``, ``tenant[name=alice].grant[0].channels``),
    or None when it cannot be told for sure: exactly one ``KEY =`` line in
    the table the key belongs to, tables found by their ``[[...]]``
    headers."""
    m = _KEY_PATH.fullmatch(key)
    if m is None:
        return None
    table, tenant_name, index, grant, leaf = m.groups()
    lines = text.splitlines()
    # (header, first line index, end line index) of every table, "" for the
    # top level before the first header
    starts: list[tuple[str, int]] = [("", 0)]
    for i, ln in enumerate(lines):
        h = _TABLE_HEADER.fullmatch(ln)
        if h is not None:
            starts.append((re.sub(r"\s+", "", h.group(1)), i + 1))
    tables = [
        (name, start, starts[k + 1][1] - 1 if k + 1 < len(starts) else len(lines))
        for k, (name, start) in enumerate(starts)
    ]

    def setting(start: int, end: int, name: str) -> list[int]:
        pattern = re.compile(rf"\s*{re.escape(name)}\s*=")
        return [i for i in range(start, end) if pattern.match(lines[i])]

    if table is None:
        candidates = [tables[0]]
    else:
        own = [(k, t) for k, t in enumerate(tables) if t[0] == table]
        if index is not None:
            own = own[int(index):int(index) + 1]
        else:  # a tenant by name: the table with that name = "..." line
            quoted = rf"[\"']{re.escape(tenant_name or '')}[\"']"
            named = re.compile(rf"\s*name\s*=\s*{quoted}\s*(?:#.*)?")
            own = [
                (k, t) for k, t in own
                if any(named.fullmatch(lines[i]) for i in range(t[1], t[2]))
            ]
        if len(own) != 1:
            return None
        k, found = own[0]
        candidates = [found]
        if grant is not None:
            # its [[tenant.grant]] tables: those after it, before the next tenant
            grants = []
            for t in tables[k + 1:]:
                if t[0] == "tenant":
                    break
                if t[0] == "tenant.grant":
                    grants.append(t)
            candidates = grants[int(grant):int(grant) + 1]
    hits = [i for _, start, end in candidates for i in setting(start, end, leaf)]
    return hits[0] + 1 if len(hits) == 1 else None
