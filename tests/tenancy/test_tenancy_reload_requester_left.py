"""A reload whose requester leaves (Admin.Reload's client past its
deadline, or cancelled: grpc.aio cancels the handler) still runs to its
end: applied or refused, audited, the service manager told READY --
never left half-done.

A kupd Server run in this process (real kupsim devices, real unix
sockets, a real datagram socket as $NOTIFY_SOCKET) walked step by step:
the requester is cancelled after the loop has run n steps of a reload
that moves a tenant's socket and adds a tenant, for n = 0, 1, ... until
the reload finishes before the cancel; each end state must be the one
an uncancelled reload leaves."""

from __future__ import annotations

import asyncio
import errno
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tenancy_helpers import (
    DEVICES,
    StartTenants,
    TenantKupd,
    child_env,
    socket_dir,
    write_server_config,
)

from kupclient import Client
from kupd.config import load_config
from kupd.log import configure
from kupd.notify import Notifier
from kupd.testing import KupSim, wait_until

BEFORE = """
[[tenant]]
name = "alice"
socket = "@DIR@/alice.sock"
[[tenant.grant]]
device = "echo"

[[tenant]]
name = "bob"
socket = "@DIR@/bob.sock"
[[tenant.grant]]
device = "echo"
"""

#: alice's socket moves, dave is added, bob keeps his
AFTER = """
[[tenant]]
name = "alice"
socket = "@DIR@/alice2.sock"
[[tenant.grant]]
device = "echo"

[[tenant]]
name = "bob"
socket = "@DIR@/bob.sock"
[[tenant.grant]]
device = "echo"

[[tenant]]
name = "dave"
socket = "@DIR@/dave.sock"
[[tenant.grant]]
device = "rot13"
"""

#: far past what a reload takes: reached only when READY never comes
READY_BOUND = 20.0


