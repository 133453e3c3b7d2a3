"""A tenant's ``max_pool_channels``: the most Call pool channels of a device
its Calls hold at once, busy or quarantined after timing out.  A tenant
whose Calls time out at once (the module keeps every reply owed) takes at
most that many channels out of service: another tenant's Call is still
served at once, and the tenant's own next Call waits for one of its
channels, then fails saying why.  Without the key, nothing changes."""

from __future__ import annotations

import tomllib

import pytest
from tenancy_helpers import LOCKHOLD, StartTenants, TenantKupd

from kupclient import Client, Message, errors
from kupd.config import Config, ConfigError, advisories, parse_config
from kupd.testing import echo_lock_holds, in_background, wait_until

POOL = 3
BODY = f"""
[[device]]
name = "echo"
call_channels = {POOL}

[[tenant]]
name = "hog"
socket = "@DIR@/hog.sock"
max_pool_channels = 2
[[tenant.grant]]
device = "echo"

[[tenant]]
name = "other"
socket = "@DIR@/other.sock"
[[tenant.grant]]
device = "echo"
"""


def _pool(k: TenantKupd) -> tuple[int, int, list[str]]:
    """echo's Call pool: every tenant's Calls in flight and queued, as the
    admin socket counts them (a tenant's socket counts its own only), and
    the pool channels' states."""
    with Client(k.admin_socket) as whole:
        (d,) = whole.devices("echo")
    states = [ch.state for ch in d.channels if ch.state in ("calls", "quarantined")]
    return d.calls_in_flight, d.calls_queued, states


def _free_the_holds(k: TenantKupd) -> None:
    """A "!lockfree" on a Session's channel ends every lock hold of echo."""
    with k.client("other") as c, c.open("echo").channel() as ch:
        ch.receive(timeout=30)  # the kernel's opening hand-over
        assert ch.exchange(b"!lockfree", timeout=30).data.lower() == b"!lockfree"


def _wait_holds(k: TenantKupd, n: int) -> None:
    wait_until(lambda: echo_lock_holds(k.sim) >= n, what=f"echo to hold {n} channels")


def test_timed_out_calls_take_at_most_the_share(start_tenants: StartTenants) -> None:
    k = start_tenants(BODY)
    with k.client("hog") as hog, k.client("other") as other:
        wait_until(lambda: _pool(k)[2] == ["calls"] * POOL, what="the pool to fill")
        holds = echo_lock_holds(k.sim)
        try:
            # Each Call's reply stays owed: its channel is quarantined.
            for _ in range(2):
                with pytest.raises(errors.DeadlineExceeded):
                    hog.call("echo", LOCKHOLD, timeout=0.3)
            _wait_holds(k, holds + 2)
            assert sorted(_pool(k)[2]) == ["calls", "quarantined", "quarantined"]
            # the third pool channel is not the hog's to take
            with pytest.raises(errors.DeadlineExceeded) as ei:
                hog.call("echo", b"more", timeout=0.5)
            msg = ei.value.message
            assert "tenant hog's Calls already hold 2 of the device's 3 pool channels" in msg, msg
            assert "limit max_pool_channels=2; 2 of them quarantined" in msg, msg
            # and it is there for the other tenant
            assert other.call("echo", b"served", timeout=10).data.lower() == b"served"
        finally:
            _free_the_holds(k)
        # the module answers at last: the hog's channels come back
        wait_until(lambda: _pool(k)[2] == ["calls"] * POOL, what="the pool back")
        assert hog.call("echo", b"again", timeout=10).data.lower() == b"again"


def test_busy_calls_beyond_the_share_wait_and_others_pass(start_tenants: StartTenants) -> None:
    k = start_tenants(BODY)
    with k.client("hog") as hog, k.client("other") as other:
        wait_until(lambda: _pool(k)[2] == ["calls"] * POOL, what="the pool to fill")
        holds = echo_lock_holds(k.sim)
        calls = [in_background(lambda: hog.call("echo", LOCKHOLD, timeout=60)) for _ in range(3)]
        try:
            _wait_holds(k, holds + 2)
            # two hold a channel each; the third waits though one is free
            wait_until(lambda: _pool(k)[:2] == (3, 1), what="the hog's third Call queued")
            assert other.call("echo", b"first", timeout=10).data.lower() == b"first"
            assert _pool(k)[:2] == (3, 1)
        finally:
            _free_the_holds(k)
        # the third gets a channel once one of the hog's is back
        _wait_holds(k, holds + 3)
        _free_the_holds(k)
        for bg in calls:
            reply = bg.outcome(60)
            assert isinstance(reply, Message) and reply.data.lower() == LOCKHOLD, reply


