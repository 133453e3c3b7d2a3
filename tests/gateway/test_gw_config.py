"""kupd.config in-process: validation names the key, flags override."""

from __future__ import annotations

from pathlib import Path

import pytest

from kupd.config import ConfigError, load_config, parse_config

DEV = {"device": [{"name": "echo"}]}


@pytest.mark.parametrize(
    ("doc", "key"),
    [
        ({"socket": 5, **DEV}, "socket"),
        ({"lease_idle_timeout": 0, **DEV}, "lease_idle_timeout"),
        ({"drain_grace": -1, **DEV}, "drain_grace"),
        ({"max_sessions": True, **DEV}, "max_sessions"),
        ({"metrics_port": 70000, **DEV}, "metrics_port"),
        ({"log_level": "loud", **DEV}, "log_level"),
        ({"device": {"name": "echo"}}, "device"),
        ({"device": [{"call_channels": 1}]}, "device[0].name"),
        ({"device": [{"name": "echo", "colour": "red"}]}, "device[0].colour"),
        ({"device": [{"name": "x" * 40}]}, "device[0].name"),
        # longer than sockaddr_un's sun_path: could never be bound
        ({"socket": "/run/" + "d" * 110 + "/kupd.sock", **DEV}, "socket"),
        ({"admin_socket": "/run/" + "d" * 110 + "/admin.sock", **DEV}, "admin_socket"),
        # names kupdev_create would refuse: no module could ever publish them
        ({"device": [{"name": "echo:4x"}]}, "device[0].name"),
        ({"device": [{"name": ".echo"}]}, "device[0].name"),
        ({"device": [{"name": "my echo"}]}, "device[0].name"),
        ({}, "device"),
    ],
)
def test_invalid_values_name_their_key(doc: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config(doc)
    assert ei.value.key == key
    assert f"'{key}'" in str(ei.value)


def test_defaults_and_overrides(tmp_path: Path) -> None:
    cfg = parse_config(DEV)
    assert cfg.socket == "/run/kupd/kupd.sock" and cfg.lock_path == cfg.socket + ".lock"
    f = tmp_path / "k.toml"
    f.write_text('socket = "/a.sock"\npid_file = "-"\n[[device]]\nname = "echo"\n')
    cfg = load_config(f, {"socket": "/b.sock", "call_timeout": None, "devices": ["rot13"]})
    assert cfg.socket == "/b.sock" and cfg.pid_path == ""
    assert [d.name for d in cfg.devices] == ["rot13"] and cfg.call_timeout == 10.0
    with pytest.raises(ConfigError, match="'lease_idle_timeout'"):
        load_config(f, {"lease_idle_timeout": -2.0})


def test_device_names_and_paths_that_are_accepted() -> None:
    names = ["echo", "rot13", "a.b-c_D9", "-x", "/run/kupsim/echo.sock", "/odd:dir/echo.sock"]
    cfg = parse_config({"device": [{"name": n} for n in names]})
    assert [d.name for d in cfg.devices] == names
