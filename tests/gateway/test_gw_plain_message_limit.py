"""The plain socket's max_message_bytes (no [[tenant]] tables): the
top-level key limits what its clients send as a tenant's key limits its
socket -- the same rule and messages, the lower of it and the channel's
size announced, a message over it TooBig naming it, gRPC's receive limit
16 KiB above it -- and a reload changes it.  A real kupd and kupsim."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from kupapi import kup_pb2, kup_pb2_grpc
from kupclient import Client
from kupclient.admin import AdminClient
from kupd import errors
from kupd.config import ConfigError, advisories, parse_config, reloaded
from kupd.testing import KupSim, start_kupd

DEV = {"device": [{"name": "echo"}]}
TENANT = {"name": "t", "socket": "/run/k/t.sock"}


@pytest.mark.parametrize("value", [-1, "64", True, 1.5])
def test_bad_values_are_refused_as_the_tenant_key_refuses_them(value: object) -> None:
    with pytest.raises(ConfigError) as plain:
        parse_config({"max_message_bytes": value, **DEV})
    with pytest.raises(ConfigError) as tenant:
        parse_config({"tenant": [{**TENANT, "max_message_bytes": value}], **DEV})
    assert plain.value.key == "max_message_bytes"
    assert tenant.value.key == "tenant[name=t].max_message_bytes"
    assert plain.value.problem == tenant.value.problem, (plain.value, tenant.value)
    assert plain.value.problem == f"must be an integer >= 0, not {value!r}"


def test_the_key_is_live_and_inert_with_tenants() -> None:
    running = parse_config({"max_message_bytes": 64, **DEV})
    assert running.max_message_bytes == 64
    assert parse_config(DEV).max_message_bytes == 0  # the documented default
    cfg, applied, needs_restart = reloaded(running, parse_config({**DEV}))
    assert (cfg.max_message_bytes, applied, needs_restart) == (0, ["max_message_bytes"], [])
    with_tenants = parse_config({"max_message_bytes": 64, "tenant": [TENANT], **DEV})
    # the plain socket is not served: said, and not reported as applied
    # (TENANT has no max_message_bytes of its own: advised of under its key)
    assert [k for k, _ in advisories(with_tenants) if not k.startswith("tenant[")] == [
        "max_message_bytes"
    ]
    changed = parse_config({"max_message_bytes": 128, "tenant": [TENANT], **DEV})
    assert reloaded(with_tenants, changed)[1:] == ([], [])


def _config(tmp: Path, sim: KupSim, limit: int) -> Path:
    cfg = tmp / "kupd.toml"
    new = cfg.with_suffix(".tmp")
    new.write_text(
        f'socket = "{tmp}/kupd.sock"\n'
        f'admin_socket = "{tmp}/admin.sock"\n'
        f'kupsim_dir = "{sim.rundir}"\n'
        "health_interval = 0.2\n"
        f"max_message_bytes = {limit}\n"
        '[[device]]\nname = "echo"\ncall_channels = 2\n'
    )
    os.replace(new, cfg)
    return cfg


def _session(sock: str, *data: bytes) -> list[kup_pb2.SessionResponse]:
    """Attach, take the turn, then exchange each of ``data``."""
    reqs = [
        kup_pb2.SessionRequest(request_id=1, attach=kup_pb2.SessionAttach(device="echo")),
        kup_pb2.SessionRequest(request_id=2, receive=kup_pb2.SessionReceive()),
    ] + [
        kup_pb2.SessionRequest(request_id=3 + i, exchange=kup_pb2.SessionExchange(data=d))
        for i, d in enumerate(data)
    ]
    with grpc.insecure_channel("unix:" + sock) as chan:
        return list(kup_pb2_grpc.KupStub(chan).Session(iter(reqs), timeout=30))


def _raw_call(sock: str, n: int) -> grpc.RpcError | None:
    """A Call of ``n`` bytes through the raw stub: what gRPC or kupd answers."""
    with grpc.insecure_channel("unix:" + sock) as chan:
        try:
            kup_pb2_grpc.KupStub(chan).Call(
                kup_pb2.CallRequest(device="echo", data=b"z" * n), timeout=30
            )
        except grpc.RpcError as exc:
            return exc
    return None


def test_plain_socket_limit_refuses_names_and_reloads(sim: KupSim, tmp_path: Path) -> None:
    sock = str(tmp_path / "kupd.sock")
    k = start_kupd(
        config=_config(tmp_path, sim, 64), log=tmp_path / "kupd.log", socket=sock,
        health_interval=None,
    )  # fmt: skip
    try:
        got = _session(sock, b"x" * 65, b"y" * 64)
        assert [r.request_id for r in got] == [1, 2, 3, 4]
        assert got[0].attached.max_message_bytes == 64  # announced: lower than the page
        assert got[2].WhichOneof("result") == "error", got[2]
        assert got[2].error.kind == "TooBig", got[2]
        assert got[2].error.grpc_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "max_message_bytes=64" in got[2].error.message, got[2]
        assert got[3].exchanged.message.data.lower() == b"y" * 64  # at the limit: passes
        with Client(sock) as c:
            with pytest.raises(errors.TooBig, match="max_message_bytes=64"):
                c.call("echo", b"x" * 65)
            assert c.call("echo", b"x" * 64).data.lower() == b"x" * 64  # odd channels: upper
            (echo,) = [d for d in c.devices() if d.name == "echo"]
            assert echo.max_message_bytes == 64
        # far over it: refused by gRPC as its length arrives (receive limit)
        far = _raw_call(sock, 64 + 16 * 1024 + 1)
        assert far is not None and far.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, far

        _config(tmp_path, sim, 128)
        with AdminClient(tmp_path / "admin.sock") as adm:
            assert "max_message_bytes" in adm.reload().applied
        got = _session(sock, b"x" * 128, b"y" * 129)
        assert got[0].attached.max_message_bytes == 128
        assert got[2].exchanged.message.data.lower() == b"x" * 128
        assert got[3].error.kind == "TooBig" and "max_message_bytes=128" in got[3].error.message
        with Client(sock) as c:
            assert c.call("echo", b"x" * 128).data.lower() == b"x" * 128
            with pytest.raises(errors.TooBig, match="max_message_bytes=128"):
                c.call("echo", b"x" * 129)

        # 0: the channel's size again, and no receive limit of its own (the
        # socket's server rebuilt): kupd itself refuses, naming the channel
        _config(tmp_path, sim, 0)
        with AdminClient(tmp_path / "admin.sock") as adm:
            assert "max_message_bytes" in adm.reload().applied
        got = _session(sock)
        assert got[0].attached.max_message_bytes > 128
        far = _raw_call(sock, 64 + 16 * 1024 + 1)
        assert far is not None and far.code() == grpc.StatusCode.INVALID_ARGUMENT, far
        assert "max_message_bytes" not in (far.details() or ""), far.details()
    finally:
        k.terminate()
