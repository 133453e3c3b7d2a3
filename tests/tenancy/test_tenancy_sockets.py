"""What kupd does to the files at its socket paths (kupd.tenants.SocketSet).

Binding a unix socket needs its path free.  kupd removes a stale socket
there, and nothing else: a reload that hands a path it serves to another
tenant (a renamed tenant, two tenants swapping sockets) must leave the path
served -- it once bound the new server and then removed the file as it
stopped the old one, so the tenant's socket was gone until a restart --
and a path holding a file that is not a socket, or a socket another process
serves, is refused rather than replaced."""

from __future__ import annotations

import os
import socket
import stat
import threading
from pathlib import Path

import pytest
from tenancy_helpers import DEVICES, LOCKHOLD, TENANTS, StartTenants

from kupclient import Message
from kupd import errors
from kupd.testing import echo_lock_holds, in_background, wait_until


def _tenants(a: tuple[str, str], b: tuple[str, str]) -> str:
    """Two tenants (name, socket file name): the first may use echo channel
    8 only, the second channel 9 only -- so a client can tell them apart."""
    out = ""
    for (name, sock), chan in ((a, 8), (b, 9)):
        out += (
            f'[[tenant]]\nname = "{name}"\nsocket = "@DIR@/{sock}"\n'
            f'[[tenant.grant]]\ndevice = "echo"\nchannels = "{chan}"\n'
        )
    return out


def _serves_channel(path: str, chan: int) -> bool:
    """A client on ``path`` may open echo channel ``chan`` (its tenant's)."""
    from kupclient import Client

    with Client(path) as c:
        try:
            with c.open("echo").channel(chan) as ch:
                ch.receive(timeout=10)
        except errors.PermissionDenied:
            return False
    return True


def test_a_renamed_tenant_keeps_its_socket(start_tenants: StartTenants) -> None:
    k = start_tenants(DEVICES + _tenants(("x", "a.sock"), ("y", "b.sock")))
    a = str(k.dir / "a.sock")
    before = os.stat(a).st_ino
    with k.admin() as adm:
        k.write_config(DEVICES + _tenants(("x2", "a.sock"), ("y", "b.sock")))
        r = adm.reload()
        assert "x2" in r.tenants and "x" not in r.tenants, r
        assert stat.S_ISSOCK(os.stat(a).st_mode) and os.stat(a).st_ino != before
        assert _serves_channel(a, 8)  # x2 now, with x's grants
        k.write_config(DEVICES + _tenants(("x", "a.sock"), ("y", "b.sock")))
        adm.reload()
    assert _serves_channel(a, 8)


def test_two_tenants_swap_sockets(start_tenants: StartTenants) -> None:
    k = start_tenants(DEVICES + _tenants(("x", "a.sock"), ("y", "b.sock")))
    a, b = str(k.dir / "a.sock"), str(k.dir / "b.sock")
    assert _serves_channel(a, 8) and not _serves_channel(a, 9)
    # connections keep arriving while the reload hands the paths over
    stop = threading.Event()
    failures: list[BaseException] = []

    def knock() -> None:
        while not stop.is_set():
            for path in (a, b):
                try:
                    with socket.socket(socket.AF_UNIX) as s:
                        s.connect(path)
                except OSError as exc:
                    failures.append(exc)

    t = threading.Thread(target=knock)
    t.start()
    try:
        with k.admin() as adm:
            k.write_config(DEVICES + _tenants(("x", "b.sock"), ("y", "a.sock")))
            adm.reload()
    finally:
        stop.set()
        t.join(10)
    assert not failures, failures[:3]  # never a moment without a socket
    assert _serves_channel(a, 9) and not _serves_channel(a, 8)  # a.sock is y's now
    assert _serves_channel(b, 8) and not _serves_channel(b, 9)
    assert not [p for p in os.listdir(k.dir) if p.startswith(".k")]  # no temporary left


def test_a_file_that_is_not_a_socket_is_never_replaced(start_tenants: StartTenants) -> None:
    k = start_tenants(DEVICES + _tenants(("x", "a.sock"), ("y", "b.sock")))
    precious = k.dir / "precious.txt"
    precious.write_text("data\n")
    with k.admin() as adm:
        k.write_config(DEVICES + _tenants(("x", "a.sock"), ("y", "precious.txt")))
        refused = r"precious\.txt \(tenant y\) exists and is not a socket"
        with pytest.raises(errors.KupError, match=refused):
            adm.reload()
    assert precious.read_text() == "data\n"
    # refused as a whole: y keeps b.sock
    assert _serves_channel(str(k.dir / "b.sock"), 9)


