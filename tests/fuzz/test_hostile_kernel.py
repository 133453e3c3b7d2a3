"""A kernel side that writes garbage into the control area (kmod/kupsim/
hostile.c): kupd rejects it cleanly -- the session ends with a clear
protocol error (INTERNAL, EKU_PROTO), nothing is read out of bounds (kupd
keeps running; the channel layer bounds-checks every length it reads), and
the other channels and devices keep serving."""

from __future__ import annotations

from pathlib import Path

import pytest
from tenancy_helpers import TenantKupd

from kupclient import Client
from kupd import errors
from kupd.testing import KupSim, start_kupd, wait_until


@pytest.mark.parametrize("garbage", ["seqgap", "seqrep", "badlen", "badkind", "badturn"])
def test_garbage_in_the_control_area_ends_only_that_session(fk: TenantKupd, garbage: str) -> None:
    with Client(str(fk.dir / "kupd.sock")) as c:
        bad = c.open("hostile").channel()
        good = c.open("hostile").channel()
        for ch in (bad, good):
            ch.receive()
        bad.send(garbage.encode())
        with pytest.raises(errors.KupError) as ei:
            bad.receive(timeout=10)
        bad.close()
        assert isinstance(ei.value, errors.ProtocolError), ei.value
        assert "EKU_PROTO" in str(ei.value)
        # the same device's other channel, and another device, carry on
        good.send(b"fine")
        assert good.receive(timeout=10).data == b"fine"
        good.close()
        assert c.call("echo", b"still").data.lower() == b"still"
        assert fk.proc.poll() is None
    with fk.admin() as adm:
        wait_until(lambda: adm.list_leases() == [], what="no lease left behind")


def test_a_call_pool_channel_the_kernel_broke_is_dropped_for_good(
    hsim: KupSim, tmp_path: Path
) -> None:
    """A Call whose pool channel the kernel side breaks fails with EKU_PROTO
    and the channel leaves the pool.  It used to be put back among the free
    ones as well (its state was still "busy"), so the next Call that drew
    it failed with "channel is closed"."""
    k = start_kupd(
        socket=tmp_path / "k.sock", log=tmp_path / "kupd.log", sim=hsim, devices=("hostile:2",)
    )
    try:
        with Client(k.socket) as c:
            wait_until(lambda: c.devices("hostile")[0].call_channels == 2, what="the pool")
            with pytest.raises(errors.ProtocolError, match="EKU_PROTO"):
                c.call("hostile", b"badkind", timeout=10)
            for i in range(6):
                assert c.call("hostile", f"fine {i}".encode(), timeout=10).data == (
                    f"fine {i}".encode()
                )
        assert "pool channel quarantined" not in k.log()
    finally:
        k.stop()
