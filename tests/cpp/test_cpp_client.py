"""The C++ client (clients/cpp: kupclient.hpp, libkupclient.a) against a real
kupd + kupsim.

clients/cpp is built once per run (``make -C clients/cpp all asan``: the
library, the example, and the test program plain and under AddressSanitizer
+ UBSan; make skips what is up to date), in the background from the end of
collection on when a selected test needs it (tests/cpp/conftest.py, as
tests/vm's VM runs): in a fresh clone that is a minute or more of compiling
the rest of the session's tests, which mostly sleep on deadlines, run
beside.  Debian's grpc++ / protobuf packages are installed by
scripts/setup-apt.sh (``make test`` runs it); a machine without them fails
the tests that need the build, naming them -- never a skip.

The test program (clients/cpp/test/kup_client_test.cpp) runs its tests in
turn against one kupd with call_timeout 2 s (a Call without a timeout
gets kupd's) and call_quarantine 1 s (the Calls it leaves unanswered give
their pool channel back soon), once per build; its big_messages test
runs against a second kupd, whose echo has 4 MiB channels, its
kupd_not_answering test stops the first kupd (SIGSTOP) for a few seconds,
and its kupd_shutdown and kupd_killed tests each end a kupd of their own
(SIGTERM, SIGKILL) under a waiting Watch and Session.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType

import pytest

from kupd.testing import REPO_ROOT, Kupd, doc_block, wait_until

sys.path.insert(0, str(REPO_ROOT / "tests" / "gateway"))
from attach_recorder import AttachRecorder  # tests/gateway's
from h2stall import StallProxy  # tests/gateway's

CPP_DIR = REPO_ROOT / "clients" / "cpp"
BUILD_TIMEOUT = 1200.0
RUN_TIMEOUT = 300.0

# The first test that needs the build may wait for it (several minutes on
# a busy 2-core machine) inside its own time.
pytestmark = pytest.mark.timeout(BUILD_TIMEOUT + RUN_TIMEOUT + 120)
#: The build's niceness: it runs beside the session's other tests, whose
#: deadlines must get the CPU first (tests/vm's VM_NICE).
BUILD_NICE = 10
#: How long a build being stopped (the session's end) has, after SIGTERM,
#: to delete what it was writing (make and gcc do) before SIGKILL.
STOP_GRACE = 10.0

#: The test program's tests (its TESTS table): each must have passed.
CPP_TESTS = 19

#: The builds of the test program: plain, and under ASan + UBSan.
BINARIES = {
    "plain": CPP_DIR / "build" / "kup_client_test",
    "asan": CPP_DIR / "build" / "asan" / "kup_client_test",
}


#: The build, and the lock file that serialises it against other sessions'.
MAKE_ARGV = ("make", "-C", str(CPP_DIR), "-j2", "all", "asan")
MAKE_LOCK = CPP_DIR / "build" / ".make.lock"


class CppBuild:
    """``argv`` (``make -C clients/cpp -j2 all asan``) in a background
    thread, from :meth:`start` on (once), at niceness BUILD_NICE in a
    process group of its own, holding the lock file ``lock`` (flock(1):
    two sessions' builds take turns, and one waiting for the lock is
    stopped as one building).  :meth:`wait` returns once it succeeded and raises
    AssertionError with make's output if it failed -- in the fixture of the
    tests that need it, so a failed build fails them, not the collection.
    :meth:`close` stops it (SIGTERM to the group, so make deletes the
    target it was writing, then SIGKILL) and waits for the thread."""

    def __init__(self, argv: Sequence[str] = MAKE_ARGV, lock: Path = MAKE_LOCK) -> None:
        self._cmd = ["nice", "-n", str(BUILD_NICE), "flock", str(lock), *argv]
        self._lock_file = lock
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen[str] | None = None
        self._stopped = False
        self._done = threading.Event()
        self._error: str | None = None
        #: the build's wall time, seconds (once done)
        self.seconds = 0.0

    def start(self) -> None:
        with self._lock:
            if self._thread is None and not self._stopped:
                self._thread = threading.Thread(target=self._run, name="cpp-build", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        cmd = self._cmd
        try:
            self._lock_file.parent.mkdir(exist_ok=True)
            with self._lock:
                if self._stopped:
                    raise RuntimeError("the test session ended before it started")
                self._proc = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True, start_new_session=True,
                )  # fmt: skip
            t0 = time.monotonic()
            try:
                out, err = self._proc.communicate(timeout=BUILD_TIMEOUT)
                self.seconds = time.monotonic() - t0
            except subprocess.TimeoutExpired:
                _stop_group(self._proc)
                out, err = self._proc.communicate()
                raise RuntimeError(f"not done in {BUILD_TIMEOUT:.0f} s:\n{out}\n{err}") from None
            if self._proc.returncode != 0:
                stopped = " (stopped: the test session ended)" if self._stopped else ""
                raise RuntimeError(f"exit status {self._proc.returncode}{stopped}:\n{out}\n{err}")
        except Exception as e:  # reported by every test that needs the build
            self._error = f"building clients/cpp ({' '.join(cmd)}) failed: {e}"
        finally:
            self._done.set()

    def wait(self) -> float:
        """Seconds waited for it."""
        self.start()
        t0 = time.monotonic()
        self._done.wait()
        if self._error is not None:
            raise AssertionError(self._error)
        return time.monotonic() - t0

    def close(self) -> None:
        with self._lock:
            self._stopped = True
            proc, thread = self._proc, self._thread
        if proc is not None:
            _stop_group(proc)
        if thread is not None:
            thread.join()
        elif not self._done.is_set():  # never started: nothing to wait for
            self._error = "clients/cpp was not built: the test session ended first"
            self._done.set()


def _stop_group(proc: subprocess.Popen[str]) -> None:
    """SIGTERM to the build's process group (make deletes a target it was
    writing, gcc its output), then SIGKILL to what is left of it after
    STOP_GRACE."""
    pgid = proc.pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE
    while _group_alive(pgid) and time.monotonic() < deadline:
        proc.poll()  # (the leader's zombie is ours to reap)
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (a zombie does not)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid pgrp ...": comm may hold spaces and ")"
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


_BUILD = pytest.StashKey[CppBuild]()


def start_cpp_build(session: pytest.Session) -> CppBuild:
    """The session's build of clients/cpp, started (once).  Called by
    tests/cpp/conftest.py when collection is done and some selected test
    needs it; the caller closes it."""
    build = session.config.stash.get(_BUILD, None)
    if build is None:
        build = session.config.stash[_BUILD] = CppBuild()
    build.start()
    return build


@pytest.fixture(scope="session")
def _cpp_builder(request: pytest.FixtureRequest) -> Iterator[CppBuild]:
    # (closed here too when tests/cpp/conftest.py did not start it)
    build = start_cpp_build(request.session)
    yield build
    build.close()


@pytest.fixture(scope="module")
def cpp_build(_cpp_builder: CppBuild) -> None:
    """clients/cpp built: waits for the session's build (started in the
    background at collection's end); its failure fails the test, with
    make's output (clients/cpp/Makefile names a missing package)."""
    waited = _cpp_builder.wait()
    print(
        f"\nclients/cpp: make all asan took {_cpp_builder.seconds:.1f}s at niceness "
        f"{BUILD_NICE} (from the end of collection on, beside the session's other tests); "
        f"the tests waited {waited:.1f}s of it"
    )


