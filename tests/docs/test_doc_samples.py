"""The documentation's samples, run as written: the code a reader copies
out of README.md and docs/*.md compiles and runs against a real kupsim and
a real kupd, and the demo's steps and a lease by hand (docs/kupctl.md) run
as shell scripts.  Each sample is taken from the document itself (a fenced block
found by a line it holds), so a sample edited out of step with the code
fails here.  The Node and C++ client samples are run by tests/node and
tests/cpp, which build those clients."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kupd.testing import REPO_ROOT, doc_block, kupd, kupsim

__all__: list[str] = []

TIMEOUT = 120.0


def doc_line(doc: str, lang: str, marker: str, start: str) -> str:
    """The command line of that block that starts with ``start`` (with its
    continuation lines), the comment after it dropped."""
    block = doc_block(doc, lang, marker).replace("\\\n", " ")
    lines = [ln.split("#", 1)[0].strip() for ln in block.splitlines()]
    found = [ln for ln in lines if ln.startswith(start)]
    assert len(found) == 1, f"{doc}: no single {start!r} line in the block of {marker!r}"
    return found[0]


def _run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, check=False, **kw)
    assert proc.returncode == 0, f"{argv}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _module_source() -> str:
    return doc_block("README.md", "c", "int kup_module_init(void)")


def test_readme_module_compiles_with_its_command_and_serves_in_kupsim(tmp_path: Path) -> None:
    """README's whole module, compiled with README's own `cc` line (plus
    -Wall -Wextra -Werror), runs in kupsim ("kupsim: ready mydev") and
    answers two users in turn, each message with its length."""
    (tmp_path / "mymod.c").write_text(_module_source())
    cc = doc_line("README.md", "sh", "compile a module", "cc ").split()
    cc = [a.replace("-Ikmod/include", f"-I{REPO_ROOT / 'kmod' / 'include'}") for a in cc]
    _run([*cc, "-Wall", "-Wextra", "-Werror"], cwd=tmp_path)
    from kupd.channel import Device, Kind

    with kupsim(tmp_path / "mymod.so") as sim:
        assert "kupsim: ready mydev" in sim.stdout()
        with Device.open(sim.device_path("mydev")) as dev:
            for _ in range(2):  # the module serves the next user after the first left
                with dev.channel(0) as ch:
                    assert ch.receive(timeout=30).kind == Kind.PASS
                    assert ch.exchange(b"hello", timeout=30).data == b"5 bytes"
                    assert ch.exchange(b"", timeout=30).data == b"0 bytes"


def test_linux_md_builds_readme_module_out_of_tree(tmp_path: Path) -> None:
    """docs/linux.md's wrapper and Makefile build README's module as
    mymod_core.c into mymod.ko against the kernel kup.ko is built for (no
    root, no VM: the VM tests load modules)."""
    kdir = subprocess.run(
        ["make", "-s", "-C", "kmod/linux", "print-kdir"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip
    if kdir.returncode != 0 or not Path(kdir.stdout.strip()).is_dir():
        if os.environ.get("KUPD_REQUIRE_VM") == "1":
            pytest.fail(f"no kernel headers to build against: {kdir.stderr}")
        pytest.skip(f"no kernel headers to build against: {kdir.stderr.strip()}")
    _run(["make", "-s", "-C", "kmod/linux"], cwd=REPO_ROOT)
    (tmp_path / "mymod_core.c").write_text(_module_source())
    (tmp_path / "mymod_linux.c").write_text(doc_block("docs/linux.md", "c", "module_init("))
    makefile = doc_block("docs/linux.md", "make", "obj-m")
    assert "/path/to/kupd/kmod" in makefile
    makefile = makefile.replace("/path/to/kupd/kmod", str(REPO_ROOT / "kmod"))
    (tmp_path / "Makefile").write_text(makefile)
    _run(["make"], cwd=tmp_path)
    assert (tmp_path / "mymod.ko").is_file()


def test_readme_libkup_sample_talks_to_echo(tmp_path: Path) -> None:
    """README's libkup calls, in a main() of their own, built with README's
    command line for a libkup program, against kupsim's echo."""
    body = doc_block("README.md", "c", "kernproxy_open(")
    (tmp_path / "sample.c").write_text(
        '#include <stdio.h>\n#include "kup.h"\nint main(void)\n{\n'
        + body
        + 'printf("%u %zu %d %d\\n", m.kind, m.len, p == NULL, fd >= 0);\nreturn 0;\n}\n'
    )
    # README's own command line (plus warnings), a sample of its own named
    cc = doc_line("README.md", "sh", "build a libkup program", "cc ").split()
    cc = [
        a.replace("-Ikmod/include", f"-I{REPO_ROOT / 'kmod' / 'include'}")
        .replace("kmod/out/", f"{REPO_ROOT / 'kmod' / 'out'}/")
        .replace("my-program", "sample")
        for a in cc
    ]
    _run([*cc, "-Wall", "-Wextra", "-Werror"], cwd=tmp_path)
    with kupsim("echo") as sim:
        p = _run([str(tmp_path / "sample")], env=sim.env())
    # the reply to "hello" on channel 0: DATA (1), 5 bytes; the seed's
    # non-blocking receive after it finds nothing; a pollable fd
    assert p.stdout == "1 5 1 1\n", p


