"""Model-check kupdev_receive_any's wait (kmod/include/kup_any.pml) with SPIN.

Kernel threads each wait on a set of channels (one thread on two or three
channels, or two threads on sets of their own); each channel's user hands
the turn back with kup_abi.h's handshake, and its wake-up reaches the one
waiter the channel names (ch->any_w), not every waiter of the device.  The
correct model must verify (every hand-over received once and in order, no
one asleep for ever: no invalid end state), with the sleep, the re-check
and the users' wake-up all reached; each seeded bug -- no re-check after
the flags, a flag set on one channel only, a user's wake-up that reaches
only its channel's object and not the waiter's, a drain after the look,
a first sleep whose object the channels do not name, an object named only
after the flags and the look -- must be found by SPIN as a kernel asleep
for ever with a message waiting.  A missing spin or gcc is a failure,
never a skip.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

__all__: list[str] = []

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "kmod" / "include" / "kup_any.pml"
HEADER = ROOT / "kmod" / "include" / "kup_abi.h"
SETUP_HINT = "run scripts/setup-apt.sh (or `make setup`) to install it"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` not found on PATH: {SETUP_HINT}", pytrace=False)
    return path


def _run(argv: list[str], cwd: Path) -> str:
    proc = subprocess.run(
        ["nice", "-n", "10", *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    out = proc.stdout + proc.stderr
    if proc.returncode != 0 and argv[0] != "./pan":
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}):\n{out}")
    return out


def _pan(tmp_path: Path, *defines: str) -> tuple[Path, str]:
    """spin -a, gcc (safety), ./pan: the work directory and pan's output."""
    spin, gcc = _tool("spin"), _tool("gcc")
    shutil.copy(MODEL, tmp_path / MODEL.name)
    out = _run([spin, *defines, "-a", MODEL.name], tmp_path)
    assert (tmp_path / "pan.c").exists() and "error" not in out.lower(), out
    _run([gcc, "-O0", "-DSAFETY", "-o", "pan", "pan.c"], tmp_path)
    return tmp_path, _run(["./pan", "-m200000", "-w22"], tmp_path)


def _tag_line(tag: str) -> int:
    for n, line in enumerate(MODEL.read_text().splitlines(), start=1):
        if f"@reach:{tag}" in line:
            return n
    raise AssertionError(f"no @reach:{tag} in {MODEL.name}")


@pytest.mark.parametrize(
    "defines",
    [(), ("-DNMSG=3",), ("-DNCHAN=3",), ("-DNWAIT=2", "-DNCHAN=1", "-DNMSG=3")],
    ids=["two_channels", "three_messages", "three_channels", "two_waiters"],
)
def test_receive_any_loses_no_handover(tmp_path: Path, defines: tuple[str, ...]) -> None:
    _work, out = _pan(tmp_path, *defines)
    assert "Full statespace search" in out, out
    assert re.search(r"errors: 0\b", out), out
    for bad in ("assertion violated", "invalid end state (", "max search depth too small"):
        assert bad not in out, out
    # the sleep, the re-check that spares it and the users' wake-up all ran
    unreached = {
        int(m.group(1)) for m in re.finditer(rf"{re.escape(MODEL.name)}:(\d+), state", out)
    }
    for tag in ("ksleep", "krecheck", "uwake"):
        assert _tag_line(tag) not in unreached, f"@reach:{tag} never executed:\n{out}"


@pytest.mark.parametrize(
    "broken",
    [
        "BROKEN_ANY_NO_RECHECK",
        "BROKEN_ANY_ONE_FLAG",
        "BROKEN_ANY_CHAN_WAKE_ONLY",
        "BROKEN_ANY_LATE_DRAIN",
        "BROKEN_ANY_NO_ARM",
        "BROKEN_ANY_LATE_NAME",
    ],
)
def test_seeded_lost_wakeup_is_found(tmp_path: Path, broken: str) -> None:
    work, out = _pan(tmp_path, f"-D{broken}")
    assert re.search(r"errors: [1-9]", out), f"SPIN did not find {broken}:\n{out}"
    assert "invalid end state" in out, out
    # the counter-example ends with the kernel asleep and a message waiting
    trail = _run([_tool("spin"), f"-D{broken}", "-t", "-p", "-g", MODEL.name], work)
    asleep = re.findall(r"asleep\[\d\] = (\d)", trail)
    assert asleep and asleep[-1] == "1", trail[-3000:]
    assert re.search(rf"{re.escape(MODEL.name)}:{_tag_line('ksleep')}\b", trail), trail[-3000:]


def test_model_constants_match_the_abi() -> None:
    header = HEADER.read_text()
    model = MODEL.read_text()
    for name in ("KUP_TURN_KERNEL", "KUP_TURN_USER"):
        h = re.search(rf"#define {name}\s+(0x[0-9a-fA-F]+)U", header)
        m = re.search(rf"#define {name}\s+(\d+)", model)
        assert h and m, name
        assert int(h.group(1), 16) == int(m.group(1)), name
