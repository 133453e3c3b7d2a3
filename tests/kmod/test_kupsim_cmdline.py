"""kupsim's command line and environment, run under ASan+UBSan and TSan:
a module named without a '/' is a file in the current directory; a module
given twice and a run directory too long for its sockets are refused at
start (exit 2, a message naming what was wrong), never half-started; a
KUP_PARAM_* value that is not a decimal int is logged and the module gets
its default (kup_module.h's rule, the same on Linux and FreeBSD); -h and
--help print the usage to stdout."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from kmod_util import assert_clean, sanitizer_env

__all__: list[str] = []

TIMEOUT = 60.0
READY = "kupsim: ready"


def start(
    exe: Path, *args: str, cwd: Path | None = None, env: Mapping[str, str] | None = None
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(exe), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env=sanitizer_env(env),
        start_new_session=True,
    )


def stop(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    """SIGTERM if still running; (status, rest of stdout, stderr)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, out, err


def ready_line(proc: subprocess.Popen[str]) -> str | None:
    """kupsim's ready line, or None when it exited without one (its stdout
    says nothing else; a kupsim that wrongly starts shows up here at once
    instead of as a timeout)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            return None
        if line.startswith(READY):
            return line.strip()
    raise AssertionError(f"kupsim printed no ready line within {TIMEOUT}s")


def serves_echo(
    exe: Path, *args: str, cwd: Path | None = None, env: Mapping[str, str] | None = None
) -> str:
    """Run kupsim expecting it to publish echo: the ready line, then exit 0
    at SIGTERM with no sanitizer report; returns its stderr."""
    proc = start(exe, *args, cwd=cwd, env=env)
    try:
        line = ready_line(proc)
    finally:
        rc, out, err = stop(proc)
    assert line == f"{READY} echo", f"{line!r}\n{out}\n{err}"
    assert rc == 0, f"exit {rc}:\n{out}\n{err}"
    assert_clean("kupsim", err)
    return err


def refused(exe: Path, *args: str, env: Mapping[str, str] | None = None) -> str:
    """Run kupsim expecting a refusal at start: exit 2, no ready line, no
    sanitizer report; returns its stderr."""
    proc = start(exe, *args, env=env)
    try:
        line = ready_line(proc)
    finally:
        rc, out, err = stop(proc)
    assert line is None, f"kupsim started ({line!r}), should have refused:\n{err}"
    assert rc == 2, f"exit {rc}, expected 2:\n{out}\n{err}"
    assert_clean("kupsim", err)
    return err


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path (pytest's tmp_path may be
    near the socket path limit on its own)."""
    d = Path(tempfile.mkdtemp(prefix="kupc-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_bare_module_name_is_a_file_in_cwd(variant_out: Path, short_tmp: Path) -> None:
    """``kupsim -d DIR echo.so`` loads ./echo.so (README's own example),
    not a library-path lookup: an echo.so earlier on LD_LIBRARY_PATH (here
    the hostile module under that name) is not the one loaded."""
    work = short_tmp / "cwd"
    libdir = short_tmp / "lib"
    work.mkdir()
    libdir.mkdir()
    shutil.copy(variant_out / "echo.so", work / "echo.so")
    shutil.copy(variant_out / "hostile.so", libdir / "echo.so")
    env = {**os.environ, "LD_LIBRARY_PATH": str(libdir)}
    serves_echo(variant_out / "kupsim", "-d", str(short_tmp / "run"), "echo.so", cwd=work, env=env)


def test_module_given_twice(variant_out: Path, short_tmp: Path) -> None:
    """The same module twice (same argument, or another path to the same
    file) is refused before any init runs: no "name taken", no device left
    registered."""
    exe = variant_out / "kupsim"
    echo = str(variant_out / "echo.so")
    err = refused(exe, "-d", str(short_tmp / "r1"), echo, echo)
    assert f"given twice (as {echo} and as {echo})" in err, err
    assert "echo: device echo ready" not in err, err

    link = short_tmp / "other-name.so"
    link.symlink_to(variant_out / "echo.so")
    rot13 = str(variant_out / "rot13.so")
    err = refused(exe, "-d", str(short_tmp / "r2"), echo, rot13, str(link))
    assert f"given twice (as {echo} and as {link})" in err, err
    # refused before the first module's init, not after it
    assert "device echo ready" not in err and "device rot13 ready" not in err, err


def test_rundir_too_long_for_socket_path(variant_out: Path, short_tmp: Path) -> None:
    """A device's socket is RUNDIR/<name>.sock, bound through sun_path (108
    bytes).  A RUNDIR with no room for any name is refused at start; one
    with no room for "echo" fails when echo publishes, naming the device
    and the cause -- it used to say "kup_module_init failed: Cannot allocate
    memory" (echo's errno for any kupdev_create failure) and exit 1; the
    longest RUNDIR echo fits in works."""
    exe = variant_out / "kupsim"
    base = str(short_tmp) + "/"

    def rundir(n: int, c: str) -> str:
        d = base + c * (n - len(base))
        assert len(d) == n
        return d

    no_room = rundir(101, "x")  # + "/x.sock" + NUL = 109
    err = refused(exe, "-d", no_room, str(variant_out / "echo.so"))
    assert f"run directory path too long for the devices' unix sockets: {no_room}" in err, err
    assert "kup_module_init" not in err and "device echo ready" not in err, err

    no_echo = rundir(98, "y")  # + "/echo.sock" + NUL = 109
    err = refused(exe, "-d", no_echo, str(variant_out / "echo.so"))
    assert f"device echo: its socket path {no_echo}/echo.sock is too long" in err, err
    assert "its device could not be published (see above)" in err, err
    assert "Cannot allocate memory" not in err, err

    serves_echo(exe, "-d", rundir(97, "z"), str(variant_out / "echo.so"))


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("abc", "is not a decimal integer"),
        ("5x", "is not a decimal integer"),
        ("0x10", "is not a decimal integer"),
        (" 5", "is not a decimal integer"),
        ("5 ", "is not a decimal integer"),
        ("-", "is not a decimal integer"),
        ("99999999999", "is out of range"),
        ("-2147483649", "is out of range"),
    ],
)
def test_bad_param_is_logged_and_defaulted(
    variant_out: Path, short_tmp: Path, value: str, why: str
) -> None:
    """A KUP_PARAM_* typo gives the module its default, as on the kernel
    hosts (kupsim used to refuse to start, after running init with the
    default): the line names the module, the parameter, the variable, the
    value and what is wrong with it."""
    env = {**os.environ, "KUP_PARAM_ECHO_CHANNELS": value}
    err = serves_echo(
        variant_out / "kupsim", "-d", str(short_tmp / "run"), str(variant_out / "echo.so"), env=env
    )
    line = f'kup: module echo: parameter channels (KUP_PARAM_ECHO_CHANNELS) = "{value}" {why}'
    assert line in err, err
    assert "using the default 128" in err, err
    assert "echo: device echo ready (128 channels, 1 pages)" in err, err


