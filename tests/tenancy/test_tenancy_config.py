"""Tenant configuration: every error names its key; an unsafe socket
directory stops kupd before it serves anything."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from tenancy_helpers import child_env, run_module

from kupd.config import ConfigError, parse_config
from kupd.testing import start_kupd

BASE = {"device": [{"name": "echo"}]}


def _tenant(**kw: object) -> dict[str, object]:
    return {"name": "t", "socket": "/run/kupd/t/t.sock", **kw}


@pytest.mark.parametrize(
    ("tenant", "key"),
    [
        (_tenant(socket="relative.sock"), "tenant[name=t].socket"),
        (_tenant(mode="0666"), "tenant[name=t].mode"),
        (_tenant(ops=["session", "teleport"]), "tenant[name=t].ops"),
        (_tenant(owner="no-such-user-kupd"), "tenant[name=t].owner"),
        (_tenant(group="no-such-group-kupd"), "tenant[name=t].group"),
        (_tenant(max_sessions=-1), "tenant[name=t].max_sessions"),
        (_tenant(calls_per_second="fast"), "tenant[name=t].calls_per_second"),
        # TOML has nan and inf: both read as no limit at all
        (_tenant(calls_per_second=float("nan")), "tenant[name=t].calls_per_second"),
        (_tenant(calls_per_second=float("inf")), "tenant[name=t].calls_per_second"),
        (_tenant(channel_ops_per_second=-2), "tenant[name=t].channel_ops_per_second"),
        (_tenant(channel_ops_per_second=True), "tenant[name=t].channel_ops_per_second"),
        (
            _tenant(channel_ops_per_second=float("nan")),
            "tenant[name=t].channel_ops_per_second",
        ),
        (_tenant(grant=[{"device": "nope"}]), "tenant[name=t].grant[0].device"),
        (
            _tenant(grant=[{"device": "echo", "channels": "9-3"}]),
            "tenant[name=t].grant[0].channels",
        ),
        (_tenant(grant=[{"device": "echo", "chans": "1"}]), "tenant[name=t].grant[0].chans"),
        (_tenant(colour="blue"), "tenant[name=t].colour"),
        # the name is the problem, or there is none: by index
        (_tenant(name="admin"), "tenant[0].name"),
        (_tenant(name="a b"), "tenant[0].name"),
        ({"socket": "/run/kupd/t/t.sock"}, "tenant[0].name"),
        ({"socket": "/run/kupd/t/t.sock", "colour": "blue"}, "tenant[0].colour"),
    ],
)
def test_tenant_errors_name_their_key(tenant: dict[str, object], key: str) -> None:
    """A tenant's key is named by the tenant's name (an index shifts as
    tables are added, and the operator looks for the name) -- by its index
    when the name is missing or is itself the problem."""
    first = _tenant(name="first", socket="/run/kupd/t/f.sock")  # the tenant is the second
    with pytest.raises(ConfigError) as ei:
        parse_config({**BASE, "tenant": [first, tenant]})
    want = key.replace("tenant[0]", "tenant[1]")
    assert ei.value.key == want, ei.value
    assert f"config key {want!r}" in str(ei.value), ei.value


def test_duplicate_tenants() -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config({**BASE, "tenant": [_tenant(), _tenant(name="u")]})
    assert ei.value.key == "tenant[name=u].socket", ei.value
    assert "already used by tenant 't'" in str(ei.value), ei.value
    # a duplicate name is named by index (by name it would be both): and
    # before any other error of the two, which could name neither
    dup = [_tenant(), _tenant(socket="/run/kupd/t/u.sock", mode="0666")]
    with pytest.raises(ConfigError) as ei:
        parse_config({**BASE, "tenant": dup})
    assert ei.value.key == "tenant[1].name", ei.value
    assert "duplicate tenant 't' (also tenant[0])" in str(ei.value), ei.value


def _one_tenant(tmp_path: Path, socket: str) -> Path:
    """A config of one tenant "t" on ``socket`` (echo, no kupsim behind it)."""
    cfg = tmp_path / "kupd.toml"
    cfg.write_text(
        f'socket = "{tmp_path}/kupd.sock"\n'
        f'kupsim_dir = "{tmp_path}/nosim"\n'
        '[[device]]\nname = "echo"\n'
        f'[[tenant]]\nname = "t"\nsocket = "{socket}"\n'
    )
    return cfg


def test_unsafe_socket_directory_is_refused(tmp_path: Path) -> None:
    d = Path(tempfile.mkdtemp(prefix="kupd-unsafe-"))
    try:
        d.chmod(0o777)  # anyone could replace the socket
        out = run_module("kupd.daemon", "--config", str(_one_tenant(tmp_path, f"{d}/t.sock")))
        assert out.returncode == 1, out
        assert "writable by nobody else" in out.stderr, out.stderr
        # the key to edit, not only the path (a directory several keys share)
        last = out.stderr.splitlines()[-1]  # after kupd's log lines
        assert last.startswith("kupd: config key 'tenant[name=t].socket': socket directory"), last
        assert not (d / "t.sock").exists()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_a_socket_below_a_directory_others_may_rename_in_is_refused(tmp_path: Path) -> None:
    """The socket's own directory is kupd's and 0755, but the one above it
    is writable by anyone without the sticky bit: anyone could rename the
    socket's directory away and put one of their own in its place."""
    d = Path(tempfile.mkdtemp(prefix="kupd-unsafe-"))
    try:
        d.chmod(0o777)
        (d / "sub").mkdir(mode=0o755)
        cfg = _one_tenant(tmp_path, f"{d}/sub/t.sock")
        out = run_module("kupd.daemon", "--config", str(cfg))
        assert out.returncode == 1, out
        assert f"directory {d} above the socket {d}/sub/t.sock" in out.stderr, out.stderr
        assert not (d / "sub" / "t.sock").exists()
        d.chmod(0o1777)  # sticky, as /tmp: nobody renames what they do not own
        k = start_kupd(
            config=cfg,
            log=tmp_path / "kupd.log",
            health_socket=f"{d}/sub/t.sock",
            health_interval=None,
            env=child_env(None),
            wait=False,
        )
        try:
            k.wait_up()  # serving t.sock (NOT_SERVING: no kupsim there)
        finally:
            k.stop()
    finally:
        shutil.rmtree(d, ignore_errors=True)