def test_a_socket_another_process_serves_is_not_taken(start_tenants: StartTenants) -> None:
    k = start_tenants(DEVICES + _tenants(("x", "a.sock"), ("y", "b.sock")))
    other = str(k.dir / "other.sock")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(other)
        listener.listen()
        with k.admin() as adm:
            k.write_config(DEVICES + _tenants(("x", "a.sock"), ("y", "other.sock")))
            with pytest.raises(errors.KupError, match="another process serves"):
                adm.reload()
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(other)  # still the other process's
        listener.accept()[0].close()
    assert _serves_channel(str(k.dir / "b.sock"), 9)


def test_a_refused_reload_puts_changed_socket_permissions_back(
    start_tenants: StartTenants, tmp_path: Path
) -> None:
    """The reload changes x's socket mode, then fails on a tenant whose
    socket path holds a regular file: refused as a whole, so x's socket has
    its old mode again (it used to be changed after the point of no return,
    where a refusal left half a reload applied)."""
    k = start_tenants(DEVICES + _tenants(("x", "a.sock"), ("y", "b.sock")))
    a = k.dir / "a.sock"
    assert stat.S_IMODE(os.stat(a).st_mode) == 0o600
    (k.dir / "file").write_text("not a socket\n")
    wider = _tenants(("x", "a.sock"), ("y", "b.sock")).replace(
        'socket = "@DIR@/a.sock"\n', 'socket = "@DIR@/a.sock"\nmode = "0660"\n'
    )
    bad = 'name = "z"\nsocket = "@DIR@/file"\n[[tenant.grant]]\ndevice = "echo"\n'
    with k.admin() as adm:
        k.write_config(DEVICES + wider + "[[tenant]]\n" + bad)
        with pytest.raises(errors.KupError, match="exists and is not a socket"):
            adm.reload()
        assert stat.S_IMODE(os.stat(a).st_mode) == 0o600
        k.write_config(DEVICES + wider)
        adm.reload()
    assert stat.S_IMODE(os.stat(a).st_mode) == 0o660


def test_a_removed_tenants_call_in_flight_finishes(start_tenants: StartTenants) -> None:
    """A reload removes bob while his Call is in flight (admitted under the
    old policy).  His socket goes at once -- nobody new gets in -- but the
    Call gets its reply, where it used to end with gRPC's "Cancelling all
    calls" as his server stopped under it."""
    k = start_tenants(DEVICES + TENANTS)
    without_bob = TENANTS.replace(
        '[[tenant]]\nname = "bob"\nsocket = "@DIR@/bob.sock"\nops = ["call"]\n'
        'max_calls_in_flight = 1\n[[tenant.grant]]\ndevice = "echo"\n\n',
        "",
    )
    assert "bob" not in without_bob
    with k.client("alice") as a, k.client("bob") as b, k.admin() as adm:
        ch = a.open("echo").channel(8)
        ch.receive(timeout=10)
        holds = echo_lock_holds(k.sim)
        call = in_background(lambda: b.call("echo", LOCKHOLD, timeout=60))
        try:
            wait_until(lambda: echo_lock_holds(k.sim) > holds, what="echo to hold bob's Call")
            k.write_config(DEVICES + without_bob)
            assert "bob" not in adm.reload().tenants
            assert not os.path.exists(k.sock("bob"))
        finally:
            assert ch.exchange(b"!lockfree", timeout=30).data == b"!lockfree"
            reply = call.outcome(30)
        ch.close()
    assert isinstance(reply, Message) and reply.data.lower() == LOCKHOLD, reply


def test_an_attach_waiting_for_its_channel_is_refused_by_a_drain_meanwhile(
    start_tenants: StartTenants,
) -> None:
    """alice's attach waits for echo to let go of channel 9 (kupd retries
    Releasing for up to 10 s); the admin drains echo meanwhile.  The drain
    found no lease to end, and the attach used to succeed afterwards on the
    drained device; it is now refused (Shutdown, "drained") and the channel
    is not left attached.  echo lets go by itself after 3 s (a drained echo
    takes no "!lockfree")."""
    k = start_tenants(DEVICES + TENANTS)
    with k.client("alice") as a, k.admin() as adm:
        with a.open("echo").channel(9) as ch:
            ch.receive(timeout=10)
            ch.send(b"!lockhold3000")
            wait_until(lambda: echo_lock_holds(k.sim, 9) > 0, what="echo to hold channel 9")
        attach = in_background(lambda: a.attach("echo", 9))
        wait_until(
            lambda: "attach waits for the module to let go" in k.log(),
            what="the attach waiting for channel 9",
        )
        assert adm.drain("echo") == []  # nothing to end yet
        refused = attach.outcome(30)
        assert isinstance(refused, errors.Shutdown), refused
        assert "drained by the admin" in str(refused)
        assert [le for le in adm.list_leases() if le.channel == 9] == []
        adm.drain("echo", undo=True)
        with a.open("echo").channel(9) as again:  # not left attached
            again.receive(timeout=10)
