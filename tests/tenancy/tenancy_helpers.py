"""Helpers for the multi-tenant tests: a kupd subprocess started from a TOML
config with tenants, an admin socket and an audit log."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kupd.testing import REPO_ROOT, KupSim, kupd_env, start_kupd

CLIENTS = str(REPO_ROOT / "clients" / "python")
if CLIENTS not in sys.path:
    sys.path.insert(0, CLIENTS)

from kupclient import Client  # noqa: E402
from kupclient.admin import AdminClient  # noqa: E402

START_TIMEOUT = 60.0
NOBODY = 65534
#: Handing a socket to another user needs root; unprivileged runs give the
#: tenants' sockets to the current user (and skip the identity test).
AS_ROOT = os.geteuid() == 0
OWNER = NOBODY if AS_ROOT else os.geteuid()
GROUP = NOBODY if AS_ROOT else os.getegid()


def child_env(sim: KupSim | None) -> dict[str, str]:
    """The environment kupd children get (see kupd.testing.kupd_env)."""
    return kupd_env(sim)


def run_module(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m MODULE ARGS`` from this tree (kupd, kupclient.admin,
    kupclient.kupctl): output captured as text, a hang bounded."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        env=child_env(None),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def socket_dir() -> Path:
    """A root-owned 0755 directory for sockets (tmp_path is 0700: other
    users could not even reach a socket in it)."""
    d = Path(tempfile.mkdtemp(prefix="kupd-tn-"))
    d.chmod(0o755)
    return d


def write_server_config(d: Path, sim: KupSim, body: str, head: str = "") -> Path:
    """``d``/kupd.toml for a kupd Server run in the test's own process:
    its plain socket and audit log in ``d``, ``sim``'s echo and rot13, then
    ``head`` (top-level keys) and ``body`` (tenants, "@DIR@" standing for
    ``d``).  Replaced whole (a rename), as an operator's edit would be, so
    a reload never reads half a file."""
    path = d / "kupd.toml"
    tmp = d / "kupd.tmp"
    tmp.write_text(
        f'socket = "{d}/kupd.sock"\n'
        f'audit_log = "{d}/audit.log"\n'
        f'kupsim_dir = "{sim.rundir}"\n'
        + head
        + '[[device]]\nname = "echo"\n[[device]]\nname = "rot13"\n'
        + body.replace("@DIR@", str(d))
    )
    os.replace(tmp, path)
    return path


class TenantKupd:
    def __init__(self, sockdir: Path, sim: KupSim, body: str, log: Path) -> None:
        self.dir = sockdir
        self.sim = sim
        self.config = sockdir / "kupd.toml"
        self.admin_socket = str(sockdir / "admin.sock")
        #: head() writes these: a test changes one, then write_config()
        #: (audit_lines() reads the file self.audit names).
        self.socket = sockdir / "kupd.sock"
        self.audit = sockdir / "audit.log"
        self.health_interval = 0.2
        self.log_path = log
        self.write_config(body)
        # Everything but the environment comes from the config file; the
        # health check is asked on the admin socket (tenants have no default).
        self.kupd = start_kupd(
            config=self.config,
            log=log,
            health_socket=self.admin_socket,
            health_interval=None,
            env=child_env(sim),
            start_timeout=START_TIMEOUT,
        )
        self.proc = self.kupd.proc

    def head(self) -> str:
        return (
            f'socket = "{self.socket}"\n'
            f'admin_socket = "{self.admin_socket}"\n'
            f'audit_log = "{self.audit}"\n'
            f'kupsim_dir = "{self.sim.rundir}"\n'
            f"health_interval = {self.health_interval}\n"
        )

    def write_config(self, body: str) -> None:
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(self.head() + body.replace("@DIR@", str(self.dir)))
        os.replace(tmp, self.config)  # a reload never sees half a file

    def sock(self, tenant: str) -> str:
        return str(self.dir / f"{tenant}.sock")

    def client(self, tenant: str, **kw: Any) -> Client:
        return Client(self.sock(tenant), **kw)

    def admin(self) -> AdminClient:
        return AdminClient(self.admin_socket)

    def log(self) -> str:
        return self.kupd.log()

    def audit_lines(self) -> list[dict[str, Any]]:
        if not self.audit.exists():
            return []
        return [json.loads(x) for x in self.audit.read_text().splitlines() if x.strip()]

    def hup(self) -> None:
        self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        self.kupd.stop()


DEVICES = """
[[device]]
name = "echo"
call_channels = 4

[[device]]
name = "rot13"
call_channels = 0
"""

#: alice: echo channels 8-15 only, her socket owned by uid 65534 (nobody);
#: bob: Calls only, one at a time; carol: both devices, a tiny call rate,
#: her socket 0660 with group 65534 (any member of it is carol).
TENANTS = f"""
[[tenant]]
name = "alice"
socket = "@DIR@/alice.sock"
owner = {OWNER}
mode = "0600"
max_sessions = 2
max_message_bytes = 64
[[tenant.grant]]
device = "echo"
channels = "8-15"

[[tenant]]
name = "bob"
socket = "@DIR@/bob.sock"
ops = ["call"]
max_calls_in_flight = 1
[[tenant.grant]]
device = "echo"

[[tenant]]
name = "carol"
socket = "@DIR@/carol.sock"
group = {GROUP}
mode = "0660"
calls_per_second = 0.01
[[tenant.grant]]
device = "echo"
[[tenant.grant]]
device = "rot13"
"""


StartTenants = Callable[[str], TenantKupd]

#: echo keeps the channel of a message starting with this locked -- its
#: reply owed -- until a "!lockfree" arrives on another channel (the bound,
#: 20 s, is only reached if a test never sends it): a Call that stays in
#: flight for exactly as long as a test needs, where "!delay" (300 ms) is a
#: window a loaded machine can miss.
LOCKHOLD = b"!lockhold20000"


def free_echo(k: TenantKupd, tenant: str = "bob", channel: int = 8) -> None:
    """Let echo answer what it holds (LOCKHOLD and the like): "!lockfree"
    on ``channel``, through ``tenant``'s socket."""
    with Client(k.sock(tenant)) as c, c.open("echo").channel(channel) as ch:
        ch.receive(timeout=10)
        assert ch.exchange(b"!lockfree", timeout=30).data == b"!lockfree"


def hold_connection(path: str) -> socket.socket:
    """One connection to ``path``, held open: a raw one, as a client that
    connects over and over would hold (gRPC clients of one process share
    their connections).  Returned once kupd has accepted it: its gRPC
    server has sent its first HTTP/2 frame (SETTINGS)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(30)
        s.connect(path)
        assert s.recv(9), f"{path} closed the connection at once"
    except BaseException:
        s.close()
        raise
    return s


def hold_refused(path: str) -> bool:
    """A raw connection to ``path`` is closed as it is accepted."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(path)
        try:
            return s.recv(9) == b""
        except ConnectionResetError:
            return True
