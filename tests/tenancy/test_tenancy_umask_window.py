"""A socket's umask is the socket's alone: files made by anything else in
kupd's process while a tenant's server is bound and started are born with
their own modes, and every socket with its configured one.

The umask is process-wide.  kupd once held a socket's umask across
``await server.start()``, so whatever ran on the event loop meanwhile --
the audit log re-opened on SIGUSR1, any other file made -- was born under
it.  A kupd Server run in this process (real kupsim devices, real unix
sockets) is walked step by step through a reload that adds two tenants
with different modes; at every step of the loop the audit log is rotated
and re-opened (what SIGUSR1 does), a probe file is made, as any other
code in the process might, and a directory is made as kupd makes a
socket's (``check_path(create=True)``, 0755).  The audit log (0600) cannot
show the leak by itself -- every socket mode includes 0600 -- the probe
file and the directory do: under a 0660 socket's umask a directory is born
0640, which nobody can even enter."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest
from tenancy_helpers import socket_dir, write_server_config

from kupd.config import load_config
from kupd.tenants import check_path
from kupd.testing import KupSim

BEFORE = """
[[tenant]]
name = "alice"
socket = "@DIR@/alice.sock"
mode = "0600"
[[tenant.grant]]
device = "echo"
"""

#: two tenants added, with modes other than alice's and each other's
AFTER = (
    BEFORE
    + """
[[tenant]]
name = "bob"
socket = "@DIR@/bob.sock"
mode = "0660"
[[tenant.grant]]
device = "echo"

[[tenant]]
name = "carol"
socket = "@DIR@/carol.sock"
mode = "0640"
[[tenant.grant]]
device = "rot13"
"""
)

#: the umask the test runs kupd under (a usual one): files made with 0o666
#: are 0o644, directories made with 0o755 stay 0o755
UMASK = 0o022



def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


async def _reload_walked(sim: KupSim) -> dict[str, Any]:
    from kupd.server import Server  # needs the C extension

    d = socket_dir()
    probes = d / "probes"
    probes.mkdir()
    rotated = d / "rotated"
    rotated.mkdir()
    dirs = d / "dirs"
    dirs.mkdir()
    try:
        server = Server(load_config(write_server_config(d, sim, BEFORE)))
        await server.start()
        try:
            write_server_config(d, sim, AFTER)
            reload = asyncio.ensure_future(server.reload(via="test"))
            steps = 0
            while not reload.done():
                await asyncio.sleep(0)
                steps += 1
                # SIGUSR1 after a rotation: audit.log is made anew
                os.rename(d / "audit.log", rotated / f"audit.{steps}")
                server.reopen_audit_log()
                fd = os.open(probes / str(steps), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                os.close(fd)
                # a socket's directory made as kupd makes it (0755)
                check_path(str(dirs / str(steps) / "x.sock"), private=False, create=True)
            await reload
            return {
                "steps": steps,
                "audit": {
                    name: _mode(rotated / name) for name in sorted(os.listdir(rotated))
                },
                "probes": {name: _mode(probes / name) for name in sorted(os.listdir(probes))},
                "dirs": {name: _mode(dirs / name) for name in sorted(os.listdir(dirs))},
                "sockets": {
                    name: _mode(d / name) for name in ("alice.sock", "bob.sock", "carol.sock")
                },
                "umask": os.umask(UMASK),
            }
        finally:
            await server.stop()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_files_made_while_sockets_start_keep_their_modes(
    tsim: KupSim, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUPSIM_DIR", raising=False)  # the device manager sets it
    old = os.umask(UMASK)
    try:
        got = asyncio.run(_reload_walked(tsim))
    finally:
        os.umask(old)
    # the walk went through the reload's binds and starts (each start
    # alone yields to the loop more than once)
    assert got["steps"] > 4, got
    assert got["umask"] == UMASK, got
    assert set(got["audit"].values()) == {0o600}, got
    assert set(got["probes"].values()) == {0o666 & ~UMASK}, got
    assert set(got["dirs"].values()) == {0o755 & ~UMASK}, got
    assert got["sockets"] == {"alice.sock": 0o600, "bob.sock": 0o660, "carol.sock": 0o640}, got