@pytest.fixture(scope="module")
def kupd_gw(cpp_build: None, cli_gateway: ModuleType) -> Iterator[Kupd]:
    args = ("--call-timeout", "2", "--call-quarantine", "1")
    with cli_gateway.gateway(("echo:2",), args=args) as gw:
        yield gw


@pytest.fixture(scope="module")
def kupd_socket(kupd_gw: Kupd) -> str:
    return kupd_gw.socket


def _run(
    argv: list[str | Path], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def big_kupd_socket(cpp_build: None, cli_gateway: ModuleType) -> Iterator[str]:
    """kupd over an echo with 4 MiB channels (KUP_MAX_PAGES pages of 4 KiB)."""
    sim_env = {**os.environ, "KUP_PARAM_ECHO_CHANNELS": "4", "KUP_PARAM_ECHO_PAGES": "1024"}
    with cli_gateway.gateway(("echo:2",), sim_env=sim_env) as gw:
        yield gw.socket


def _run_tests(build: str, socket: str, *names: str, env: dict[str, str] | None = None) -> str:
    """The test program of ``build`` against ``socket``: its stdout, every
    test passed (``names``: only those)."""
    # ASan's leak check at exit included; UBSan stops at its first finding
    env = {
        "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0",
        "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
        **(env or {}),
    }
    proc = _run([BINARIES[build], socket, "echo", *names], env)
    report = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, report
    assert "# fail 0" in proc.stdout, report
    passed = re.search(r"^# pass (\d+)$", proc.stdout, re.M)
    assert passed and int(passed.group(1)) == (len(names) or CPP_TESTS), report
    assert "Sanitizer" not in proc.stderr, report
    return proc.stdout


@pytest.mark.parametrize("build", sorted(BINARIES))
def test_cpp_client(kupd_socket: str, build: str) -> None:
    _run_tests(build, kupd_socket)


@pytest.mark.parametrize("build", sorted(BINARIES))
def test_cpp_client_kupd_not_answering(kupd_gw: Kupd, build: str) -> None:
    """A Session operation kupd leaves unanswered (the test stops kupd for
    about 5 s) fails after its timeout + KUPD_GRACE and ends the session."""
    _run_tests(build, kupd_gw.socket, "kupd_not_answering", env={"KUPD_PID": str(kupd_gw.pid)})


@pytest.mark.parametrize("build", sorted(BINARIES))
@pytest.mark.parametrize("name", ["kupd_shutdown", "kupd_killed"])
def test_cpp_client_kupd_goes_away(
    cpp_build: None, cli_gateway: ModuleType, build: str, name: str
) -> None:
    """kupd stopping (SIGTERM: Shutdown after SERVER_SHUTTING_DOWN) or dying
    (SIGKILL: Unavailable, a connection failure) under a Watch waiting in
    next(), a Watch nobody waits on and a Session's waiting receive: each
    ends with that class, and again on the next call; none hangs."""
    # the kupd is the test's own: the program ends it (its SIGTERM exit is
    # still checked)
    with cli_gateway.gateway(("echo:2",), check_exit=name == "kupd_shutdown") as gw:
        _run_tests(build, gw.socket, name, env={"KUPD_PID": str(gw.pid)})


@pytest.mark.parametrize("build", sorted(BINARIES))
def test_cpp_client_receive_past_deadline(
    cpp_build: None, cli_gateway: ModuleType, tmp_path: Path, build: str
) -> None:
    """A lease_receive past its deadline after kupd wrote its reply -- gRPC
    drops the reply -- loses nothing: the next lease_receive names it
    (again_of) and gets the same message."""
    with cli_gateway.gateway(("echo:2",), args=("--lease-idle-timeout", "600")) as gw:
        proxy = StallProxy(str(tmp_path / "stall.sock"), gw.socket)
        try:
            _run_tests(build, proxy.path, "receive_past_deadline", env={"KUPD_DIRECT": gw.socket})
        finally:
            proxy.close()
        assert proxy.status_held.is_set(), "kupd did not answer the receive within its deadline"


@pytest.mark.parametrize("build", sorted(BINARIES))
def test_cpp_client_receive_past_deadline_then_refused(
    cpp_build: None, cli_gateway: ModuleType, tmp_path: Path, build: str
) -> None:
    """The name of a lease_receive past its deadline stays until an
    operation on the lease succeeds: a lease_send refused before it ran
    (TooBig) left kupd's kept message as it was, and the next lease_receive
    named nothing (NotYourTurn 'already received')."""
    with cli_gateway.gateway(("echo:2",), args=("--lease-idle-timeout", "600")) as gw:
        proxy = StallProxy(str(tmp_path / "stall.sock"), gw.socket)
        try:
            _run_tests(
                build,
                proxy.path,
                "receive_past_deadline_then_refused",
                env={"KUPD_DIRECT": gw.socket},
            )
        finally:
            proxy.close()
        assert proxy.status_held.is_set(), "kupd did not answer the receive within its deadline"


@pytest.mark.parametrize("build", sorted(BINARIES))
def test_cpp_client_send_after_receive_past_deadline(
    cpp_build: None, cli_gateway: ModuleType, tmp_path: Path, build: str
) -> None:
    """A lease_send, lease_pass or lease_exchange after a lease_receive past
    its deadline whose reply kupd had written is refused NotYourTurn (it
    names that receive: again_of) -- before, it ran and the message was
    lost -- and the next lease_receive gets the message."""
    with cli_gateway.gateway(("echo:2",), args=("--lease-idle-timeout", "600")) as gw:
        proxy = StallProxy(str(tmp_path / "stall.sock"), gw.socket)
        try:
            _run_tests(
                build,
                proxy.path,
                "send_after_receive_past_deadline",
                env={"KUPD_DIRECT": gw.socket},
            )
        finally:
            proxy.close()
        assert proxy.status_held.is_set(), "kupd did not answer the receive within its deadline"


@pytest.mark.parametrize("build", sorted(BINARIES))
def test_cpp_client_attach_past_deadline(
    cpp_build: None, cli_gateway: ModuleType, tmp_path: Path, build: str
) -> None:
    """An attach past its deadline (its timeout, 2 s: given up on as the
    default 30 s is) after kupd wrote its reply (for kupd: delivered) -- a
    proxy passes the reply and holds kupd's status, and gRPC drops the
    reply with the call -- leaves no lease: the client releases by its
    attach_id before it throws."""
    with cli_gateway.gateway(("echo:2",), args=("--lease-idle-timeout", "600")) as gw:
        proxy = StallProxy(str(tmp_path / "stall.sock"), gw.socket)
        try:
            _run_tests(build, proxy.path, "attach_past_deadline")
        finally:
            proxy.close()
        assert proxy.status_held.is_set(), "kupd did not answer the attach within its deadline"


@pytest.mark.parametrize("build", sorted(BINARIES))
def test_cpp_client_attach_deadline(cpp_build: None, tmp_path: Path, build: str) -> None:
    """An attach without a timeout still carries the documented 30 s
    (kup::ATTACH_DEADLINE); with one, that one -- as the server sees them
    (attach_recorder), not waited out."""
    recorder = AttachRecorder(str(tmp_path / "recorder.sock"))
    try:
        _run_tests(build, recorder.path, "attach_deadline")
    finally:
        recorder.close()
    default, given = recorder.deadlines
    # (gRPC's grpc-timeout header rounds up a little; the rest is the
    # time the call took to arrive)
    assert default is not None and 20.0 < default <= 30.5, recorder.deadlines
    assert given is not None and 0.0 < given <= 3.0, recorder.deadlines


@pytest.mark.parametrize("build", sorted(BINARIES))
@pytest.mark.parametrize(
    "name", ["named_receive_across_clients", "named_exchange_across_clients"]
)
def test_cpp_client_receive_named_across_clients(
    cpp_build: None, cli_gateway: ModuleType, tmp_path: Path, build: str, name: str
) -> None:
    """kup::ReceiveNames, for a program whose receives outlive the client:
    a lease_receive (or lease_exchange) given up on after kupd wrote its
    reply names itself (receive_id); a second, fresh client's lease_send,
    lease_pass and lease_exchange naming it (again_of) are NotYourTurn,
    nothing sent, and its lease_receive naming it gets the message (see
    tests/gateway/test_gw_receive_reply_dropped.py for Python)."""
    with cli_gateway.gateway(("echo:2",), args=("--lease-idle-timeout", "600")) as gw:
        proxy = StallProxy(str(tmp_path / "stall.sock"), gw.socket)
        try:
            _run_tests(build, proxy.path, name, env={"KUPD_DIRECT": gw.socket})
        finally:
            proxy.close()
        assert proxy.status_held.is_set(), "kupd did not answer within the deadline"


@pytest.mark.parametrize("build", sorted(BINARIES))
def test_cpp_client_calls_per_second(
    cpp_build: None, cli_gateway: ModuleType, build: str
) -> None:
    """A kupd whose one tenant may make a Call every 2 s: the refused second
    Call's retry_after() (kup-retry-after-ms)."""
    with cli_gateway.rate_limited_gateway(0.5) as (_, sock):
        _run_tests(build, sock, "calls_per_second", env={"KUPD_RATE": "0.5"})


@pytest.mark.parametrize("build", sorted(BINARIES))
def test_cpp_client_channel_ops_per_second(
    cpp_build: None, cli_gateway: ModuleType, build: str
) -> None:
    """A kupd whose one tenant may run a Session or lease operation every
    10 s: a refused one's retry_after(), in-band on a Session
    (Error.retry_after_ms) as in a lease RPC's status (kup-retry-after-ms)."""
    with cli_gateway.rate_limited_gateway(0.5, channel_ops_per_second=0.1) as (_, sock):
        _run_tests(build, sock, "channel_ops_per_second", env={"KUPD_OPS_RATE": "0.1"})


@pytest.mark.parametrize("build", sorted(BINARIES))
def test_cpp_client_big_messages(big_kupd_socket: str, build: str) -> None:
    _run_tests(build, big_kupd_socket, "big_messages")


def test_cpp_example(kupd_socket: str) -> None:
    proc = _run([CPP_DIR / "build" / "kup_example", kupd_socket, "echo"])
    report = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, report
    assert re.search(r"^device echo: \d+ channels", proc.stdout, re.M), report
    # echo: even channels echo, odd ones upper-case
    call = re.search(r"^call: (\S+) \(pool channel (\d+)\)$", proc.stdout, re.M)
    assert call and call.group(1) == ("ping" if int(call.group(2)) % 2 == 0 else "PING"), report
    session = re.search(r"^session on channel (\d+)$", proc.stdout, re.M)
    assert session, report
    hello = "hello" if int(session.group(1)) % 2 == 0 else "HELLO"
    assert f"hello -> {hello} (seq 2)" in proc.stdout, report


def test_cpp_example_counts_one_channel_in_the_singular(
    cpp_build: None, cli_gateway: ModuleType
) -> None:
    """kup_example's device line says "1 channel" (as kupctl counts one
    byte), not "1 channels", for echo with one channel.  (That channel is
    the Call pool's: the example's Call gets it, its Session then finds
    none free, and it ends there with an error.)"""
    sim_env = {"KUP_PARAM_ECHO_CHANNELS": "1"}
    with cli_gateway.gateway(("echo:1",), sim_env=sim_env) as gw:
        proc = _run([CPP_DIR / "build" / "kup_example", gw.socket, "echo"])
    report = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert re.search(r"^device echo: 1 channel, \d+ bytes per message$", proc.stdout, re.M), report


# ---- the background build (CppBuild), with commands of the tests' own


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_cpp_build_failing_fails_every_wait_with_its_output(tmp_path: Path) -> None:
    """A failed build is an AssertionError with its output, for each test
    that waits for it (not the collection's error: nothing is raised before
    a wait)."""
    build = CppBuild(["sh", "-c", "echo compiling; echo 'no such header' >&2; exit 2"],
                     tmp_path / "lock")  # fmt: skip
    try:
        for _ in range(2):
            with pytest.raises(AssertionError) as e:
                build.wait()
            assert "failed: exit status 2:\ncompiling\n\nno such header" in str(e.value)
    finally:
        build.close()


def test_cpp_build_runs_at_its_niceness(tmp_path: Path) -> None:
    """The build runs at BUILD_NICE above the session's own niceness."""
    out = tmp_path / "nice"
    build = CppBuild(["sh", "-c", f"ps -o ni= -p $$ > {out}"], tmp_path / "lock")
    try:
        build.wait()
    finally:
        build.close()
    assert int(out.read_text()) == os.nice(0) + BUILD_NICE


def test_cpp_build_close_stops_its_whole_process_group(tmp_path: Path) -> None:
    """The session's end stops the build's children too (make's compilers),
    and a test waiting for it then fails saying so."""
    pids = tmp_path / "pids"
    build = CppBuild(["sh", "-c", f"sleep 600 & echo $$ $! > {pids}; wait"], tmp_path / "lock")
    try:
        build.start()
        wait_until(lambda: pids.exists() and len(pids.read_text().split()) == 2, what="the build")
        shell, child = (int(p) for p in pids.read_text().split())
    finally:
        build.close()
    assert not _alive(shell) and not _alive(child)
    with pytest.raises(AssertionError, match=r"\(stopped: the test session ended\)"):
        build.wait()


def _lock_waiters(lock: Path) -> int:
    """How many are blocked waiting for an flock of ``lock`` (/proc/locks:
    a waiter's line has "->" before its type; the inode is field 6's
    third part)."""
    if not lock.exists():
        return 0
    ino = lock.stat().st_ino
    n = 0
    for line in Path("/proc/locks").read_text().splitlines():
        f = line.split()
        if len(f) > 6 and f[1] == "->" and f[2] == "FLOCK" and int(f[6].split(":")[2]) == ino:
            n += 1
    return n


def test_cpp_builds_take_turns_on_the_lock(tmp_path: Path) -> None:
    """A second build (another session's) waits for the first to finish:
    it finds what the first made.  The first is held until the second is
    seen blocked on the lock."""
    lock, go = tmp_path / "lock", tmp_path / "go"
    os.mkfifo(go)
    first = CppBuild(["sh", "-c", f"touch {tmp_path}/started; read x < {go}; "
                      f"touch {tmp_path}/finished"], lock)  # fmt: skip
    second = CppBuild(["test", "-e", str(tmp_path / "finished")], lock)
    try:
        first.start()
        wait_until(lambda: (tmp_path / "started").exists(), what="the first build")
        second.start()
        wait_until(lambda: _lock_waiters(lock) == 1, what="the second build waiting for the lock")
        with open(go, "w") as release:
            release.write("go\n")
        first.wait()
        second.wait()
    finally:
        first.close()
        second.close()


def test_earlier_signatures_still_compile() -> None:
    """A program written against an earlier kupclient.hpp compiles against
    this one (clients/cpp/test/api_compat.cpp takes every public member
    function's address with the type it had): a new parameter came as an
    overload, not a defaulted one, so ``&kup::Client::attach`` as the
    two-argument pointer it was still compiles."""
    proc = subprocess.run(
        ["make", "-s", "-C", str(CPP_DIR), "api-compat"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"


def test_missing_packages_are_named() -> None:
    """Without protoc and grpc_cpp_plugin the build fails naming the Debian
    packages (and what installs them) before compiling anything."""
    proc = subprocess.run(
        [
            "make",
            "-C",
            str(CPP_DIR),
            "check-deps",
            "PROTOC=/nonexistent/protoc",
            "GRPC_CPP_PLUGIN=",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert (
        "missing: protobuf-compiler(protoc) protobuf-compiler-grpc(grpc_cpp_plugin)" in proc.stderr
    )
    for pkg in ("libgrpc++-dev", "protobuf-compiler-grpc", "libprotobuf-dev", "pkg-config"):
        assert pkg in proc.stderr, proc.stderr
    assert "scripts/setup-apt.sh" in proc.stderr


def test_gateway_md_sample_compiles_with_its_command_and_runs(
    kupd_socket: str, tmp_path: Path
) -> None:
    """docs/gateway.md's C++ sample (my_program.cpp), built with the
    document's own command line from the repository's root, runs against
    kupd to its end: a Call, a Session, a lease, a watch event, health."""
    source = doc_block("docs/gateway.md", "cpp", '#include "kupclient.hpp"')
    assert source.count('"/run/kupd/kupd.sock"') == 1
    (tmp_path / "my_program.cpp").write_text(source.replace("/run/kupd/kupd.sock", kupd_socket))
    command = doc_block("docs/gateway.md", "sh", "libkupclient.a").replace("\\\n", " ")
    [line] = [ln.split("#", 1)[0] for ln in command.splitlines() if ln.startswith("c++ ")]
    line = line.replace("my_program.cpp", str(tmp_path / "my_program.cpp"))
    built = subprocess.run(
        ["bash", "-c", f"{line} -o {tmp_path / 'my_program'}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    assert built.returncode == 0, f"{line}\n{built.stdout}\n{built.stderr}"
    proc = _run([tmp_path / "my_program"])
    assert proc.returncode == 0 and proc.stdout == "SERVING\n", proc