class Manager:
    """The service manager's end of $NOTIFY_SOCKET, read on the loop."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.heard: list[dict[str, str]] = []

    async def until(self, key: str) -> dict[str, str]:
        loop = asyncio.get_running_loop()
        while True:
            try:
                async with asyncio.timeout(READY_BOUND):
                    data = await loop.sock_recv(self.sock, 4096)
            except TimeoutError:
                raise AssertionError(f"no {key} from kupd; heard {self.heard}") from None
            msg = dict(line.split("=", 1) for line in data.decode().split("\n"))
            self.heard.append(msg)
            if key in msg:
                return msg

    def close(self) -> None:
        self.sock.close()


def _health(path: str) -> str:
    with Client(path) as c:
        return str(c.health())



async def _reload_cancelled_at(sim: KupSim, steps: int | None) -> dict[str, Any]:
    """Start a Server on BEFORE, ask for a reload to AFTER, cancel the
    requester once the loop has run ``steps`` steps more (None: never),
    wait for the service manager's READY; the end state, and whether the
    requester was answered ("done") or left ("left")."""
    from kupd.server import Server  # needs the C extension

    d = socket_dir()
    manager = Manager(d / "notify")
    try:
        server = Server(load_config(write_server_config(d, sim, BEFORE)))
        server.notify = Notifier(str(d / "notify"))
        await server.start()
        try:
            write_server_config(d, sim, AFTER)
            requester = asyncio.ensure_future(server.reload(via="test"))
            await asyncio.sleep(0)  # the request is made: the requester's first step
            for _ in range(steps or 0):
                if requester.done():
                    break
                await asyncio.sleep(0)
            outcome = "done" if requester.done() else "left"
            if steps is not None:
                requester.cancel()
            try:
                await requester
            except asyncio.CancelledError:
                assert outcome == "left"
            else:
                # cancelled too late to land: it was answered
                outcome = "done"
            assert "RELOADING" in await manager.until("RELOADING")
            ready = await manager.until("READY")
            serving = {
                name: await asyncio.to_thread(_health, str(d / name))
                for name in ("alice2.sock", "bob.sock", "dave.sock")
            }
            audit = [
                {k: v for k, v in json.loads(x).items() if k != "time"}
                for x in (d / "audit.log").read_text().replace(str(d), "@DIR@").splitlines()
            ]
            def rel(path: str) -> str:
                return path.replace(str(d), "@DIR@")

            assert server.sockets is not None
            return {
                "outcome": outcome,
                "tenants": [(t.name, rel(t.socket)) for t in server.config.tenants],
                "servers": sorted(rel(p) for p, _ in server.sockets.servers),
                # every file in the socket directory: a server bound at a
                # private name (.kN) and left there would show here
                "files": sorted(os.listdir(d)),
                "serving": serving,
                "audit": [x for x in audit if x.get("action") == "reload"],
                "ready": rel(ready["STATUS"]),
            }
        finally:
            await server.stop()
    finally:
        manager.close()
        shutil.rmtree(d, ignore_errors=True)


def test_requester_cancelled_at_each_step_reload_still_whole(
    tsim: KupSim, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUPSIM_DIR", raising=False)  # the device manager sets it
    want = asyncio.run(_reload_cancelled_at(tsim, None))
    assert want["outcome"] == "done"
    assert want["tenants"] == [
        ("alice", "@DIR@/alice2.sock"), ("bob", "@DIR@/bob.sock"), ("dave", "@DIR@/dave.sock")
    ]  # fmt: skip
    assert set(want["serving"].values()) == {"SERVING"}, want
    assert "alice.sock" not in want["files"], want
    assert [x["ok"] for x in want["audit"]] == [True], want
    want.pop("outcome")
    left = 0
    for n in range(500):
        got = asyncio.run(_reload_cancelled_at(tsim, n))
        outcome = got.pop("outcome")
        assert got == want, f"requester cancelled after {n} steps"
        if outcome == "done":
            break
        left += 1
    else:
        raise AssertionError("the reload never finished before its requester's cancel")
    # the walk cancelled the requester inside the reload at least once
    assert left > 0


def test_refused_reload_whose_requester_left_is_logged(
    tsim: KupSim, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refusal nobody hears is logged as an error (and audited, and the
    service manager told READY, the running config kept)."""
    from kupd.server import Server  # needs the C extension

    monkeypatch.delenv("KUPSIM_DIR", raising=False)
    buf = io.StringIO()

    async def main() -> None:
        d = socket_dir()
        manager = Manager(d / "notify")
        try:
            server = Server(load_config(write_server_config(d, tsim, BEFORE)))
            server.notify = Notifier(str(d / "notify"))
            await server.start()
            try:
                # dave's socket directory is a file: binding it is refused
                (d / "notadir").write_text("")
                bad = AFTER.replace("@DIR@/dave.sock", "@DIR@/notadir/dave.sock")
                write_server_config(d, tsim, bad)
                requester = asyncio.ensure_future(server.reload(via="test"))
                await asyncio.sleep(0)
                requester.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await requester
                await manager.until("READY")
                assert [t.socket for t in server.config.tenants] == [
                    f"{d}/alice.sock", f"{d}/bob.sock"
                ]  # fmt: skip
                audit = [json.loads(x) for x in (d / "audit.log").read_text().splitlines()]
                reloads = [x for x in audit if x.get("action") == "reload"]
                assert [x["ok"] for x in reloads] == [False], audit
                # nothing of the refused reload left bound
                assert not [f for f in os.listdir(d) if f.startswith(".k")], os.listdir(d)
            finally:
                await server.stop()
        finally:
            manager.close()
            shutil.rmtree(d, ignore_errors=True)

    configure("info", stream=buf)
    try:
        asyncio.run(main())
    finally:
        configure()
    lines = [json.loads(x) for x in buf.getvalue().splitlines() if x.startswith("{")]
    left = [x for x in lines if "requester had left" in x["event"]]
    assert [(x["level"], x["via"]) for x in left] == [("error", "test")], lines
    assert "notadir" in left[0]["error"], left


