"""echo in "any" mode (KUP_PARAM_ECHO_ANY=1): one module thread serves every
channel with kupdev_receive_any, on a real kupsim with libkup users, under
ASan+UBSan and TSan (tests/c/test_kup.c sc_anystress: 8 user threads x 4
channels handing over at once, channels left and re-attached meanwhile,
then one hand-over at a time on each channel while the server sleeps)."""

from __future__ import annotations

from pathlib import Path

from kmod_util import variant_kupsim
from test_c_kup import run_scenario

__all__: list[str] = []


def test_one_receive_any_thread_serves_every_channel(variant_out: Path) -> None:
    with variant_kupsim(variant_out, "echo", env={"KUP_PARAM_ECHO_ANY": "1"}) as sim:
        stdout = run_scenario(variant_out, sim, "anystress")
        assert "OK anystress 9664 messages" in stdout
        log = sim.stderr()
        assert "echo: device echo ready (128 channels, 1 pages, one receive_any thread)" in log
        # the one server took the channels into its set, and nothing failed
        # (its "serving N" lines are rate-limited: the first ones show)
        assert "echo: any: serving 2 channels" in log, log
        for bad in ("receive failed", "reply failed", "first pass failed", "protocol error"):
            assert bad not in log, log
