"""kupd.audit.AuditLog on a filesystem that fills up: whole JSON lines only,
and the records that could not be written are counted in the file."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kupd.audit import AuditLog


@contextlib.contextmanager
def small_fs(where: Path, size: str = "64k") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``where`` (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_disk_leaves_whole_lines_and_counts_what_it_lost(tmp_path: Path) -> None:
    with small_fs(tmp_path / "fs") as fs:
        audit = AuditLog(str(fs / "audit.log"))
        try:
            filler = fs / "filler"
            with contextlib.suppress(OSError), filler.open("wb") as f:
                f.write(b"x" * (60 * 1024))  # leaves a little room, then none
            # long device names: a line does not fit in the last free bytes
            for i in range(200):
                audit.denial("bob", "call", f"dev{i:03d}-" + "n" * 300, None, "grant")
            assert audit.lost > 0, "the disk never filled up"
            lost = audit.lost
            filler.unlink()
            audit.denial("bob", "call", "after", None, "grant")
            audit.admin("reload", via="SIGHUP", ok=True)
            assert audit.lost == 0
            lines = (fs / "audit.log").read_text().splitlines()
        finally:
            audit.close()
    recs = [json.loads(line) for line in lines]  # every line whole JSON
    written = [r for r in recs if r["event"] == "denied"]
    (gap,) = [r for r in recs if r["event"] == "lost"]
    assert gap["lost"] == lost, gap
    assert len(written) + lost == 201, (len(written), lost)
    assert recs[-3:] == [gap, *recs[-2:]] and recs[-2]["device"] == "after"
    assert recs[-1]["action"] == "reload"
    # the denials that were written are the first ones, in order
    assert [r["device"][:6] for r in written[:-1]] == [
        f"dev{i:03d}" for i in range(len(written) - 1)
    ]
