"""kupd's metrics over the admin socket: ``Admin.GetMetrics``,
``AdminClient.metrics``, ``kupctl metrics`` and ``kupctl stats --admin``,
against a real kupd (admin socket and loopback endpoint both on) and kupsim.

Why: the loopback endpoint is readable by every local user
(docs/security.md); the admin socket gives the operator the same figures
with no port opened."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_gateway import console_script
from prometheus_client.parser import text_string_to_metric_families

from kupclient import Client
from kupclient import errors as kerr
from kupclient.admin import AdminClient
from kupclient.admin import main as admin_main
from kupd.testing import REPO_ROOT, Kupd, kupsim, start_kupd, with_metrics_port

EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_INVALID_ARGUMENT = 8
TIMEOUT = 60.0


@pytest.fixture(scope="module")
def kupd_admin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Kupd, str]]:
    """kupd serving echo (a 2-channel Call pool) with an admin socket and a
    metrics endpoint."""
    tmp = tmp_path_factory.mktemp("metrics")
    with kupsim("echo", check_exit=False) as sim:
        admin = str(tmp / "admin.sock")
        conf = tmp / "kupd.toml"
        conf.write_text(
            f'socket = "{tmp}/kupd.sock"\n'
            f'admin_socket = "{admin}"\n'
            f'kupsim_dir = "{sim.rundir}"\n'
            '[[device]]\nname = "echo"\ncall_channels = 2\n'
        )
        k = with_metrics_port(
            lambda port: start_kupd(
                "--metrics-port",
                str(port),
                config=conf,
                socket=tmp / "kupd.sock",
                log=tmp / "kupd.log",
                sim=sim,
            )
        )
        try:
            yield k, admin
        finally:
            k.stop()


def _kupctl(k: Kupd, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(console_script("kupctl")), *args],
        capture_output=True, text=True, env=k.env(), timeout=TIMEOUT, check=False,
    )  # fmt: skip


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_admin_metrics_are_the_endpoints(kupd_admin: tuple[Kupd, str]) -> None:
    k, admin = kupd_admin
    with Client(k.socket) as c:
        for i in range(3):
            c.call("echo", f"metric {i}".encode())
    with AdminClient(admin) as a:
        text = a.metrics()
    with urllib.request.urlopen(k.metrics_url, timeout=TIMEOUT) as resp:
        served = resp.read().decode()
    ours, theirs = _samples(text), _samples(served)
    # the same series (values of gauges and timestamps may move in between:
    # compare the names and labels, and the Call count, which nothing else bumps)
    assert ours.keys() == theirs.keys()
    calls = {key: v for key, v in ours.items() if key[0] == "kupd_calls_total"}
    assert sum(calls.values()) >= 3, calls
    assert any(dict(key[1]).get("device") == "echo" for key in calls), calls


def test_every_family_is_named_in_gateway_md(kupd_admin: tuple[Kupd, str]) -> None:
    """docs/gateway.md's Metrics section names every metric family kupd
    serves (but the ``_created`` timestamps prometheus_client adds), by the
    name a sample is printed with."""
    _, admin = kupd_admin
    with AdminClient(admin) as a:
        text = a.metrics()
    doc = (REPO_ROOT / "docs" / "gateway.md").read_text()
    section = doc.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    printed = {
        f.name + "_total" if f.type == "counter" else f.name
        for f in text_string_to_metric_families(text)
        if not f.name.endswith("_created")
    }
    assert "kupd_calls_total" in printed and "kupd_tenant_paced_total" in printed, printed
    missing = sorted(name for name in printed if f"`{name}`" not in section)
    assert not missing, f"metric families not in docs/gateway.md's Metrics section: {missing}"


def test_prefix_keeps_only_matching_families(kupd_admin: tuple[Kupd, str]) -> None:
    k, admin = kupd_admin
    with AdminClient(admin) as a:
        text = a.metrics("kupd_calls")
        assert a.metrics("no_such_family") == ""
        with pytest.raises(kerr.InvalidArgument, match=r"metrics prefix '9x' cannot start"):
            a.metrics("9x")
        with pytest.raises(kerr.InvalidArgument, match=r"metrics prefix 'a b' cannot start"):
            a.metrics("a b")
    names = {f.name for f in text_string_to_metric_families(text)}
    assert names and all(n.startswith("kupd_calls") for n in names), names
    assert "kupd_calls" in names
    # a counter is printed as NAME_total: that name, copied from the text,
    # selects it too (the parser reads its _created samples as a family)
    with Client(k.socket) as c:
        c.call("echo", b"counted")
    with AdminClient(admin) as a:
        total = a.metrics("kupd_calls_total")
    got = {f.name for f in text_string_to_metric_families(total)}
    assert "kupd_calls" in got and got <= {"kupd_calls", "kupd_calls_created"}, got


def test_prefix_selects_a_counter_with_no_samples_by_its_printed_name(
    kupd_admin: tuple[Kupd, str],
) -> None:
    """A counter nothing has counted yet prints only its ``# HELP`` and
    ``# TYPE kupd_tenant_paced_total counter`` lines: the name those lines
    show selects it as well (it was "no metric family starting with ...",
    exit 3, until the first sample)."""
    k, admin = kupd_admin
    with AdminClient(admin) as a:
        text = a.metrics("kupd_tenant_paced_total")  # no channel_ops_per_second: never paced
    assert text.splitlines() == [
        "# HELP kupd_tenant_paced_total Channel operations that waited for their turn "
        "under channel_ops_per_second",
        "# TYPE kupd_tenant_paced_total counter",
    ], text
    p = _kupctl(k, "metrics", "--admin-socket", admin, "--prefix", "kupd_tenant_paced_total")
    assert p.returncode == 0 and p.stdout.startswith("# HELP kupd_tenant_paced_total "), p


def test_kupctl_metrics(kupd_admin: tuple[Kupd, str]) -> None:
    k, admin = kupd_admin
    _kupctl(k, "call", "echo", "kupctl metrics")
    p = _kupctl(k, "metrics", "--admin-socket", admin, "--prefix", "kupd_calls")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("# HELP kupd_calls"), p.stdout
    doc = json.loads(_kupctl(k, "--json", "metrics", "--admin-socket", admin).stdout)
    assert {"name", "labels", "value"} <= doc[0].keys()
    assert any(
        s["name"] == "kupd_calls_total" and s["labels"].get("device") == "echo" and s["value"] >= 1
        for s in doc
    ), doc
    # $KUPD_ADMIN_SOCKET as for every admin command
    env = {**k.env(), "KUPD_ADMIN_SOCKET": admin}
    p = subprocess.run(
        [str(console_script("kupctl")), "metrics", "--prefix", "kupd_sessions"],
        capture_output=True, text=True, env=env, timeout=TIMEOUT, check=False,
    )  # fmt: skip
    assert p.returncode == 0 and "# TYPE kupd_sessions gauge" in p.stdout, p


def test_kupctl_metrics_bad_input(kupd_admin: tuple[Kupd, str]) -> None:
    k, admin = kupd_admin
    p = _kupctl(k, "metrics", "--admin-socket", admin, "--prefix", "nosuch")
    assert p.returncode == EXIT_NOT_FOUND, p.stderr
    assert p.stderr == "kupctl: NotFound: kupd has no metric family starting with 'nosuch'\n"
    p = _kupctl(k, "metrics", "--admin-socket", admin, "--prefix", "kupd-calls")
    assert p.returncode == EXIT_INVALID_ARGUMENT, p.stderr
    want = "kupctl: InvalidArgument: EKU_INVAL: metrics prefix 'kupd-calls' cannot start"
    assert p.stderr.startswith(want), p.stderr
    # the tenants' socket serves no Admin method
    p = _kupctl(k, "metrics", "--admin-socket", k.socket)
    assert p.returncode == EXIT_NOT_FOUND, p.stderr
    assert "does not serve" in p.stderr


def test_kupctl_stats_over_the_admin_socket(kupd_admin: tuple[Kupd, str]) -> None:
    k, admin = kupd_admin
    for i in range(2):
        _kupctl(k, "call", "echo", f"stats {i}")
    via_admin = json.loads(_kupctl(k, "--json", "stats", "--admin-socket", admin).stdout)
    pool = [r for r in via_admin["channels"] if r["device"] == "echo"]
    assert sum(int(r["msgs_to_kernel"]) for r in pool) >= 2, via_admin
    # --admin takes the socket from $KUPD_ADMIN_SOCKET; the table as from the endpoint
    env = {**k.env(), "KUPD_ADMIN_SOCKET": admin}
    p = subprocess.run(
        [str(console_script("kupctl")), "stats", "--admin"],
        capture_output=True, text=True, env=env, timeout=TIMEOUT, check=False,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[0].split()[:3] == ["DEVICE", "CHANNEL", "MSGS_TO_KERNEL"]
    via_http = json.loads(_kupctl(k, "--json", "stats", "--metrics", k.metrics_url).stdout)
    assert [r["device"] for r in via_http["devices"]] == [
        r["device"] for r in via_admin["devices"]
    ]


def test_kupctl_stats_without_tenants(kupd_admin: tuple[Kupd, str]) -> None:
    """A kupd without [[tenant]] tables: its only tenant is "default" (and
    the admin socket's "admin", which is none): no TENANT table, one line
    that says so, and no rows in --json, from either source."""
    k, admin = kupd_admin
    _kupctl(k, "call", "echo", "no tenants")
    for source in (["--admin-socket", admin], ["--metrics", k.metrics_url]):
        p = _kupctl(k, "stats", *source)
        assert p.returncode == 0, p.stderr
        assert p.stdout.splitlines()[-1] == "no tenants", p.stdout
        assert "TENANT" not in p.stdout, p.stdout
        doc = json.loads(_kupctl(k, "--json", "stats", *source).stdout)
        assert doc["tenants"] == [], doc


def test_kupctl_stats_one_source_only(kupd_admin: tuple[Kupd, str]) -> None:
    k, admin = kupd_admin
    for extra in (["--admin"], ["--admin-socket", admin]):
        p = _kupctl(k, "stats", "--metrics", k.metrics_url, *extra)
        assert p.returncode == EXIT_USAGE, p.stderr
        assert "argument --metrics: not with --admin / --admin-socket" in p.stderr, p.stderr
    # an unreachable admin socket: the hint names the admin socket, not kupd's
    gone = str(Path(admin).parent / "gone.sock")
    p = _kupctl(k, "stats", "--admin-socket", gone)
    assert p.returncode == 17, p.stderr
    assert gone in p.stderr and "--admin-socket" in p.stderr, p.stderr


def test_admin_module_command(
    kupd_admin: tuple[Kupd, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, admin = kupd_admin
    assert admin_main(["--socket", admin, "metrics", "--prefix", "kupd_leases"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# HELP kupd_leases"), out
