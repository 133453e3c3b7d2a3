"""The core's C unit tests (tests/c/test_core.c): kmod/core/kup_core.c linked
with kupsim's glue, driven in-process, under ASan+UBSan and under TSan."""

from __future__ import annotations

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
    sections = ("create_args", "attach_rules", "turns", "proto", "proto_flood", "sessions",
                "shutdown")
    for section in sections:
        assert f"ok {section}" in proc.stdout
    # 41 refusals on device "flood": 10 lines in the first 5 s window, then
    # the summary of the 30 left out and the 41st refusal's own line
    flood = [ln for ln in proc.stderr.splitlines() if ln.startswith("kup: flood")]
    assert flood.count("kup: flood: 30 protocol-error lines not logged (rate limit)") == 1, flood
    refusals = [ln for ln in flood if "protocol error from user: bad message kind" in ln]
    assert len(refusals) == 11, flood
    assert flood[10] == "kup: flood: 30 protocol-error lines not logged (rate limit)", flood
    assert proc.stdout.count("refused ") == 8
    assert proc.stdout.rstrip().endswith("OK core")
