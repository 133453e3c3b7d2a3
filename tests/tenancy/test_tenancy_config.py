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
        (_tenant(socket="relative.sock"), "tenant[0].socket"),
        (_tenant(mode="0666"), "tenant[0].mode"),
        (_tenant(ops=["session", "teleport"]), "tenant[0].ops"),
        (_tenant(owner="no-such-user-kupd"), "tenant[0].owner"),
        (_tenant(group="no-such-group-kupd"), "tenant[0].group"),
        (_tenant(max_sessions=-1), "tenant[0].max_sessions"),
        (_tenant(calls_per_second="fast"), "tenant[0].calls_per_second"),
        # TOML has nan and inf: both read as no limit at all
        (_tenant(calls_per_second=float("nan")), "tenant[0].calls_per_second"),
        (_tenant(calls_per_second=float("inf")), "tenant[0].calls_per_second"),
        (_tenant(grant=[{"device": "nope"}]), "tenant[0].grant[0].device"),
        (_tenant(grant=[{"device": "echo", "channels": "9-3"}]), "tenant[0].grant[0].channels"),
        (_tenant(grant=[{"device": "echo", "chans": "1"}]), "tenant[0].grant[0].chans"),
        (_tenant(colour="blue"), "tenant[0].colour"),
        (_tenant(name="admin"), "tenant[0].name"),
    ],
)
def test_tenant_errors_name_their_key(tenant: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config({**BASE, "tenant": [tenant]})
    assert ei.value.key == key, ei.value


def test_duplicate_tenant_socket() -> None:
    with pytest.raises(ConfigError, match=r"tenant\[1\]\.socket"):
        parse_config({**BASE, "tenant": [_tenant(), _tenant(name="u")]})


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
