"""What a reload that was applied tells the operator who asked for it: an
audit_log it could not open again, the settings that have no effect as
set, the sockets it added and removed -- each until now only in kupd's log
(and the audit line, the service manager's status) -- are in Admin.Reload's
reply and in ``kupctl reload``'s output, text and --json; so are the queued
Calls a new policy refuses (each got PERMISSION_DENIED; only audited).  A real kupd,
reloaded by real kupctl processes."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tenancy_helpers import LOCKHOLD, StartTenants, TenantKupd, run_module, socket_dir

from kupd import errors
from kupd.testing import (
    echo_lock_holds,
    in_background,
    kupd_env,
    kupsim,
    start_kupd,
    wait_until,
)

__all__: list[str] = []

ALICE = """
[[device]]
name = "echo"
call_channels = 1

[[tenant]]
name = "alice"
socket = "@DIR@/alice.sock"
max_sessions = 4          # with max_message_bytes and max_calls_in_flight:
max_message_bytes = 4096  # no advisory of what unfinished requests may
max_calls_in_flight = 64  # hold (kupd.tenants.held_bound), only the pool's
[[tenant.grant]]
device = "echo"
"""

#: bob joins (his socket is added); either tenant's Calls can now hold
#: echo's whole one-channel pool, the other's then finding none: valid, but
#: kupd's advisory says to set max_pool_channels below call_channels
BOB = (
    ALICE
    + """
[[tenant]]
name = "bob"
socket = "@DIR@/bob.sock"
max_sessions = 4          # with max_message_bytes and max_calls_in_flight:
max_message_bytes = 4096  # no advisory of what unfinished requests may
max_calls_in_flight = 64  # hold (kupd.tenants.held_bound), only the pool's
[[tenant.grant]]
device = "echo"
"""
)
POOL = [f"tenant[name={t}].max_pool_channels" for t in ("alice", "bob")]


def _reload(k: TenantKupd, *opts: str) -> Any:
    res = run_module("kupclient.kupctl", *opts, "reload", "--admin-socket", k.admin_socket)
    assert res.returncode == 0, (res.returncode, res.stdout, res.stderr)
    return json.loads(res.stdout) if "--json" in opts else res.stdout


def test_kupctl_reload_says_what_was_applied_with_a_caveat(start_tenants: StartTenants) -> None:
    k = start_tenants(ALICE)
    assert k.audit.is_file()
    # The audit file's name taken by something kupd cannot open: a reload
    # that keeps audit_log is applied all the same -- and says so.
    k.audit.unlink()
    k.audit.mkdir()
    k.write_config(BOB)
    out = _reload(k)
    lines = out.splitlines()
    (audit,) = [x for x in lines if x.startswith("warning: audit log not re-opened")]
    assert f"cannot open {k.audit}" in audit, out
    assert lines[0].startswith("reloaded: tenants alice, bob;"), out
    assert f"sockets added: {k.sock('bob')}" in lines[0], out
    adv = [x for x in lines if x.startswith("warning: config key ")]
    assert [x.split("'")[1] for x in adv] == POOL, out
    assert "can hold all of device echo's call_channels=1" in adv[0], out
    assert os.path.exists(k.sock("bob"))

    # --json: the same, as fields; a reload that changes nothing still
    # says the audit log was not re-opened, and the advisory stands
    got = _reload(k, "--json")
    assert got["applied"] == [] and got["sessions_ended"] == [], got
    assert f"cannot open {k.audit}" in got["audit_log_error"], got
    assert [w["key"] for w in got["warnings"]] == POOL, got
    assert "set it below call_channels" in got["warnings"][1]["why"], got
    assert got["sockets_added"] == [] and got["sockets_removed"] == [], got

    # The file can be opened again, bob leaves: nothing to warn of
    k.audit.rmdir()
    k.write_config(ALICE)
    got = _reload(k, "--json")
    assert got["audit_log_error"] == "" and got["warnings"] == [], got
    assert got["sockets_removed"] == [k.sock("bob")], got
    assert got["applied"] == ["tenants"], got
    out = _reload(k)
    assert "warning" not in out and "sockets" not in out, out
    assert k.audit.is_file()
    (gone, last) = [x for x in k.audit_lines() if x.get("action") == "reload"][-2:]
    assert last["ok"] is True and "audit_error" not in last, last
    # the audit lines record what the replies said: bob's socket removed,
    # then nothing
    assert gone["sockets_removed"] == [k.sock("bob")] and gone["sockets_added"] == [], gone
    assert gone["warnings"] == [] and gone["calls_refused"] == 0, gone
    assert last["sockets_removed"] == [] and last["warnings"] == [], last


#: bob may Call echo (one pool channel); alice holds sessions too, to free
#: the channel echo keeps locked
CALLERS = """
call_timeout = 3600

[[device]]
name = "echo"
call_channels = 1

[[tenant]]
name = "alice"
socket = "@DIR@/alice.sock"
max_sessions = 4          # with max_message_bytes: no advisory of what
max_message_bytes = 4096  # unfinished requests may hold, only the pool's
[[tenant.grant]]
device = "echo"