def test_readme_channel_layer_sample(tmp_path: Path) -> None:
    body = doc_block("README.md", "python", "from kupd.channel import Device")
    script = tmp_path / "sample.py"
    script.write_text(body + "    print(msg.data, msg.kind.name, msg.seq)\n")
    with kupsim("echo") as sim:
        p = _run([sys.executable, str(script)], env=sim.env())
    assert p.stdout == "b'again' DATA 3\n", p


@pytest.mark.parametrize(
    ("doc", "marker"),
    [("README.md", "from kupclient import Client "), ("docs/gateway.md", "lease_exchange(")],
)
def test_python_client_samples_run_against_kupd(tmp_path: Path, doc: str, marker: str) -> None:
    """The Python client samples, at kupd's socket instead of the default
    path, run to their end (the watch included)."""
    body = doc_block(doc, "python", marker)
    assert body.count('"/run/kupd/kupd.sock"') == 1
    with kupsim("echo") as sim, kupd(sim=sim, devices=("echo:2",)) as k:
        (tmp_path / "sample.py").write_text(body.replace("/run/kupd/kupd.sock", str(k.socket)))
        p = _run([sys.executable, str(tmp_path / "sample.py")])
    assert "b'ping'" in p.stdout or "b'PING'" in p.stdout, p
    assert "DEVICE_APPEARED echo" in p.stdout, p


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_kupctl_md_demo_steps_by_hand_run_as_a_script() -> None:
    """docs/kupctl.md's "demo's gateway step by hand", as a bash script
    from the repository's root (set -e; the metrics port a free one): every
    command succeeds and prints what its comment says."""
    block = doc_block("docs/kupctl.md", "sh", "RUN=$(mktemp -d)")
    port = str(_free_port())
    assert block.count("9464") == 2
    # a failing step must not leave kupsim and kupd running
    script = "set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n"
    script += block.replace("9464", port)
    p = subprocess.run(
        ["bash", "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=TIMEOUT, check=False, env={**os.environ, "KUPD_SOCKET": ""},
    )  # fmt: skip
    report = f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    assert p.returncode == 0, report
    out = p.stdout
    assert "kupsim: ready echo\n" in out and re.search(r"^SERVING$", out, re.M), report
    assert re.search(r"^echo +ok +1 +128 +128 +1 +4096 +2 ", out, re.M), report
    assert re.search(r"^#2 DATA \(5 bytes\): (hello|HELLO)$", out, re.M), report
    assert "#2 DATA (5 bytes): HELLO\npassed the turn\n#3 PASS\n" in out, report
    assert re.search(r"^echo +3 +2 +3 +5 +5 +0$", out, re.M), report  # stats: channel 3


def test_kupctl_md_lease_by_hand_prints_what_its_comments_say() -> None:
    """docs/kupctl.md's "A lease by hand", as a bash script with kupctl on
    PATH and $KUPD_SOCKET at a real kupd: each command prints what its
    comment says."""
    block = doc_block("docs/kupctl.md", "sh", 'L=$(kupctl attach echo --channel 4)')
    expected = [
        ln.split("#", 1)[1].strip()
        for ln in block.splitlines()
        if ln.startswith("kupctl ") and "#" in ln
    ]
    assert expected, block
    venv_bin = Path(sys.executable).parent
    with kupsim("echo") as sim, kupd(sim=sim, devices=("echo:2",)) as k:
        env = {**os.environ, "KUPD_SOCKET": k.socket, "PATH": f"{venv_bin}:{os.environ['PATH']}"}
        p = subprocess.run(
            ["bash", "-c", "set -euo pipefail\n" + block], capture_output=True, text=True,
            timeout=TIMEOUT, check=False, env=env,
        )  # fmt: skip
    report = f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    assert p.returncode == 0, report
    out = p.stdout.splitlines()
    assert out[: len(expected)] == expected, report
    assert len(out) == len(expected) + 1 and out[-1].startswith("released "), report