def test_the_key_is_checked() -> None:
    tenant = {"name": "t", "socket": "/run/t.sock", "max_pool_channels": -1}
    with pytest.raises(ConfigError) as ei:
        parse_config({"device": [{"name": "echo"}], "tenant": [tenant]})
    assert ei.value.key == "tenant[name=t].max_pool_channels"


def test_a_tenant_at_its_share_filling_the_queue_locks_nobody_out(
    start_tenants: StartTenants,
) -> None:
    """The hog (share 1) holds its one channel and fills the device's whole
    queue (max_queued_calls = 2) with Calls waiting for it: another
    tenant's Call still gets one of the free channels at once, not
    RESOURCE_EXHAUSTED "2 calls already queued"."""
    k = start_tenants("max_queued_calls = 2\n" + BODY.replace("max_pool_channels = 2",
                                                              "max_pool_channels = 1"))
    with k.client("hog") as hog, k.client("other") as other:
        wait_until(lambda: _pool(k)[2] == ["calls"] * POOL, what="the pool to fill")
        holds = echo_lock_holds(k.sim)
        calls = [in_background(lambda: hog.call("echo", LOCKHOLD, timeout=60)) for _ in range(3)]
        try:
            _wait_holds(k, holds + 1)
            wait_until(lambda: _pool(k)[:2] == (3, 2), what="the hog's two Calls queued")
            for i in range(3):
                got = other.call("echo", f"other {i}".encode(), timeout=10)
                assert got.data.lower() == f"other {i}".encode()
        finally:
            _free_the_holds(k)
        for n in (2, 3):  # the queued two, one after the other
            _wait_holds(k, holds + n)
            _free_the_holds(k)
        for bg in calls:
            reply = bg.outcome(60)
            assert isinstance(reply, Message) and reply.data.lower() == LOCKHOLD, reply


def test_a_reload_that_lifts_the_share_frees_queued_calls(start_tenants: StartTenants) -> None:
    """A Call queued behind its tenant's share is served once a reload
    raises the share -- not only when the tenant next calls."""
    body = BODY.replace("max_pool_channels = 2", "max_pool_channels = 1")
    k = start_tenants(body)
    with k.client("hog") as hog:
        wait_until(lambda: _pool(k)[2] == ["calls"] * POOL, what="the pool to fill")
        holds = echo_lock_holds(k.sim)
        first = in_background(lambda: hog.call("echo", LOCKHOLD, timeout=60))
        try:
            _wait_holds(k, holds + 1)
            second = in_background(lambda: hog.call("echo", b"second", timeout=60))
            wait_until(lambda: _pool(k)[:2] == (2, 1), what="the hog's second Call queued")
            k.write_config(body.replace("max_pool_channels = 1", "max_pool_channels = 2"))
            with k.admin() as adm:
                assert "tenants" in adm.reload().applied
            reply = second.outcome(30)
            assert isinstance(reply, Message) and reply.data.lower() == b"second", reply
            # served while the first still holds its channel: by the reload,
            # not by the first's channel coming back
            assert not first.done
        finally:
            _free_the_holds(k)
        reply = first.outcome(60)
        assert isinstance(reply, Message) and reply.data.lower() == LOCKHOLD, reply


def test_settings_that_protect_nothing_are_named_at_start_and_reload(
    start_tenants: StartTenants,
) -> None:
    """A share not below the pool it governs, and a top-level
    max_connections with tenants (no plain socket is served): valid, but
    they do not do what the key suggests -- kupd says so, at start and at
    each reload, naming the key."""
    body = "max_connections = 2\n" + BODY.replace("max_pool_channels = 2", "max_pool_channels = 3")
    k = start_tenants(body)
    want = ('"key": "tenant[name=hog].max_pool_channels"', '"key": "max_connections"')
    wait_until(lambda: all(w in k.log() for w in want), what="the warnings at start")
    line = next(x for x in k.log().splitlines() if want[0] in x)
    assert "3 is not below device echo's call_channels=3" in line, line
    with k.admin() as adm:
        adm.reload()

    def warned(w: str) -> int:  # the warning's own lines (the audit line names them too)
        event = '"event": "config key has no effect as set"'
        return sum(1 for x in k.log().splitlines() if w in x and event in x)

    wait_until(lambda: all(warned(w) == 2 for w in want), what="the warnings again at reload")
    # within the pool, and no top-level cap: nothing to say
    one_each = _capped(BODY.replace("max_pool_channels = 2", "max_pool_channels = 1"), other=1)
    assert _pool_advisories(parse_config(tomllib.loads(one_each.replace("@DIR@", "/run/t")))) == []


