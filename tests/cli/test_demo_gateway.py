"""The gateway step of ``make demo`` (kupd/demo_gateway.py), run on its own:
it starts kupsim + kupd, converses through them and shuts both down."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from kupd.demo import STEPS, DemoContext
from kupd.demo_gateway import step_gateway


def test_gateway_step_is_part_of_the_demo() -> None:
    assert STEPS[-1] is step_gateway


def test_gateway_step_converses_and_shuts_down(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with contextlib.ExitStack() as stack:
        ctx = DemoContext(stack=stack, workdir=tmp_path)
        step_gateway(ctx)
        assert ctx.sim is not None and not ctx.sim.running()
    out = capsys.readouterr().out
    for expected in (
        "<- PASS seq 1 (the kernel hands over the turn)",
        "-> DATA 'hello through kupd'",
        "(exchange: send + wait for the reply)",
        "<- PASS seq 5",
        "session closed: kupd released the channel",
        "call 'ping 1' -> DATA",
        "DATA (17 bytes): ",
        "kupd exited with status 0",
        "kupsim exited with status 0",
    ):
        assert expected in out, f"{expected!r} missing from:\n{out}"
    # Even channels echo unchanged, odd ones upper-case: either way the text comes back.
    assert (
        "<- DATA seq 2 'hello through kupd'" in out or "<- DATA seq 2 'HELLO THROUGH KUPD'" in out
    )
