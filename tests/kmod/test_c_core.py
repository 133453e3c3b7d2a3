"""The core's C unit tests (tests/c/test_core.c): kmod/core/kup_core.c linked
with kupsim's glue, driven in-process, under ASan+UBSan and under TSan."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from kmod_util import assert_clean, sanitizer_env

__all__: list[str] = []


def test_core_unit(variant_out: Path) -> None:
    proc = subprocess.run(
        ["nice", str(variant_out / "test_core")],
        capture_output=True,
        text=True,
        timeout=240,
        env=sanitizer_env(),
        check=False,
    )
    assert proc.returncode == 0, (
        f"test_core failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    )
    assert_clean("test_core", proc.stderr)
    # every section ran, every malformed descriptor was refused
    sections = ("create_args", "attach_rules", "turns", "proto", "proto_flood",
                "wait_timeout_kept", "sessions", "shutdown")
    for section in sections:
        assert f"ok {section}" in proc.stdout
    # 41 refusals on device "flood", the last after the 5 s window: at most
    # 10 lines per window, every refusal either logged or counted in a
    # "not logged" summary (logged before the next line that gets through)
    flood = [ln for ln in proc.stderr.splitlines() if ln.startswith("kup: flood")]
    logged = [ln for ln in flood if "protocol error from user: bad message kind" in ln]
    summaries = [int(m.group(1)) for ln in flood
                 if (m := re.fullmatch(r"kup: flood: (\d+) protocol-error lines not logged "
                                       r"\(rate limit\)", ln))]
    assert summaries and len(logged) < 41, flood
    assert len(logged) + sum(summaries) == 41, flood
    assert len(flood) == len(logged) + len(summaries), flood
    assert proc.stdout.count("refused ") == 8
    # the holder's re-entry (-EDEADLK) is logged once per channel, and an
    # unlock by a thread that did not receive is refused with a line
    reentry = [ln for ln in proc.stderr.splitlines()
               if "call kupdev_unlock_channel first (-EDEADLK)" in ln]
    assert len(reentry) == 1 and "send while this thread holds" in reentry[0], reentry
    assert "unlock without a receive by this thread" in proc.stderr
    assert proc.stdout.rstrip().endswith("OK core")
