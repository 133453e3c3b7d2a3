"""kupd.config in-process: validation names the key, flags override."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kupd.config import ConfigError, load_config, parse_config

DEV = {"device": [{"name": "echo"}]}


def test_reattach_grace_is_seconds_zero_included() -> None:
    """reattach_grace: 10 s unless set; 0 (no retry) is a value, a negative
    or non-finite one is refused naming the key."""
    assert parse_config(DEV).reattach_grace == 10.0
    assert parse_config({"reattach_grace": 0, **DEV}).reattach_grace == 0.0
    assert parse_config({"reattach_grace": 2.5, **DEV}).reattach_grace == 2.5
    with pytest.raises(ConfigError, match=r"'reattach_grace': must be >= 0, not -0\.5"):
        parse_config({"reattach_grace": -0.5, **DEV})
    with pytest.raises(ConfigError, match="'reattach_grace': must be a finite number"):
        parse_config({"reattach_grace": float("nan"), **DEV})


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
        # TOML has nan and inf; each passed "> 0" and failed later
        ({"lease_idle_timeout": float("nan"), **DEV}, "lease_idle_timeout"),
        ({"call_timeout": float("inf"), **DEV}, "call_timeout"),
        ({"keepalive_time": float("inf"), **DEV}, "keepalive_time"),
        ({"keepalive_timeout": 1e300, **DEV}, "keepalive_timeout"),  # gRPC: int32 ms
        ({"max_sessions": 2**31, **DEV}, "max_sessions"),  # + 1024: gRPC's int32
        ({"health_interval": 1e-6, **DEV}, "health_interval"),  # would spin a core
        ({"device": [{"name": "echo"}, {"name": "echo"}]}, "device[1].name"),
        # a socket is another socket or a file kupd writes: binding it would
        # replace that file (the lock file: a second kupd could start)
        ({"socket": "/run/k/a.sock", "admin_socket": "/run/k/./a.sock", **DEV}, "admin_socket"),
        ({"socket": "/run/k/a.sock", "lock_file": "/run/k//a.sock", **DEV}, "socket"),
        ({"socket": "/run/k/a.sock", "pid_file": "/run/k/a.sock", **DEV}, "socket"),
        ({"socket": "/run/k/a.sock", "audit_log": "/run/k/a.sock", **DEV}, "socket"),
    ],
)
def test_invalid_values_name_their_key(doc: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config(doc)
    assert ei.value.key == key
    assert f"'{key}'" in str(ei.value)


@pytest.mark.parametrize("address", ["127.0.0.2", "0.0.0.0", "10.0.0.1"])
def test_metrics_address_refusal_names_the_accepted_addresses(address: str) -> None:
    """127.0.0.2 is a loopback address: the refusal must not say it is
    not one, but name the addresses kupd accepts."""
    with pytest.raises(ConfigError) as ei:
        parse_config({"metrics_address": address, **DEV})
    assert ei.value.key == "metrics_address"
    assert ei.value.problem == (
        f"must be one of the loopback addresses 127.0.0.1, ::1, localhost, not {address!r}"
    )


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


def test_duplicate_device_flags_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'device\[1\]\.name'.*duplicate device 'echo'"):
        load_config(None, {"devices": ["echo", "echo"]})


def test_a_config_that_cannot_be_read_as_toml_text_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^flag --config: cannot read .*: Is a directory"):
        load_config(tmp_path)
    binary = tmp_path / "k.toml"
    binary.write_bytes(b"socket = \"\xff\xfe\"\n")
    with pytest.raises(ConfigError, match=r"^flag --config: .* is not UTF-8 text"):
        load_config(binary)


def test_tenant_sockets_spelled_differently_are_the_same_socket() -> None:
    tenants = [
        {"name": "a", "socket": "/run/k/t/ab.sock", "grant": [{"device": "echo"}]},
        {"name": "b", "socket": "/run/k/t/./ab.sock", "grant": [{"device": "echo"}]},
    ]
    with pytest.raises(ConfigError) as ei:
        parse_config({**DEV, "tenant": tenants})
    assert ei.value.key == "tenant[name=b].socket"
    admin = [{"name": "a", "socket": "/run/k//admin.sock", "grant": [{"device": "echo"}]}]
    with pytest.raises(ConfigError, match="kupd's own admin_socket") as ei:
        parse_config({**DEV, "admin_socket": "/run/k/admin.sock", "tenant": admin})
    assert ei.value.key == "tenant[name=a].socket"


def test_an_unknown_kup_backend_is_named_at_start(tmp_path: Path) -> None:
    """KUP_BACKEND=garbage made libkup refuse every device with a bare
    EKU_INVAL; kupd names the variable and exits 2 before serving."""
    env = {**os.environ, "KUP_BACKEND": "linx"}
    sock = str(tmp_path / "k.sock")
    proc = subprocess.run(
        [sys.executable, "-m", "kupd.daemon", "--socket", sock, "--device", "echo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc
    assert "KUP_BACKEND='linx': not a libkup backend (sim, linux, freebsd" in proc.stderr
    assert not Path(sock).exists()


def test_an_error_names_the_file_or_the_flag_its_value_came_from(tmp_path: Path) -> None:
    """An operator with a file and flags (a unit's ExecStart adds some) is
    told which of them holds the bad value, not only the key's name."""
    f = tmp_path / "k.toml"
    f.write_text('call_timout = 1\n[[device]]\nname = "echo"\n')
    with pytest.raises(ConfigError) as ei:
        load_config(f)  # a key of the file itself (built from the file alone)
    assert str(ei.value) == f"{f}:1: config key 'call_timout': unknown key"
    assert ei.value.key == "call_timout" and ei.value.source == f"{f}:1"
    f.write_text('lease_idle_timeout = -1\n[[device]]\nname = "echo"\n')
    with pytest.raises(ConfigError) as ei:
        load_config(f)  # a rule checked once flags are applied: still the file's
    assert str(ei.value).startswith(f"{f}:1: config key 'lease_idle_timeout': must be > 0")
    f.write_text('[[device]]\nname = "echo"\n')
    with pytest.raises(ConfigError) as ei:
        load_config(f, {"lease_idle_timeout": -2.0})
    assert str(ei.value).startswith("flag --lease-idle-timeout: config key 'lease_idle_timeout'")
    with pytest.raises(ConfigError) as ei:
        load_config(f, {"devices": ["echo", "echo"]})
    assert str(ei.value).startswith("flag --device: config key 'device[1].name': duplicate")
    with pytest.raises(ConfigError) as ei:
        load_config(None, {"devices": [{"name": "bad name"}]})
    assert str(ei.value).startswith("flag --device: config key 'device[0].name'")
    # no file and no flag (a dict): as before, the key alone
    with pytest.raises(ConfigError) as ei:
        parse_config({**DEV, "call_timeout": -1})
    assert str(ei.value).startswith("config key 'call_timeout'")


def test_kupd_names_the_config_file_at_start(tmp_path: Path) -> None:
    bad = tmp_path / "kupd.toml"
    bad.write_text('log_level = "verbose"\n[[device]]\nname = "echo"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "kupd.daemon", "--config", str(bad),
         "--socket", str(tmp_path / "k.sock")],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 2, proc
    assert proc.stderr == (
        f"kupd: {bad}:1: config key 'log_level': must be one of debug, info, warning, "
        "error, not 'verbose'\n"
    )


def test_socket_mode_with_tenants_is_said_to_have_no_effect() -> None:
    """With [[tenant]] tables the plain socket is not served: a socket_mode
    set there (meant for the tenants' sockets, say) changes nothing, which
    kupd says at start and at a reload, as for max_connections."""
    from kupd.config import advisories

    tenant = {"name": "t", "socket": "/run/k/t/t.sock", "grant": [{"device": "echo"}],
              "max_sessions": 4, "max_calls_in_flight": 4}
    cfg = parse_config({**DEV, "socket_mode": "0600", "tenant": [tenant]})
    said = dict(advisories(cfg))
    assert said.get("socket_mode", "").startswith("0600 is unused with [[tenant]] tables"), said
    # the default (the sample sets it, next to its tenants): nothing to say
    assert "socket_mode" not in dict(advisories(parse_config({**DEV, "tenant": [tenant]})))
    # without tenants it is the plain socket's mode: nothing to say
    assert "socket_mode" not in dict(advisories(parse_config({**DEV, "socket_mode": "0600"})))


def test_grants_are_checked_against_the_devices_flag_when_it_replaces_the_files(
    tmp_path: Path,
) -> None:
    """--device replaces the file's device list: a tenant granted a device
    only the flag names is accepted (it was refused against the file's
    list), and one granted a device the flag dropped is refused naming
    what kupd serves."""
    f = tmp_path / "k.toml"
    f.write_text(
        '[[device]]\nname = "echo"\n'
        '[[tenant]]\nname = "t"\nsocket = "/run/k/t/t.sock"\n'
        '[[tenant.grant]]\ndevice = "rot13"\n'
    )
    with pytest.raises(ConfigError) as ei:
        load_config(f)
    assert ei.value.key == "tenant[name=t].grant[0].device"
    cfg = load_config(f, {"devices": ["rot13"]})
    assert [d.name for d in cfg.devices] == ["rot13"]
    assert cfg.tenants[0].grants is not None and cfg.tenants[0].grants[0].device == "rot13"
    with pytest.raises(ConfigError) as ei:
        load_config(f, {"devices": ["echo", "other"]})
    assert ei.value.key == "tenant[name=t].grant[0].device"
    assert ei.value.problem == "no [[device]] named 'rot13' (kupd serves echo, other)"


def test_a_config_file_that_cannot_be_read_is_named_as_the_flags(tmp_path: Path) -> None:
    """Not "config key '--config'" (no such key): the flag and its file."""
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as ei:
        load_config(missing)
    assert str(ei.value) == f"flag --config: no such file: {missing}"
    broken = tmp_path / "k.toml"
    broken.write_text('[[device]]\nname = "echo\n')
    with pytest.raises(ConfigError) as ei:
        load_config(broken)
    assert str(ei.value).startswith(f"flag --config: {broken} is not valid TOML: ")
    assert "(at line 2, column 13)" in str(ei.value), ei.value


def test_a_tenant_that_may_do_nothing_is_warned_of_and_a_missing_socket_named() -> None:
    """Default deny is right, but a tenant whose [[tenant.grant]] the
    operator forgot (or whose ops list is empty) gets a socket that serves
    nothing at all, and said nothing of it; a tenant without a socket was
    'must be an absolute path, not None'."""
    from kupd.config import advisories

    base = {"name": "t", "socket": "/run/k/t/t.sock", "max_sessions": 4,
            "max_calls_in_flight": 4, "max_message_bytes": 4096}
    said = dict(advisories(parse_config({**DEV, "tenant": [base]})))
    assert said.get("tenant[name=t].grant", "").startswith("none: tenant t may use no device")
    granted = {**base, "grant": [{"device": "echo"}]}
    assert advisories(parse_config({**DEV, "tenant": [granted]})) == []
    said = dict(advisories(parse_config({**DEV, "tenant": [{**granted, "ops": []}]})))
    assert said.get("tenant[name=t].ops", "").startswith("empty: tenant t may do nothing")
    with pytest.raises(ConfigError) as ei:
        parse_config({**DEV, "tenant": [{"name": "t"}]})
    assert str(ei.value) == (
        "config key 'tenant[name=t].socket': is required: the absolute path of its socket"
    )


def test_the_line_of_a_key_is_found_in_its_table() -> None:
    """key_line: the line an error's key is set on, in the table the key
    names (a tenant by its name, a device or grant by its place); none when
    it cannot be told for sure."""
    from kupd.config import key_line

    text = (
        "# kupd\n"                                      # 1
        "call_timeout = 5\n"                            # 2
        "[[device]]\n"                                  # 3
        'name = "echo"\n'                               # 4
        "[[device]]\n"                                  # 5
        'name = "rot13"   # the other\n'                # 6
        "call_channels = 2\n"                           # 7
        "[[tenant]]\n"                                  # 8
        'name = "alice"\n'                              # 9
        'mode = "0600"\n'                               # 10
        "[[tenant.grant]]\n"                            # 11
        'device = "echo"\n'                             # 12
        "[[tenant.grant]]\n"                            # 13
        'device = "rot13"\n'                            # 14
        'channels = "1-2"\n'                            # 15
        "[[ tenant ]]\n"                                # 16
        "name = 'bob'\n"                                # 17
        'mode = "0660"\n'                               # 18
        "[[tenant.grant]]\n"                            # 19
        'device = "echo"\n'                             # 20
        'channels = "3"\n'                              # 21
    )
    assert key_line(text, "call_timeout") == 2
    assert key_line(text, "device[1].name") == 6
    assert key_line(text, "device[1].call_channels") == 7
    assert key_line(text, "tenant[name=alice].mode") == 10
    assert key_line(text, "tenant[name=bob].mode") == 18
    assert key_line(text, "tenant[1].name") == 17
    assert key_line(text, "tenant[name=alice].grant[1].channels") == 15
    assert key_line(text, "tenant[name=bob].grant[0].channels") == 21
    # not in the file, or not told for sure: no line rather than a wrong one
    assert key_line(text, "device[0].call_channels") is None
    assert key_line(text, "tenant[name=carol].mode") is None
    assert key_line(text, "tenant[name=alice].grant[2].device") is None
    assert key_line(text, "log_level") is None
    assert key_line('a = { call_timeout = 1 }\n', "call_timeout") is None