async def _stop_during_reload(
    sim: KupSim, steps: int
) -> tuple[bool, str, list[str], list[Any]]:
    """Start a Server on BEFORE, ask for a reload to AFTER, begin kupd's
    stop once the loop has run ``steps`` steps more; once stopped: whether
    the reload was still under way then, its answer, the files left in the
    socket directory, and the reload's audit lines."""
    from kupd.server import Server  # needs the C extension

    d = socket_dir()
    try:
        server = Server(load_config(write_server_config(d, sim, BEFORE)))
        await server.start()
        write_server_config(d, sim, AFTER)
        requester = asyncio.ensure_future(server.reload(via="test"))
        await asyncio.sleep(0)
        for _ in range(steps):
            if requester.done():
                break
            await asyncio.sleep(0)
        under_way = not requester.done()
        await server.stop()
        outcome = await asyncio.gather(requester, return_exceptions=True)
        audit = [json.loads(x) for x in (d / "audit.log").read_text().splitlines()]
        reloads = [(x["ok"], x.get("tenants")) for x in audit if x.get("action") == "reload"]
        answer = repr(outcome[0]) if isinstance(outcome[0], BaseException) else "applied"
        return under_way, answer, sorted(os.listdir(d)), reloads
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_stop_during_reload_waits_for_it(tsim: KupSim, monkeypatch: pytest.MonkeyPatch) -> None:
    """kupd's stop begun while a reload runs lets it end first -- applied
    (or, not yet begun, refused: kupd is shutting down), audited,
    answered -- and then stops every socket, the reload's new ones too
    (nothing left bound in the directory)."""
    monkeypatch.delenv("KUPSIM_DIR", raising=False)
    applied = 0
    for n in range(500):
        under_way, answer, files, reloads = asyncio.run(_stop_during_reload(tsim, n))
        assert files == ["audit.log", "kupd.sock.lock", "kupd.toml"], f"stop after {n} steps"
        if answer == "applied":
            assert reloads == [(True, ["alice", "bob", "dave"])], f"stop after {n} steps"
            applied += under_way
        else:
            assert "shutting down: reload refused" in answer, f"stop after {n} steps"
            assert reloads == [(False, None)], f"stop after {n} steps"
        if not under_way:
            break
    # the stop began inside a reload at least once
    assert applied > 0


def _fifo_config(k: TenantKupd) -> None:
    """Make ``k``'s config file a FIFO: kupd's next read of it blocks in
    the open until :func:`_fifo_writer` opens its other end."""
    fifo = k.dir / "kupd.fifo"
    os.mkfifo(fifo, 0o600)
    os.replace(fifo, k.config)


