"""A tenant socket bound at its path itself: its directory is so deep
that no private name (".kN") next to it fits in sun_path's 108 bytes
(kupd.tenants.SocketSet._private_name).  gRPC removes the path a server
bound when that server stops -- whatever socket is there by then.  So
while a retired server bound there is still up, no reload may put
another server at that path: the old one's stop would remove the new
socket, and its tenant would lose it."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
from tenancy_helpers import StartTenants, TenantKupd, free_echo

from kupclient import Client, Message
from kupd import errors
from kupd.testing import echo_lock_holds, in_background, wait_until

#: a Call on a pool channel would be given an hour: what keeps the retired
#: server up is the Call echo holds, never a deadline running out
HEAD = 'call_timeout = 3600\nlog_level = "debug"\n'
HOLD = b"!lockhold60000"
SUN_PATH = 108

BODY = """
[[device]]
name = "echo"
call_channels = 1

[[tenant]]
name = "alice"
socket = "@DEEP@"
[[tenant.grant]]
device = "echo"

[[tenant]]
name = "bob"
socket = "@DIR@/bob.sock"
[[tenant.grant]]
device = "echo"
"""


def _deep_socket(base: Path) -> str:
    """A socket path under ``base`` that fits in sun_path, next to which no
    ".kN" does: its directory is SUN_PATH - 4 bytes long, its name "s"."""
    want = SUN_PATH - 4
    d = base
    while len(os.fsencode(str(d))) < want - 40:
        d = d / ("d" * 30)
    d = d / ("e" * (want - len(os.fsencode(str(d))) - 1))
    d.mkdir(parents=True)
    assert len(os.fsencode(str(d))) == want
    return str(d / "s")


def _config(deep: str, alice_at: str | None) -> str:
    body = BODY.replace("@DEEP@", alice_at or deep)
    if alice_at is None:
        body = (
            body[: body.index('[[tenant]]\nname = "alice"')]
            + body[body.index('[[tenant]]\nname = "bob"') :]
        )
    return HEAD + body


def _alice_at(path: str) -> str:
    """alice's tenant table, her socket at ``path``."""
    return f'\n[[tenant]]\nname = "alice"\nsocket = "{path}"\n[[tenant.grant]]\ndevice = "echo"\n'


def _records(k: TenantKupd, event: str) -> list[dict[str, Any]]:
    recs = [json.loads(x) for x in k.log().splitlines() if x.startswith("{")]
    return [r for r in recs if r.get("event") == event]


def _serves(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        try:
            s.connect(path)
        except OSError:
            return False
        return True


@pytest.mark.parametrize("then", ["moved back", "given to bob2"])
def test_a_socket_at_its_path_itself_is_not_reused_while_its_old_server_is_up(
    start_tenants: StartTenants, tmp_path: Path, then: str
) -> None:
    """alice's socket is bound at its path itself.  A reload moves it away
    (or removes alice) while a Call of hers runs on the old server; the
    next reload puts a socket at that path again -- alice's (moved back)
    or a new tenant's.  Refused, naming the socket and why, while the old
    server is up: bound there, it would have removed the new socket as it
    stopped (the tenant lost its socket).  Once the old server has
    stopped, the same reload is applied, and the socket stays."""
    k = start_tenants(HEAD + BODY.replace("@DEEP@", "@DIR@/placeholder.sock"))
    deep = _deep_socket(k.dir)
    k.write_config(_config(deep, None) + _alice_at(deep))
    with k.admin() as adm:
        adm.reload()
    assert _serves(deep)
    with Client(deep) as a:
        holds = echo_lock_holds(k.sim)
        running = in_background(lambda: a.call("echo", HOLD, timeout=600))
        wait_until(lambda: echo_lock_holds(k.sim) > holds, what="echo to hold the Call")
        try:
            if then == "moved back":
                k.write_config(_config(deep, "@DIR@/alice2.sock"))
                again = _config(deep, deep)
            else:
                k.write_config(_config(deep, None))
                again = _config(deep, None) + (
                    '\n[[tenant]]\nname = "bob2"\nsocket = "' + deep + '"\n'
                    '[[tenant.grant]]\ndevice = "echo"\n'
                )
            with k.admin() as adm:
                adm.reload()
            assert not os.path.exists(deep)
            k.write_config(again)
            with k.admin() as adm, pytest.raises(errors.InvalidArgument) as refused:
                adm.reload()
            assert deep in str(refused.value) and "still" in str(refused.value), refused.value
            assert not os.path.exists(deep)  # nothing changed
        finally:
            free_echo(k)
        reply = running.outcome(30)
    assert isinstance(reply, Message) and reply.data.lower() == HOLD, reply
    wait_until(
        lambda: any(r.get("socket") == deep for r in _records(k, "retired socket server stopped")),
        timeout=60,
        what="the old server of the deep socket to stop",
    )
    with k.admin() as adm:
        adm.reload()
    assert _serves(deep)
    with Client(deep) as fresh:
        assert [d.name for d in fresh.devices("echo")] == ["echo"]
    assert _serves(deep), "the socket went with the old server's stop"


def test_a_file_put_by_hand_where_a_retired_direct_server_was_is_named_as_it_goes(
    start_tenants: StartTenants,
) -> None:
    """A reload removes alice, whose socket is bound at its path itself,
    while a Call of hers runs; meanwhile someone binds a socket of their
    own at that path by hand.  gRPC removes the path as the old server
    stops (the path is all it knows), and kupd cannot keep that file
    without leaving the path missing meanwhile: the log names it, instead
    of the file vanishing unexplained."""
    k = start_tenants(HEAD + BODY.replace("@DEEP@", "@DIR@/placeholder.sock"))
    deep = _deep_socket(k.dir)
    k.write_config(_config(deep, None) + _alice_at(deep))
    with k.admin() as adm:
        adm.reload()
    with Client(deep) as a:
        holds = echo_lock_holds(k.sim)
        running = in_background(lambda: a.call("echo", HOLD, timeout=600))
        wait_until(lambda: echo_lock_holds(k.sim) > holds, what="echo to hold the Call")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mine:
            try:
                k.write_config(_config(deep, None))
                with k.admin() as adm:
                    adm.reload()
                mine.bind(deep)
                mine.listen()
            finally:
                free_echo(k)
            reply = running.outcome(30)
            assert isinstance(reply, Message) and reply.data.lower() == HOLD, reply
            wait_until(
                lambda: any(
                    r.get("socket") == deep for r in _records(k, "retired socket server stopped")
                ),
                timeout=60,
                what="the old server of the deep socket to stop",
            )
    said = [
        r
        for r in _records(
            k,
            "retired socket server stops: gRPC removes the path it was bound at, and with "
            "it the file someone put there since",
        )
        if r.get("socket") == deep
    ]
    assert said and said[0].get("level") == "warning", said
