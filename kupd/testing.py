"""Test helpers: run a real ``kupsim`` kernel host in a private directory.

``kupsim`` (built by ``make -C kmod`` into ``kmod/out/kupsim``) is the KUP
kernel core hosted in a user process: it loads module shared objects and
publishes each device as a unix socket ``RUNDIR/<name>.sock``.  Tests and the
demo use it instead of a real kernel::

    from kupd.testing import kupsim

    with kupsim("echo") as sim:                 # kmod/out/echo.so
        with Device.open(sim.device_path("echo")) as dev:
            ...
        sim.stop()                              # optional: SIGTERM, reap, check

The context manager

* creates a fresh temporary RUNDIR (or uses the one given) and removes it
  afterwards if it created it;
* starts ``kupsim -d RUNDIR module.so ...`` with stdout and stderr captured
  to files (never pipes: a chatty host can never block on a full pipe);
* waits, with a timeout, until kupsim prints its ``kupsim: ready <devices>`` line, and fails
  with kupsim's captured output if it exits or stays silent instead;
* always stops the process on the way out (SIGTERM, then SIGKILL after a
  grace period) and reaps it, whether the body raised or not.

:class:`KupSimError` carries the captured output, so a failing test shows
why kupsim died.  Nothing here depends on pytest.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

__all__ = [
    "REPO_ROOT",
    "KupSim",
    "KupSimError",
    "kmod_out",
    "kupsim",
    "module_path",
]

#: The source tree this module lives in (kupd/ is one level below the root).
REPO_ROOT = Path(__file__).resolve().parents[1]

_DEFAULT_READY_TIMEOUT = 20.0
_READY = "kupsim: ready"  # kupsim's stdout line once every device is published
_DEFAULT_STOP_TIMEOUT = 10.0


class KupSimError(RuntimeError):
    """kupsim could not be started, did not become ready, or exited badly."""

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(f"{message}\n--- kupsim output ---\n{output}" if output else message)
        self.output = output


def kmod_out() -> Path:
    """The directory the native build puts kupsim, libkup and modules in.

    ``$KUP_KMOD_OUT`` overrides the default ``<repo>/kmod/out``.
    """
    env = os.environ.get("KUP_KMOD_OUT")
    return Path(env) if env else REPO_ROOT / "kmod" / "out"


def module_path(module: str | os.PathLike[str]) -> Path:
    """Resolve a module: a bare name ``echo`` means ``kmod/out/echo.so``;
    anything containing a ``/`` or ending in ``.so`` is taken as a path."""
    text = os.fspath(module)
    if "/" in text or text.endswith(".so"):
        path = Path(text)
    else:
        path = kmod_out() / f"{text}.so"
    if not path.is_file():
        raise KupSimError(f"kupsim module {text!r} not found at {path} (run `make -C kmod`)")
    return path


class KupSim:
    """A running kupsim process.  Made by :func:`kupsim`; not started by hand."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        rundir: Path,
        stdout_path: Path,
        stderr_path: Path,
        modules: Sequence[Path],
    ) -> None:
        self.proc = proc
        self.rundir = rundir
        self.modules = tuple(modules)
        self._stdout_path = stdout_path
        self._stderr_path = stderr_path
        self._stopped = False  # stop() ran (and checked the status itself)
        self._final: tuple[str, str] | None = None  # output once the log files are gone
        #: device names from kupsim's ready line
        self.devices: tuple[str, ...] = ()

    # -- facts ------------------------------------------------------------
    @property
    def pid(self) -> int:
        return self.proc.pid

    def device_path(self, name: str) -> str:
        """The socket path of device ``name``; pass it to ``Device.open``."""
        return str(self.rundir / f"{name}.sock")

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """An environment for a child process that should find this kupsim's
        devices by bare name (libkup reads ``$KUPSIM_DIR``)."""
        env = dict(os.environ if base is None else base)
        env["KUPSIM_DIR"] = str(self.rundir)
        return env

    def stdout(self) -> str:
        """kupsim's stdout so far (kept after the context manager exits)."""
        return self._final[0] if self._final is not None else _read(self._stdout_path)

    def stderr(self) -> str:
        """kupsim's stderr so far: module log lines (kept after exit)."""
        return self._final[1] if self._final is not None else _read(self._stderr_path)

    def _freeze_output(self) -> None:
        self._final = (_read(self._stdout_path), _read(self._stderr_path))

    def output(self) -> str:
        """stdout and stderr so far, labelled, for error messages."""
        return f"[stdout]\n{self.stdout()}[stderr]\n{self.stderr()}"

    def running(self) -> bool:
        return self.proc.poll() is None

    # -- control ----------------------------------------------------------
    def signal(self, sig: int) -> None:
        """Send ``sig`` to kupsim (no-op once it has exited)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = _DEFAULT_STOP_TIMEOUT) -> int:
        """Wait for kupsim to exit; :class:`KupSimError` after ``timeout``."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise KupSimError(
                f"kupsim (pid {self.pid}) still running after {timeout:.1f}s", self.output()
            ) from None

    def stop(self, timeout: float = _DEFAULT_STOP_TIMEOUT, check: bool = True) -> int:
        """Unload every module (SIGTERM) and reap kupsim.

        Returns the exit status.  With ``check`` a non-zero status (or having
        to fall back to SIGKILL) raises :class:`KupSimError` with the output.
        """
        self._stopped = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                if check:
                    raise KupSimError(
                        f"kupsim (pid {self.pid}) ignored SIGTERM for {timeout:.1f}s; killed",
                        self.output(),
                    ) from None
        rc = self.proc.returncode
        if check and rc != 0:
            raise KupSimError(f"kupsim exited with status {rc}", self.output())
        return rc

    def kill(self) -> None:
        """SIGKILL and reap (cleanup path; never raises)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=_DEFAULT_STOP_TIMEOUT)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _wait_ready(sim: KupSim, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        for line in sim.stdout().splitlines():
            if line.startswith(_READY):
                sim.devices = tuple(line[len(_READY):].split())
                return
        rc = sim.proc.poll()
        if rc is not None:
            raise KupSimError(f"kupsim exited with status {rc} before it was ready", sim.output())
        if time.monotonic() >= deadline:
            raise KupSimError(f"kupsim printed no ready line within {timeout:.1f}s", sim.output())
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


@contextlib.contextmanager
def kupsim(
    *modules: str | os.PathLike[str],
    rundir: str | os.PathLike[str] | None = None,
    binary: str | os.PathLike[str] | None = None,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    ready_timeout: float = _DEFAULT_READY_TIMEOUT,
    stop_timeout: float = _DEFAULT_STOP_TIMEOUT,
    check_exit: bool = True,
) -> Iterator[KupSim]:
    """Run kupsim with ``modules`` loaded for the duration of the block.

    ``modules`` are names (``"echo"`` = ``kmod/out/echo.so``) or paths.
    ``rundir`` defaults to a fresh temporary directory, removed afterwards.
    ``binary`` defaults to ``kmod/out/kupsim``; ``args`` are extra options.
    On leaving the block kupsim is stopped with SIGTERM (if still running);
    with ``check_exit`` a non-zero exit status then raises
    :class:`KupSimError` (unless the block itself raised).
    """
    if not modules:
        raise KupSimError("kupsim needs at least one module")
    exe = Path(binary) if binary is not None else kmod_out() / "kupsim"
    if not exe.is_file() or not os.access(exe, os.X_OK):
        raise KupSimError(f"kupsim binary missing or not executable: {exe} (run `make -C kmod`)")
    mods = [module_path(m) for m in modules]

    owned_dir: str | None = None
    if rundir is None:
        owned_dir = tempfile.mkdtemp(prefix="kupsim-")
        run = Path(owned_dir)
    else:
        run = Path(rundir)
        run.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="kupsim-log-"))
    stdout_path, stderr_path = logs / "stdout", logs / "stderr"
    sim: KupSim | None = None
    try:
        child_env = dict(os.environ if env is None else env)
        child_env["KUPSIM_DIR"] = str(run)
        with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
            proc = subprocess.Popen(
                [str(exe), *args, "-d", str(run), *(str(m) for m in mods)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=child_env,
                start_new_session=True,  # a ^C at the terminal is not sent to it twice
            )
        sim = KupSim(proc, run, stdout_path, stderr_path, mods)
        _wait_ready(sim, ready_timeout)
        yield sim
        # Only reached when the block did not raise.
        if sim.running():
            sim.stop(timeout=stop_timeout, check=check_exit)
        elif check_exit and not sim._stopped and sim.proc.returncode != 0:
            raise KupSimError(f"kupsim exited with status {sim.proc.returncode}", sim.output())
    finally:
        if sim is not None:
            sim.kill()
            sim._freeze_output()
        if owned_dir is not None:
            shutil.rmtree(owned_dir, ignore_errors=True)
        shutil.rmtree(logs, ignore_errors=True)
