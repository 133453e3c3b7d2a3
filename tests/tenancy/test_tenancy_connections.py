"""Connections per socket: a tenant's ``max_connections`` (and the plain
socket's top-level one) caps the connections open at once on its socket, so
a tenant cannot use up kupd's file descriptors by connecting over and over;
the other tenants and the admin socket are untouched.  gRPC closes the one
too many as it is accepted (grpc.max_allowed_incoming_connections on the
socket's own server): the client gets UNAVAILABLE, and kupctl says which
limit.  A reload applies a new cap at once, to the connections made after
it: the socket gets a new server (kupd.tenants.SocketSet._swap)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tenancy_helpers import (
    StartTenants,
    TenantKupd,
    child_env,
    hold_connection,
    hold_refused,
)

from kupclient import Client, errors
from kupd.config import ConfigError, parse_config, reloaded
from kupd.testing import kupsim, start_kupd, wait_until

BODY = """
[[device]]
name = "echo"
call_channels = 2

[[tenant]]
name = "capped"
socket = "@DIR@/capped.sock"
max_connections = 2
[[tenant.grant]]
device = "echo"

[[tenant]]
name = "open"
socket = "@DIR@/open.sock"
[[tenant.grant]]
device = "echo"
"""

LATE = """
[[tenant]]
name = "late"
socket = "@DIR@/late.sock"
max_connections = 1
[[tenant.grant]]
device = "echo"
"""


def _refused(path: str) -> errors.KupError:
    with Client(path) as c, pytest.raises(errors.Unavailable) as ei:
        c.health()
    return ei.value


def _accepted(path: str) -> bool:
    """A new client of ``path`` gets its answer (a fresh one each time: a
    refused gRPC channel backs off before it tries again)."""
    try:
        with Client(path) as c:
            return c.health() == "SERVING"
    except errors.Unavailable:
        return False


def _keep_accepted(path: str, found: list[Client]) -> bool:
    """A new client of ``path`` that got its answer, kept open in ``found``."""
    c = Client(path)
    try:
        if c.health() == "SERVING":
            found.append(c)
            return True
    except errors.Unavailable:
        pass
    c.close()
    return False


def _kupctl(k: TenantKupd, path: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kupclient.kupctl", "--socket", path, "health"],
        env=child_env(None), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_a_tenant_at_its_cap_is_refused_and_nobody_else_is(start_tenants: StartTenants) -> None:
    k = start_tenants(BODY)
    capped = k.sock("capped")
    held = [hold_connection(capped), hold_connection(capped)]
    try:
        exc = _refused(capped)
        # gRPC's words depend on which side wrote first
        assert any(
            why in exc.message
            for why in ("Connection reset by peer", "Broken pipe", "Socket closed")
        ), exc
        # the library says what that likely means, not only kupctl
        assert "a kupd socket with max_connections set closes connections" in exc.message, exc
        p = _kupctl(k, capped)
        assert p.returncode == 17, p.stderr
        assert f"{capped} is likely at its max_connections limit" in p.stderr, p.stderr
        # the other tenant, with no cap, and the admin socket: as before
        others = [hold_connection(k.sock("open")) for _ in range(4)]
        try:
            with Client(k.sock("open")) as c:
                assert c.call("echo", b"still served").data.lower() == b"still served"
        finally:
            for o in others:
                o.close()
        with k.admin() as adm:
            assert adm.list_leases() == []
        # one leaves: a new one gets its place
        held.pop().close()
        wait_until(lambda: _accepted(capped), what="a place on the capped socket")
    finally:
        for c in held:
            c.close()


def test_reload_applies_a_kept_sockets_new_cap_and_a_new_ones(
    start_tenants: StartTenants,
) -> None:
    k = start_tenants(BODY)
    capped = k.sock("capped")
    k.write_config(BODY.replace("max_connections = 2", "max_connections = 3") + LATE)
    with k.admin() as adm:
        r = adm.reload()
    # the kept tenant's new cap applies now (its socket has a new server)
    assert r.needs_restart == (), r
    assert "tenants" in r.applied and "late" in r.tenants, r
    held = [hold_connection(capped), hold_connection(capped), hold_connection(capped)]
    try:
        _refused(capped)
        # the tenant the reload added has a server of its own, with its cap
        late = hold_connection(k.sock("late"))
        try:
            _refused(k.sock("late"))
        finally:
            late.close()
    finally:
        for c in held:
            c.close()
    # a reload changing nothing else does not claim to apply the tenants
    with k.admin() as adm:
        again = adm.reload()
    assert (again.applied, again.needs_restart) == ((), ()), again


def test_the_plain_socket_cap(tmp_path: Path) -> None:
    with kupsim("echo", check_exit=False) as sim:
        sock = tmp_path / "kupd.sock"
        k = start_kupd(
            "--max-connections",
            "1",
            socket=sock,
            log=tmp_path / "kupd.log",
            sim=sim,
            devices=("echo:1",),
        )
        try:
            # the one place: free once kupd has seen its readiness check's
            # connection (and each refused try here) closed -- which it
            # learns when it next reads them, not when they close
            found: list[Client] = []
            wait_until(lambda: _keep_accepted(str(sock), found), what="the one place free")
            with found[0] as c:
                assert c.call("echo", b"one").data.lower() == b"one"
                # this process's one connection holds the place
                held = hold_refused(str(sock))
                assert held, "a second connection was accepted"
                assert c.call("echo", b"two").data.lower() == b"two"
        finally:
            k.stop()


@pytest.mark.parametrize(
    ("doc", "key"),
    [
        ({"max_connections": -1}, "max_connections"),
        ({"max_connections": 2_000_000}, "max_connections"),
        ({"max_connections": "many"}, "max_connections"),
        (
            {"tenant": [{"name": "t", "socket": "/run/t.sock", "max_connections": -2}]},
            "tenant[name=t].max_connections",
        ),
        (
            {"tenant": [{"name": "t", "socket": "/run/t.sock", "max_connections": 1.5}]},
            "tenant[name=t].max_connections",
        ),
        (
            {"tenant": [{"name": "t", "socket": "/run/t.sock", "max_connections": 10**7}]},
            "tenant[name=t].max_connections",
        ),
    ],
)
def test_bad_values_name_their_key(doc: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config({"device": [{"name": "echo"}], **doc})
    assert ei.value.key == key, ei.value


def test_reloaded_reports_caps() -> None:
    """kupd.config.reloaded, by itself: the plain socket's cap is applied
    (and inert with tenants); so is a kept tenant's, and that of a tenant
    whose socket moved."""
    plain = {"device": [{"name": "echo"}]}
    cfg, applied, needs = reloaded(
        parse_config(plain), parse_config({**plain, "max_connections": 5})
    )
    assert (applied, needs, cfg.max_connections) == (["max_connections"], [], 5)
    t = {"name": "t", "socket": "/run/t.sock", "max_connections": 2}
    running = parse_config({**plain, "tenant": [t]})
    new = {**plain, "tenant": [{**t, "max_connections": 4}]}
    cfg, applied, needs = reloaded(running, parse_config(new))
    assert (applied, needs) == (["tenants"], [])
    assert cfg.tenants[0].max_connections == 4
    moved = {**t, "socket": "/run/t2.sock", "max_connections": 4}
    cfg, applied, needs = reloaded(running, parse_config({**plain, "tenant": [moved]}))
    assert (applied, needs, cfg.tenants[0].max_connections) == (["tenants"], [], 4)