[[tenant]]
name = "bob"
socket = "@DIR@/bob.sock"
ops = ["call"]
[[tenant.grant]]
device = "echo"
"""


def test_kupctl_reload_counts_the_queued_calls_the_new_policy_refuses(
    start_tenants: StartTenants,
) -> None:
    """bob's Call runs on echo's one pool channel, his next waits for it;
    a reload takes bob's call op away: the queued Call is refused
    (PERMISSION_DENIED, never sent), the running one runs on -- and the
    reply (kupctl reload) counts the refused one."""
    k = start_tenants(CALLERS)
    with k.client("bob") as b, k.client("alice") as a:
        holds = echo_lock_holds(k.sim)
        running = in_background(lambda: b.call("echo", LOCKHOLD, timeout=600))
        wait_until(lambda: echo_lock_holds(k.sim) > holds, what="echo to hold the Call")
        queued = in_background(lambda: b.call("echo", b"queued", timeout=600))
        wait_until(lambda: b.devices("echo")[0].calls_queued == 1, what="the Call queued")
        k.write_config(CALLERS.replace('ops = ["call"]', 'ops = ["session"]'))
        out = _reload(k)
        assert "; 1 queued Call refused by the new policy" in out, out
        refused = queued.outcome(30)
        assert isinstance(refused, errors.PermissionDenied), refused
        assert "the reloaded policy no longer allows call on device echo" in str(refused)
        with a.open("echo").channel(12) as ch:
            ch.receive(timeout=30)
            assert ch.exchange(b"!lockfree", timeout=30).data == b"!lockfree"
        assert running.outcome(30).data == LOCKHOLD
    got = _reload(k, "--json")
    assert got["calls_refused"] == 0 and got["rpcs_ended"] == {}, got
    audited = [x for x in k.audit_lines() if x.get("action") == "reload"]
    assert [x["calls_refused"] for x in audited] == [1, 0], audited


def test_a_grant_past_the_devices_channels_is_warned_of(start_tenants: StartTenants) -> None:
    """Channel ranges are checked against 0-1023 when the file is read; the
    device's own size is known only once it is there.  "8-200" on echo's
    128 channels (a typo for "8-20", say) is warned of when the device
    appears and in the reply of a reload that keeps it; a reload that
    fixes it says nothing more."""
    past = ALICE.replace('device = "echo"\n', 'device = "echo"\nchannels = "8-200"\n')
    k = start_tenants(past)
    key = "tenant[name=alice].grant[0].channels"
    wait_until(lambda: key in k.log(), what="the grant warned of at the device's appearance")
    (line,) = [json.loads(x) for x in k.log().splitlines() if key in x]
    assert line["event"] == "config key has no effect as set", line
    assert line["why"] == (
        "'8-200' names 73 channels from 128 on, but device echo has 128 (0-127): "
        "tenant alice can use none of them"
    ), line
    got = _reload(k, "--json")
    assert [w["key"] for w in got["warnings"]] == [key], got
    k.write_config(past.replace("8-200", "8-20"))
    assert _reload(k, "--json")["warnings"] == []


def test_a_grant_is_warned_of_again_when_its_device_comes_back_smaller(
    tmp_path: Path,
) -> None:
    """The device's size may change from one appearance to the next (its
    module unloaded and loaded again with another channel count): each
    appearance checks the grants against the size it has then -- echo with
    128 channels, "0-100" is fine; back with 64, it is warned of, once;
    back with 128, not again."""
    rundir = Path(tempfile.mkdtemp(prefix="kupsim-"))
    sockets = socket_dir()
    conf = tmp_path / "kupd.toml"
    conf.write_text(
        f'socket = "{sockets}/kupd.sock"\nkupsim_dir = "{rundir}"\nhealth_interval = 0.2\n'
        'log_level = "info"\n[[device]]\nname = "echo"\ncall_channels = 1\n'
        f'[[tenant]]\nname = "alice"\nsocket = "{sockets}/alice.sock"\n'
        'max_sessions = 4\nmax_message_bytes = 4096\n'
        '[[tenant.grant]]\ndevice = "echo"\nchannels = "0-100"\n'
    )
    key = "tenant[name=alice].grant[0].channels"
    k = start_kupd(config=conf, log=tmp_path / "kupd.log", env=kupd_env(None),
                   health_interval=None, wait=False)  # fmt: skip

    def appeared(n: int, channels: str) -> None:
        env = dict(os.environ, KUP_PARAM_ECHO_CHANNELS=channels)
        with kupsim("echo", rundir=rundir, env=env, check_exit=False, ready_timeout=60.0):
            # the warning is logged right after "device appeared", in order
            wait_until(lambda: k.log().count('"device appeared"') == n, timeout=60,
                       what=f"echo's appearance {n}")  # fmt: skip
        wait_until(lambda: k.log().count('"device gone"') == n, timeout=60,
                   what=f"echo gone {n}")  # fmt: skip

    def warned() -> list[dict[str, Any]]:
        return [json.loads(x) for x in k.log().splitlines() if key in x]

    try:
        appeared(1, "128")
        assert warned() == []
        appeared(2, "64")
        (line,) = warned()
        assert line["event"] == "config key has no effect as set", line
        assert line["why"] == (
            "'0-100' names 37 channels from 64 on, but device echo has 64 (0-63): "
            "tenant alice can use none of them"
        ), line
        appeared(3, "128")
        assert len(warned()) == 1
    finally:
        k.stop()
        shutil.rmtree(rundir, ignore_errors=True)
        shutil.rmtree(sockets, ignore_errors=True)