def _pool_advisories(cfg: Config) -> list[tuple[str, str]]:
    """advisories() about Call pools (the tenants here set no
    max_message_bytes: what their unfinished requests may hold is
    advised of too, test_tenancy_hostile_wire)."""
    return [(k, why) for k, why in advisories(cfg) if k.endswith("max_pool_channels")]


def _capped(body: str, other: int) -> str:
    """BODY with tenant "other" given max_pool_channels = ``other``."""
    return body.replace(
        'name = "other"\nsocket = "@DIR@/other.sock"\n',
        f'name = "other"\nsocket = "@DIR@/other.sock"\nmax_pool_channels = {other}\n',
    )


def test_a_tenant_without_a_pool_limit_is_named() -> None:
    """A tenant that may Call a device with neither max_pool_channels nor
    a max_calls_in_flight below the pool's size can hold the whole pool
    (Calls that time out quarantine their channels): named, unless
    max_calls_in_flight alone keeps it below the pool.  Before, only a
    tenant that had set max_pool_channels was ever checked."""
    cfg = parse_config(tomllib.loads(BODY.replace("@DIR@", "/run/t")))  # "other": no limits
    ((key, why),) = _pool_advisories(cfg)
    assert key == "tenant[name=other].max_pool_channels", key
    assert "not set (nor max_calls_in_flight)" in why and "tenant other's" in why, why
    inflight = BODY.replace(
        'name = "other"\nsocket = "@DIR@/other.sock"\n',
        f'name = "other"\nsocket = "@DIR@/other.sock"\nmax_calls_in_flight = {POOL}\n',
    ).replace("@DIR@", "/run/t")
    ((key, why),) = _pool_advisories(parse_config(tomllib.loads(inflight)))
    assert f"max_calls_in_flight={POOL} is not below it either" in why, why
    # max_calls_in_flight below the pool bounds its hold: with hog's 2,
    # 2 + 1 = 3 covers the pool of 3 -- the sum is named instead
    below = inflight.replace(f"max_calls_in_flight = {POOL}", "max_calls_in_flight = 1")
    ((key, why),) = _pool_advisories(parse_config(tomllib.loads(below)))
    assert key == "max_pool_channels" and "(hog=2, other=1) add up to 3" in why, why
    # a tenant without the call op, or without a grant of the device, holds none
    no_calls = BODY.replace(
        'name = "other"\nsocket = "@DIR@/other.sock"\n',
        'name = "other"\nsocket = "@DIR@/other.sock"\nops = ["session"]\n',
    ).replace("@DIR@", "/run/t")
    assert _pool_advisories(parse_config(tomllib.loads(no_calls))) == []


def test_a_lone_caller_is_not_warned_about() -> None:
    """One tenant that may Call a device can hold its whole pool without
    starving anybody: nothing to say (nor could any value silence it with
    call_channels = 1)."""
    lone = BODY.replace(
        'name = "other"\nsocket = "@DIR@/other.sock"\n',
        'name = "other"\nsocket = "@DIR@/other.sock"\nops = ["session"]\n',
    ).replace("max_pool_channels = 2", "").replace(f"call_channels = {POOL}", "call_channels = 1")
    assert _pool_advisories(parse_config(tomllib.loads(lone.replace("@DIR@", "/run/t")))) == []


def test_the_sample_config_keeps_a_channel_for_others() -> None:
    """deploy/kupd.sample.toml says its Calling tenants' limits leave the
    others a channel: no advisory may contradict it."""
    from kupd.testing import REPO_ROOT

    sample = tomllib.loads((REPO_ROOT / "deploy" / "kupd.sample.toml").read_text())
    assert advisories(parse_config(sample)) == []


def test_a_tenant_key_at_the_top_level_says_where_it_belongs() -> None:
    with pytest.raises(ConfigError, match=r"unknown key here \(a \[\[tenant\]\] key\)") as ei:
        parse_config({"device": [{"name": "echo"}], "max_pool_channels": 2})
    assert ei.value.key == "max_pool_channels"


def test_limits_that_add_up_to_the_whole_pool_are_named() -> None:
    """Each tenant's max_pool_channels below the pool, but together its
    size or more: their Calls can still hold every channel, and another
    tenant then finds none -- the advisory names the tenants and the sum;
    below the pool together, nothing is said."""
    both = _capped(BODY, other=1).replace("@DIR@", "/run/t")
    cfg = parse_config(tomllib.loads(both))  # 2 + 1 against a pool of 3
    ((key, why),) = _pool_advisories(cfg)
    assert key == "max_pool_channels" and "(hog=2, other=1) add up to 3" in why, why
    one_each = both.replace("max_pool_channels = 2", "max_pool_channels = 1")
    cfg = parse_config(tomllib.loads(one_each))
    assert _pool_advisories(cfg) == []
