"""After a reload every holder of a config value has the new one: a kupd
Server run in this process (real kupsim devices, a real unix socket), its
config reloaded from a rewritten file, then each holder looked at."""

from __future__ import annotations

import asyncio
import shutil

import pytest
from tenancy_helpers import socket_dir

from kupd.config import load_config
from kupd.testing import KupSim


def test_every_holder_gets_the_reloaded_values(
    tsim: KupSim, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kupd.server import Server  # needs the C extension

    monkeypatch.delenv("KUPSIM_DIR", raising=False)  # the device manager sets it
    d = socket_dir()
    path = d / "kupd.toml"
    head = f'socket = "{d}/kupd.sock"\nkupsim_dir = "{tsim.rundir}"\n'
    devices = '[[device]]\nname = "echo"\ncall_channels = 2\n[[device]]\nname = "rot13"\n'
    path.write_text(head + devices)

    async def main() -> None:
        server = Server(load_config(path))
        await server.start()
        try:
            path.write_text(
                head
                + "call_timeout = 4.5\nlease_idle_timeout = 7\ncall_quarantine = 3\n"
                + "max_queued_calls = 11\nmax_sessions = 12\nhealth_interval = 0.7\n"
                + "drain_grace = 0.25\nmetrics_port = 1\n"
                + devices
            )
            done = await server.reload(via="test")
            cfg = server.config
            assert done.needs_restart == ["metrics_port"], done
            assert done.applied == [
                "lease_idle_timeout",
                "call_timeout",
                "call_quarantine",
                "drain_grace",
                "health_interval",
                "max_sessions",
                "max_queued_calls",
            ], done
            # one running config, with the running metrics_port
            assert server.service.config is cfg and server.mgr.config is cfg
            assert (cfg.call_timeout, cfg.health_interval, cfg.drain_grace) == (4.5, 0.7, 0.25)
            assert cfg.metrics_port == 0
            # the copies
            assert (server.leases.idle_timeout, server.leases.max_leases) == (7.0, 12)
            for dev in server.mgr.devices.values():
                assert (dev.pool.quarantine, dev.pool.max_queued) == (3.0, 11), dev.name
        finally:
            await server.stop()

    try:
        asyncio.run(main())
    finally:
        shutil.rmtree(d, ignore_errors=True)