def _fifo_writer(k: TenantKupd) -> int:
    """The write end of ``k``'s FIFO config, opened once kupd is reading
    it (until a reader is there the open fails with ENXIO: never a hang
    here)."""
    fd = -1

    def reader_there() -> bool:
        nonlocal fd
        try:
            fd = os.open(k.config, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            return False
        return True

    wait_until(reader_there, what="kupd reading its config file")
    return fd


@pytest.mark.parametrize(
    ("command", "gave_up"),
    [
        ("-m kupclient.kupctl reload --timeout 0.5 --admin-socket SOCK", 9),
        ("-m kupclient.admin --socket SOCK reload --timeout 0.5", 1),
    ],
)
def test_kupctl_reload_gives_up_kupd_applies_it_whole(
    start_tenants: StartTenants, command: str, gave_up: int
) -> None:
    """A real kupd, a real ``kupctl reload --timeout`` (and the same through
    ``python -m kupclient.admin reload --timeout``): kupd is slow to
    read its config file (a FIFO stands in for a slow file system: the
    read blocks until the test writes it, long after kupctl gave up), so
    grpc.aio cancels the Reload handler while the reload waits for the
    file.  kupd applies the reload all the same: every new socket
    served, none left bound at a private name, audited, and its log says
    the requester had left."""
    k = start_tenants(DEVICES + BEFORE)
    _fifo_config(k)
    p = subprocess.Popen(
        [sys.executable, *(k.admin_socket if w == "SOCK" else w for w in command.split())],
        env=child_env(None), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == gave_up, err  # the command gave up: whether kupd reloaded is not known
    assert "did not answer the reload within 0.5 s" in err, err
    # kupd, blocked opening the file for its read, reads it only now
    with open(_fifo_writer(k), "w") as f:
        f.write(k.head() + DEVICES + AFTER.replace("@DIR@", str(k.dir)))
    wait_until(
        lambda: any(x.get("action") == "reload" for x in k.audit_lines()), what="the reload's audit"
    )
    (line,) = [x for x in k.audit_lines() if x.get("action") == "reload"]
    assert line["ok"] and line["tenants"] == ["alice", "bob", "dave"], line
    assert line["via"] == "admin", line
    for name in ("alice2", "bob", "dave"):
        assert _health(k.sock(name)) == "SERVING", name
    assert not os.path.exists(k.sock("alice"))
    assert not [f for f in os.listdir(k.dir) if f.startswith(".k")], os.listdir(k.dir)
    wait_until(lambda: "requester had left" in k.log(), what="the log's word on the reload")
    (said,) = [
        json.loads(x) for x in k.log().splitlines() if "requester had left" in x
    ]
    assert said["level"] == "info" and "applied" in said["event"], said


async def _prepare_cancelled_at(sim: KupSim, steps: int) -> tuple[bool, list[str]]:
    """Start a Server on BEFORE, prepare AFTER's sockets (SocketSet.prepare,
    a reload's first half) and cancel it once the loop has run ``steps``
    steps; whether it was still under way then, and the socket files in
    the directory once it has ended (a finished prepare discarded)."""
    from kupd.server import Server, server_options  # needs the C extension
    from kupd.tenants import endpoints_for

    d = socket_dir()
    try:
        server = Server(load_config(write_server_config(d, sim, BEFORE)))
        await server.start()
        try:
            assert server.sockets is not None
            cfg = load_config(write_server_config(d, sim, AFTER))
            work = asyncio.ensure_future(
                server.sockets.prepare(endpoints_for(cfg), server_options(cfg))
            )
            for _ in range(steps):
                if work.done():
                    break
                await asyncio.sleep(0)
            under_way = not work.done()
            work.cancel()
            try:
                started = await work
            except asyncio.CancelledError:
                pass
            else:
                await server.sockets.discard(started)
            files = os.listdir(d)
            return under_way, sorted(f for f in files if f.startswith(".k") or f.endswith(".sock"))
        finally:
            await server.stop()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_prepare_cancelled_leaves_nothing_bound(
    tsim: KupSim, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SocketSet.prepare is all or none even when cancelled (kupd does not
    cancel a reload, but its loop's end may): a cancel at any of its awaits
    stops the servers it had started -- the one starting then too -- and
    nothing is left bound at a private name (.kN)."""
    monkeypatch.delenv("KUPSIM_DIR", raising=False)
    left = 0
    for n in range(500):
        under_way, files = asyncio.run(_prepare_cancelled_at(tsim, n))
        assert files == ["alice.sock", "bob.sock"], f"after {n} steps"
        if not under_way:
            break
        left += 1
    assert left > 0


def test_a_config_read_that_blocks_neither_freezes_kupd_nor_holds_its_stop(
    start_tenants: StartTenants,
) -> None:
    """kupd reads its config for a reload off its event loop: while the
    read blocks (a FIFO nobody writes stands in for a hung network mount),
    every socket still answers, and SIGTERM stops kupd at once -- the
    reload refused as shutting down and audited, nothing applied.  The
    read used to run on the loop: kupd answered nothing, and its stop
    waited for the read."""
    k = start_tenants(DEVICES + BEFORE)
    _fifo_config(k)
    k.hup()
    # kupd's open of the FIFO returns once a writer is there; the writer
    # held open and never writing, kupd's read then blocks on no data
    fd = _fifo_writer(k)
    try:
        for name in ("alice", "bob"):
            assert _health(k.sock(name)) == "SERVING", name
        with k.admin() as admin:
            assert "kupd_" in admin.metrics()
        k.proc.send_signal(signal.SIGTERM)
        assert k.proc.wait(timeout=60) == 0
    finally:
        os.close(fd)
    (line,) = [x for x in k.audit_lines() if x.get("action") == "reload"]
    assert not line["ok"], line
    assert "config file was still being read" in line["error"], line
