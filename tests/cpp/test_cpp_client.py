"""The C++ client (clients/cpp: kupclient.hpp, libkupclient.a) against a real
kupd + kupsim.

clients/cpp is built once per run (``make -C clients/cpp all asan``: the
library, the example, and the test program plain and under AddressSanitizer
+ UBSan; make skips what is up to date).  Debian's grpc++ / protobuf
packages are installed by scripts/setup-apt.sh (``make test`` runs it); a
machine without them fails here, naming them -- never a skip.

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

import fcntl
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from kupd.testing import REPO_ROOT, Kupd, doc_block

sys.path.insert(0, str(REPO_ROOT / "tests" / "gateway"))
from attach_recorder import AttachRecorder  # tests/gateway's
from h2stall import StallProxy  # tests/gateway's

CPP_DIR = REPO_ROOT / "clients" / "cpp"
BUILD_TIMEOUT = 1200.0
RUN_TIMEOUT = 300.0

# The first test pays for the build (several minutes on a busy 2-core
# machine) inside its own time.
pytestmark = pytest.mark.timeout(BUILD_TIMEOUT + RUN_TIMEOUT + 120)

#: The test program's tests (its TESTS table): each must have passed.
CPP_TESTS = 18

#: The builds of the test program: plain, and under ASan + UBSan.
BINARIES = {
    "plain": CPP_DIR / "build" / "kup_client_test",
    "asan": CPP_DIR / "build" / "asan" / "kup_client_test",
}


@pytest.fixture(scope="module")
def cpp_build() -> None:
    """``make -C clients/cpp all asan`` (serialised by a lock file against
    parallel runs; clients/cpp/Makefile names a missing package)."""
    (CPP_DIR / "build").mkdir(exist_ok=True)
    with open(CPP_DIR / "build" / ".make.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = subprocess.run(
            ["make", "-C", str(CPP_DIR), "-j2", "all", "asan"],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
            check=False,
        )
    assert proc.returncode == 0, f"building clients/cpp failed:\n{proc.stdout}\n{proc.stderr}"


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
