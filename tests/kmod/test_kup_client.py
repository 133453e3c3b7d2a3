"""The README's example client, kmod/examples/client/kup_client.c (built by
kmod/Makefile against libkup.a, as a third party would), against kupsim's
echo, under ASan+UBSan and TSan: a conversation, a channel id past the
device's named with the range, an unknown device, bad arguments, a
message that starts with '-' (after "--")."""

from __future__ import annotations

import subprocess
from pathlib import Path

from kmod_util import assert_clean, sanitizer_env, variant_kupsim

__all__: list[str] = []

TIMEOUT = 60.0


def kup_client(out: Path, rundir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = sanitizer_env({"KUPSIM_DIR": str(rundir), "PATH": "/usr/bin:/bin"})
    proc = subprocess.run(
        [str(out / "kup_client"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert_clean("kup_client", proc.stderr)
    return proc


def test_kup_client_talks_and_names_what_is_wrong(variant_out: Path) -> None:
    with variant_kupsim(variant_out, "echo", env={"KUP_PARAM_ECHO_CHANNELS": "8"}) as sim:
        run = sim.rundir
        p = kup_client(variant_out, run, "-c", "3", "echo", "hello", "world")
        assert p.returncode == 0, p
        assert p.stdout.splitlines() == [
            "attached echo channel 3 max_msg 4096",
            'recv PASS seq 1 len 0 ""',
            'send len 5 "hello"',
            'recv DATA seq 2 len 5 "HELLO"',  # odd channel: upper-cased
            'send len 5 "world"',
            'recv DATA seq 3 len 5 "WORLD"',
        ], p.stdout
        p = kup_client(variant_out, run, "-c", "8", "echo", "hi")
        assert p.returncode == 1 and p.stdout == "", p
        assert "kup_client: attach: echo has no channel 8 (it has 8: 0..7)" in p.stderr, p
        p = kup_client(variant_out, run, "nosuch", "hi")
        assert p.returncode == 1 and "kup_client: nosuch: EKU_NOENT" in p.stderr, p
        p = kup_client(variant_out, run, "-c", "x", "echo", "hi")
        assert p.returncode == 2 and "-c x: channel must be 0.." in p.stderr, p
        p = kup_client(variant_out, run)
        assert p.returncode == 2 and p.stderr.startswith("usage: kup_client"), p
        # a message that looks like an option: the usage says to put "--"
        # before it, and with it the message is sent as it is
        p = kup_client(variant_out, run, "-c", "2", "echo", "-2")
        assert p.returncode == 2 and p.stdout == "", p
        assert "usage: kup_client [-c CHAN] [-t TIMEOUT_MS] [--] DEVICE MESSAGE..." in p.stderr
        assert "needs \"--\" before it: kup_client echo -- -2" in p.stderr, p
        p = kup_client(variant_out, run, "-c", "2", "--", "echo", "-2", "-x")
        assert p.returncode == 0, p
        assert p.stdout.splitlines() == [
            "attached echo channel 2 max_msg 4096",
            'recv PASS seq 1 len 0 ""',
            'send len 2 "-2"',
            'recv DATA seq 2 len 2 "-2"',
            'send len 2 "-x"',
            'recv DATA seq 3 len 2 "-x"',  # even channel: unchanged
        ], p.stdout
        # a message past the 200 bytes shown: how many more, "1 byte" for one
        p = kup_client(variant_out, run, "-c", "2", "echo", "a" * 201)
        assert p.returncode == 0, p
        shown = '"' + "a" * 200 + '"...(+1 byte)'
        assert p.stdout.splitlines()[2:4] == [
            f"send len 201 {shown}",
            f"recv DATA seq 2 len 201 {shown}",
        ], p.stdout