def test_good_params_still_apply(variant_out: Path, short_tmp: Path) -> None:
    """In-range decimal values (a leading "+" or "0" included: "010" is
    ten, not octal eight) are taken, and not logged."""
    env = {**os.environ, "KUP_PARAM_ECHO_CHANNELS": "+16", "KUP_PARAM_ECHO_PAGES": "02"}
    run = str(short_tmp / "run")
    err = serves_echo(variant_out / "kupsim", "-d", run, str(variant_out / "echo.so"), env=env)
    assert "echo: device echo ready (16 channels, 2 pages)" in err, err
    assert "kup: module echo: parameter" not in err, err


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_is_on_stdout_and_exits_0(variant_out: Path, flag: str) -> None:
    """Help asked for is not an error; a wrong option is (usage on stderr)."""
    proc = start(variant_out / "kupsim", flag, "echo.so")
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, (out, err)
    assert out.startswith("usage: kupsim") and "KUP_PARAM_<MODULE>_<NAME>" in out, out
    assert_clean("kupsim " + flag, err)
    proc = start(variant_out / "kupsim", "--bogus")
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 2 and out == "" and "usage: kupsim" in err, (out, err)


def test_a_run_directory_kupsim_makes_is_private(variant_out: Path, short_tmp: Path) -> None:
    """Whoever reaches a device socket attaches channels past kupd's policy:
    a run directory kupsim creates is 0700 (it was 0755, with 0666 sockets)."""
    run = short_tmp / "new-run"
    serves_echo(variant_out / "kupsim", "-d", str(run), str(variant_out / "echo.so"))
    assert stat.S_IMODE(run.stat().st_mode) == 0o700


def test_a_link_at_the_lock_is_not_followed(variant_out: Path, short_tmp: Path) -> None:
    """kupsim.lock planted as a link in a run directory others can write:
    kupsim used to create the file it named (as root: anywhere)."""
    run = short_tmp / "run"
    run.mkdir()
    target = short_tmp / "made-by-kupsim"
    (run / "kupsim.lock").symlink_to(target)
    proc = start(variant_out / "kupsim", "-d", str(run), str(variant_out / "echo.so"))
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode != 0 and "cannot open lock file" in err, (proc.returncode, err)
    assert not target.exists()
