"""``kupctl recv`` given up on after kupd wrote its reply loses nothing.

Each ``kupctl recv`` is a process of its own, so the Python client's own
memory of a receive given up on (``again_of``) ended with it: a ``kupctl
recv`` interrupted (^C), past its ``--timeout`` or cut off from kupd after
kupd had written the kernel's message lost that message for good -- the
next ``kupctl recv`` was refused "this side holds the turn (the kernel's
message was already received)".  Now kupctl names each receive and, when
it gives up, prints the command that asks again (``--again-of NAME``; in
``--json`` mode the name and the command are fields of the error object),
which gets the same message.

The window -- kupd has written the reply, kupctl has not got it -- is held
open by tests/gateway's h2stall proxy between kupctl and kupd.  Real
kupsim (echo), kupd (the console script) and kupctl processes.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import select
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_gateway import Gateway, console_script, spawn_kupctl

from kupclient import Client, Kind
from kupd.testing import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "tests" / "gateway"))
from h2stall import StallProxy  # tests/gateway's

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_YOUR_TURN = 5
EXIT_DEADLINE = 9
EXIT_UNAVAILABLE = 17
EXIT_INTERRUPTED = 130
#: bounds a hang only (the machine is shared)
TIMEOUT = 60.0
#: kupctl recv --timeout: kupd answers at once (the message is there) and
#: the proxy holds its status; kupctl's gRPC deadline (this + the client's
#: 5 s grace) then passes -- below the client's 10 s ping timeout, as the
#: proxy holds kupd's answer to the ping gRPC sends as the reply comes in
SHORT = "1"
MESSAGE = "the one message"
#: the smallest pipe buffer Linux sets (F_SETPIPE_SZ rounds up to a page)
PIPE_PAGE = 4096


@pytest.fixture
def proxy(gw: Gateway) -> Iterator[StallProxy]:
    p = StallProxy(gw.socket + ".stall", gw.socket)
    yield p
    p.close()


def _lease(gw: Gateway, channel: int) -> Iterator[str]:
    """An Attach lease on echo's (even: echoing unchanged) ``channel``,
    taken directly, its greeting received and MESSAGE sent: the kernel's
    answer is the lease's next message."""
    with Client(gw.socket) as c:
        lease = c.attach("echo", channel).lease_id
        try:
            assert c.lease_receive(lease, timeout=30).kind == Kind.PASS
            c.lease_send(lease, MESSAGE.encode())
            yield lease
        finally:
            c.release(lease)


#: a channel of its own per test (the module's kupd is shared)
_CHANNELS = itertools.count(60, 2)


@pytest.fixture
def lease(gw: Gateway) -> Iterator[str]:
    yield from _lease(gw, next(_CHANNELS))


def _hint(stderr: str, name_in: int) -> list[str]:
    """The command of a plain-text hint (its last line), checked: line
    ``name_in`` says why, naming the receive the command names."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    command = shlex.split(lines[-1])
    assert command[-2] == "--again-of", lines
    name = command[-1]
    assert f"(receive {name})" in lines[name_in], lines
    assert lines[-2].endswith("run:"), lines
    return command


def _ask_again(command: list[str], gw: Gateway) -> subprocess.CompletedProcess[str]:
    """The hinted command, run as printed."""
    return subprocess.run(
        command, capture_output=True, text=True, env=gw.env(), timeout=TIMEOUT, check=False
    )


def _exactly_once(gw: Gateway, lease: str) -> None:
    """The message was received: the turn is this side's (a plain recv is
    refused), and the lease goes on."""
    p = subprocess.run(
        [str(console_script("kupctl")), "--socket", gw.socket, "recv", lease, "--nb"],
        capture_output=True, text=True, env=gw.env(), timeout=TIMEOUT, check=False,
    )  # fmt: skip
    assert p.returncode == EXIT_NOT_YOUR_TURN, (p.returncode, p.stderr)
    assert "already received" in p.stderr, p.stderr
    with Client(gw.socket) as c:
        assert c.lease_exchange(lease, b"next", timeout=30).data == b"next"


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_interrupted_recv_tells_how_to_ask_again(
    gw: Gateway, proxy: StallProxy, lease: str, as_json: bool
) -> None:
    opts = ["--json"] if as_json else []
    p = spawn_kupctl(gw, "--socket", proxy.path, *opts, "recv", lease)
    try:
        assert proxy.status_held.wait(TIMEOUT), "kupd never answered the receive"
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=TIMEOUT)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == EXIT_INTERRUPTED, (p.returncode, err)
    assert out == "", out
    if as_json:
        doc = json.loads(err)
        assert doc["error"] == "interrupted" and doc["exit_code"] == EXIT_INTERRUPTED, doc
        assert doc["command"] == "recv", doc
        command = shlex.split(doc["again_command"])
        assert command[-2:] == ["--again-of", doc["again_of"]], doc
        assert doc["again_command"] in doc["message"], doc
    else:
        assert err.startswith("kupctl: recv interrupted (receive "), err
        command = _hint(err, 0)
    # the same socket (the proxy, now letting everything through), lease
    # and output options
    assert command[1:3] == ["--socket", proxy.path], command
    assert ("--json" in command) == as_json, command
    proxy.resume()
    again = _ask_again(command, gw)
    assert again.returncode == 0, (again.returncode, again.stderr)
    if as_json:
        doc = json.loads(again.stdout)
        assert doc["message"]["kind"] == "data" and doc["message"]["data"] == MESSAGE, doc
    else:
        assert again.stdout.strip().endswith(f"DATA ({len(MESSAGE)} bytes): {MESSAGE}"), again
    _exactly_once(gw, lease)


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_recv_past_its_timeout_tells_how_to_ask_again(
    gw: Gateway, proxy: StallProxy, lease: str, as_json: bool
) -> None:
    opts = ["--json"] if as_json else []
    p = _ask_again(
        [str(console_script("kupctl")), "--socket", proxy.path, *opts, "recv", lease,
         "--timeout", SHORT, "--hex"],
        gw,
    )  # fmt: skip
    assert proxy.status_held.is_set(), "kupd did not answer the receive within its deadline"
    assert p.returncode == EXIT_DEADLINE, (p.returncode, p.stderr)
    if as_json:
        doc = json.loads(p.stderr)
        assert doc["error"] == "DeadlineExceeded" and doc["exit_code"] == EXIT_DEADLINE, doc
        command = shlex.split(doc["again_command"])
        assert command[-2:] == ["--again-of", doc["again_of"]], doc
    else:
        lines = p.stderr.strip().splitlines()
        assert lines[0].startswith("kupctl: DeadlineExceeded: "), lines
        assert lines[1].startswith("kupctl: recv gave up (receive "), lines
        command = _hint(p.stderr, 1)
    assert command[1:3] == ["--socket", proxy.path], command
    assert "--hex" in command and "--timeout" in command, command
    again = _ask_again(command, gw)  # the proxy let go when kupctl cancelled
    assert again.returncode == 0, (again.returncode, again.stderr)
    if as_json:
        assert json.loads(again.stdout)["message"]["data"] == MESSAGE, again.stdout
    else:
        assert again.stdout.strip().endswith(MESSAGE.encode().hex()), again.stdout
    _exactly_once(gw, lease)


def test_recv_whose_connection_broke_tells_how_to_ask_again(
    gw: Gateway, proxy: StallProxy, lease: str
) -> None:
    p = spawn_kupctl(gw, "--socket", proxy.path, "recv", lease)
    try:
        assert proxy.status_held.wait(TIMEOUT), "kupd never answered the receive"
        proxy.cut()
        _, err = p.communicate(timeout=TIMEOUT)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == EXIT_UNAVAILABLE, (p.returncode, err)
    lines = err.strip().splitlines()
    assert lines[0].startswith("kupctl: Unavailable: "), lines
    command = _hint(err, 1)
    again = _ask_again(command, gw)
    assert again.returncode == 0, (again.returncode, again.stderr)
    assert again.stdout.strip().endswith(MESSAGE), again.stdout
    _exactly_once(gw, lease)


def test_again_of_a_name_kupd_kept_nothing_for_is_a_plain_recv(gw: Gateway, lease: str) -> None:
    kupctl = str(console_script("kupctl"))
    p = _ask_again([kupctl, "recv", lease, "--again-of", "never-given-up_0"], gw)
    assert p.returncode == 0, (p.returncode, p.stderr)
    assert p.stdout.strip().endswith(MESSAGE) and p.stderr == "", p
    _exactly_once(gw, lease)


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("two words", "not a receive name: 'two words'"),
        ("", "must not be empty"),
        ("x" * 65, f"not a receive name: '{'x' * 65}' (65 characters)"),
        ("naïve", "not a receive name: 'naïve'"),
        ("semi;colon", "not a receive name: 'semi;colon'"),
    ],
)
def test_a_bad_again_of_is_a_usage_error(gw: Gateway, value: str, needle: str) -> None:
    p = _ask_again([str(console_script("kupctl")), "recv", "somelease", "--again-of", value], gw)
    assert p.returncode == EXIT_USAGE, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("kupctl recv: error: argument --again-of: "), last
    assert needle in last, last


def test_recv_whose_output_is_closed_tells_how_to_ask_again(gw: Gateway, lease: str) -> None:
    """kupctl recv got the message but could not write it: its reader was
    gone (``kupctl recv L | program-that-exited``).  kupctl took the
    message, so it was lost, and kupctl said nothing and exited 0 -- as a
    ``watch | head`` rightly does.  It now exits 1 with the hint, whose
    command gets the message."""
    r, w = os.pipe()
    os.close(r)  # the reader is gone before kupctl writes
    try:
        p = subprocess.run(
            [str(console_script("kupctl")), "--socket", gw.socket, "recv", lease],
            stdout=w, stderr=subprocess.PIPE, text=True, env=gw.env(), timeout=TIMEOUT,
            check=False,
        )  # fmt: skip
    finally:
        os.close(w)
    assert p.returncode == EXIT_FAILURE, (p.returncode, p.stderr)
    assert "output was closed" in p.stderr, p.stderr
    again = _ask_again(_hint(p.stderr, 0), gw)
    assert again.returncode == 0, again.stderr
    assert MESSAGE in again.stdout, again.stdout
    _exactly_once(gw, lease)


def test_recv_whose_output_is_closed_tells_how_to_ask_again_in_json(
    gw: Gateway, lease: str
) -> None:
    """The same with ``--json``: the hint is the JSON error object every
    other failure of a ``--json`` kupctl is (``again_of``,
    ``again_command``), not two lines of text a script cannot parse."""
    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run(
            [str(console_script("kupctl")), "--socket", gw.socket, "--json", "recv", lease],
            stdout=w, stderr=subprocess.PIPE, text=True, env=gw.env(), timeout=TIMEOUT,
            check=False,
        )  # fmt: skip
    finally:
        os.close(w)
    assert p.returncode == EXIT_FAILURE, (p.returncode, p.stderr)
    doc = json.loads(p.stderr)
    assert doc["error"] == "failure" and doc["exit_code"] == EXIT_FAILURE, doc
    assert doc["command"] == "recv" and "output was closed" in doc["message"], doc
    command = shlex.split(doc["again_command"])
    assert command[-2:] == ["--again-of", doc["again_of"]] and "--json" in command, doc
    again = _ask_again(command, gw)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["message"]["data"] == MESSAGE, again.stdout
    _exactly_once(gw, lease)



@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_recv_whose_output_fails_tells_how_to_ask_again(
    gw: Gateway, lease: str, as_json: bool
) -> None:
    """kupctl recv got the message but writing it failed otherwise than a
    closed pipe -- ``kupctl recv L > /dev/full`` (a full disk), an I/O
    error: kupctl died with a traceback, and the message it took was lost
    with no word of how to get it.  It now exits 1 with the hint, whose
    command gets the message."""
    opts = ["--json"] if as_json else []
    with open("/dev/full", "w") as full:
        p = subprocess.run(
            [str(console_script("kupctl")), "--socket", gw.socket, *opts, "recv", lease],
            stdout=full, stderr=subprocess.PIPE, text=True, env=gw.env(), timeout=TIMEOUT,
            check=False,
        )  # fmt: skip
    assert "Traceback" not in p.stderr and "Exception ignored" not in p.stderr, p.stderr
    assert p.returncode == EXIT_FAILURE, (p.returncode, p.stderr)
    if as_json:
        doc = json.loads(p.stderr)
        assert doc["error"] == "failure" and "No space left" in doc["message"], doc
        command = shlex.split(doc["again_command"])
        assert command[-2:] == ["--again-of", doc["again_of"]], doc
    else:
        assert "could not write its message (No space left on device)" in p.stderr, p.stderr
        command = _hint(p.stderr, 0)
    again = _ask_again(command, gw)
    assert again.returncode == 0, again.stderr
    assert MESSAGE in again.stdout, again.stdout
    _exactly_once(gw, lease)


def test_the_hinted_command_works_from_another_directory(
    gw: Gateway, lease: str, tmp_path: Path
) -> None:
    """kupctl run by a relative path (``.venv/bin/kupctl``) with a relative
    ``--socket``: the printed command named both as given, so it worked
    only from the directory kupctl ran in -- not from another terminal, or
    a script's again_command run elsewhere ("nothing at kupd.sock").  It
    now names kupctl and the socket by the absolute paths kupctl used."""
    socket_dir = os.path.dirname(gw.socket)
    kupctl = os.path.relpath(console_script("kupctl"), socket_dir)
    r, w = os.pipe()
    os.close(r)  # a closed output: a recv that took its message, and hints
    try:
        p = subprocess.run(
            [kupctl, "--socket", os.path.basename(gw.socket), "recv", lease],
            stdout=w, stderr=subprocess.PIPE, text=True, env=gw.env(), timeout=TIMEOUT,
            check=False, cwd=socket_dir,
        )  # fmt: skip
    finally:
        os.close(w)
    assert p.returncode == EXIT_FAILURE, (p.returncode, p.stderr)
    command = _hint(p.stderr, 0)
    again = subprocess.run(
        command, capture_output=True, text=True, env=gw.env(), timeout=TIMEOUT, check=False,
        cwd=tmp_path,
    )  # fmt: skip
    assert again.returncode == 0, (command, again.returncode, again.stderr)
    assert MESSAGE in again.stdout, again.stdout
    _exactly_once(gw, lease)


def test_recv_with_its_output_closed_takes_nothing(gw: Gateway, lease: str) -> None:
    """kupctl recv started with its standard output closed (``>&-``): it
    took the message and then failed with a traceback (Python has no
    sys.stdout then).  It now refuses before asking kupd, and the message
    stays for the next recv."""
    exe = shlex.quote(str(console_script("kupctl")))
    p = subprocess.run(
        ["sh", "-c", f"exec {exe} --socket {shlex.quote(gw.socket)} recv {lease} >&-"],
        capture_output=True, text=True, env=gw.env(), timeout=TIMEOUT, check=False,
    )  # fmt: skip
    assert p.returncode == EXIT_FAILURE, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    assert "standard output is closed" in p.stderr, p.stderr
    with Client(gw.socket) as c:
        assert c.lease_receive(lease, timeout=30).data == MESSAGE.encode()
    _exactly_once(gw, lease)


def test_the_hinted_command_of_kupctl_run_as_a_module_runs_it_so(
    gw: Gateway, lease: str, tmp_path: Path
) -> None:
    """``python -m kupclient.kupctl`` (kupctl not on $PATH): the printed
    command began with a bare ``kupctl``, which the shell then did not find.
    It now runs kupctl as it was run: the interpreter by its absolute path,
    ``-m kupclient.kupctl``.  Run as printed, by a shell with no kupctl on
    its $PATH, from another directory, it gets the message; the socket is
    named by a path with a space and a quote, so the quoting counts."""
    env = gw.env()
    env["PATH"] = os.defpath  # no virtualenv's bin: no kupctl
    assert shutil.which("kupctl", path=env["PATH"]) is None
    odd = tmp_path / "kupd's socket dir"
    odd.mkdir()
    (odd / "kupd sock").symlink_to(gw.socket)
    r, w = os.pipe()
    os.close(r)  # a closed output: a recv that took its message, and hints
    try:
        p = subprocess.run(
            [sys.executable, "-m", "kupclient.kupctl", "--socket", "kupd sock", "recv", lease],
            stdout=w, stderr=subprocess.PIPE, text=True, env=env, timeout=TIMEOUT,
            check=False, cwd=odd,
        )  # fmt: skip
    finally:
        os.close(w)
    assert p.returncode == EXIT_FAILURE, (p.returncode, p.stderr)
    command = _hint(p.stderr, 0)
    line = p.stderr.strip().splitlines()[-1]
    again = subprocess.run(
        ["/bin/sh", "-c", line], capture_output=True, text=True, env=env, timeout=TIMEOUT,
        check=False, cwd=tmp_path,
    )  # fmt: skip
    assert again.returncode == 0, (line, again.returncode, again.stderr)
    assert MESSAGE in again.stdout, again.stdout
    assert command[:3] == [os.path.abspath(sys.executable), "-m", "kupclient.kupctl"], command
    assert command[3:5] == ["--socket", str(odd / "kupd sock")], command
    _exactly_once(gw, lease)


#: a message as long as echo's data area, whose line is longer than the
#: pipe kupctl writes it to (its size set to one page): kupctl, having
#: received it, is left blocked writing the rest
BIG = "y" * PIPE_PAGE
BIG_LINE = f"DATA ({len(BIG)} bytes): {BIG}\n"


@pytest.fixture
def big_lease(gw: Gateway) -> Iterator[str]:
    """A lease whose next message is BIG."""
    with Client(gw.socket) as c:
        lease = c.attach("echo", next(_CHANNELS)).lease_id
        try:
            assert c.lease_receive(lease, timeout=30).kind == Kind.PASS
            c.lease_send(lease, BIG.encode())
            yield lease
        finally:
            c.release(lease)


def _recv_blocked_writing(gw: Gateway, lease: str) -> tuple[subprocess.Popen[str], int]:
    """``kupctl recv LEASE`` into a one-page pipe, returned with the pipe's
    read end once the message's first page is in it: kupctl has received
    the message and is blocked writing the rest (until the pipe is read)."""
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_PAGE)
        p = spawn_kupctl(gw, "--socket", gw.socket, "recv", lease, stdout=w)
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    readable, _, _ = select.select([r], [], [], TIMEOUT)
    assert readable, "kupctl never wrote the message"
    return p, r


def _read_all(fd: int) -> str:
    """What is in the pipe ``fd`` until its writer (kupctl) has exited."""
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks).decode()


def _stderr_line(p: subprocess.Popen[str]) -> str:
    """kupctl's next line on stderr (bounded: a hang fails the test), read
    a byte at a time from the pipe itself: communicate() reads the rest
    from there, past the file object's buffer."""
    assert p.stderr is not None
    line = b""
    while not line.endswith(b"\n"):
        readable, _, _ = select.select([p.stderr], [], [], TIMEOUT)
        assert readable, f"kupctl said nothing more on stderr: {line!r}"
        byte = os.read(p.stderr.fileno(), 1)
        assert byte, f"kupctl closed its stderr: {line!r}"
        line += byte
    return line.decode()


def test_interrupted_recv_whose_message_gets_written_prints_no_hint(
    gw: Gateway, big_lease: str
) -> None:
    """A ^C while recv writes the message it received: kupctl now waits
    for the write to end (saying so), and a message written and flushed is
    delivered -- no hint.  It printed the hint whenever the ^C came before
    it had noted the message delivered, also once the message was out, and
    the hinted command then printed the same message a second time."""
    p, r = _recv_blocked_writing(gw, big_lease)
    try:
        p.send_signal(signal.SIGINT)
        waiting = _stderr_line(p)
        assert "waiting for the write" in waiting, waiting
        out = _read_all(r)  # the write goes on, and ends
        _, err = p.communicate(timeout=TIMEOUT)
    finally:
        os.close(r)
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == EXIT_INTERRUPTED, (p.returncode, err)
    assert out.endswith(BIG_LINE) and out.count(BIG) == 1, out[:200]
    assert "--again-of" not in err and "Traceback" not in err, err
    _exactly_once(gw, big_lease)


def test_recv_interrupted_twice_while_writing_tells_how_to_ask_again(
    gw: Gateway, big_lease: str
) -> None:
    """A second ^C while kupctl waits for the message's write to end stops
    it there: the message is not delivered (a part of it, at most), so the
    hint stays, and its command gets the whole message."""
    p, r = _recv_blocked_writing(gw, big_lease)
    try:
        p.send_signal(signal.SIGINT)
        assert "waiting for the write" in _stderr_line(p)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=TIMEOUT)
        out = _read_all(r)
    finally:
        os.close(r)
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == EXIT_INTERRUPTED, (p.returncode, err)
    assert not out.endswith(BIG_LINE), out[:200]  # the first page of it, at most
    assert err.startswith("kupctl: recv interrupted (receive "), err
    again = _ask_again(_hint(err, 0), gw)
    assert again.returncode == 0, (again.returncode, again.stderr)
    assert again.stdout.endswith(BIG_LINE), again.stdout[:200]
    _exactly_once(gw, big_lease)


@pytest.mark.parametrize("op", ["send", "pass"])
def test_send_or_pass_again_of_a_recv_that_gave_up_is_refused(
    gw: Gateway, lease: str, op: str
) -> None:
    """``kupctl send`` / ``pass`` after a recv that gave up, its message
    not yet asked for again: kupd kept the message for the recv's NAME, and
    the send or pass ran over it -- the message was gone, unseen (the
    clients' own sends name the receive given up on, kupctl's could not:
    each kupctl is a client of its own).  Given ``--again-of NAME`` it is
    refused, NotYourTurn (exit 5), nothing sent, and the hinted recv still
    gets the message; a name kupd kept nothing for lets it run."""
    r, w = os.pipe()
    os.close(r)  # a closed output: a recv that took its message, and hints
    try:
        p = subprocess.run(
            [str(console_script("kupctl")), "--socket", gw.socket, "recv", lease],
            stdout=w, stderr=subprocess.PIPE, text=True, env=gw.env(), timeout=TIMEOUT,
            check=False,
        )  # fmt: skip
    finally:
        os.close(w)
    assert p.returncode == EXIT_FAILURE, (p.returncode, p.stderr)
    command = _hint(p.stderr, 0)
    name = command[-1]
    data = ["sent anyway"] if op == "send" else []
    refused = _ask_again(
        [str(console_script("kupctl")), "--socket", gw.socket, op, lease, *data,
         "--again-of", name],
        gw,
    )  # fmt: skip
    assert refused.returncode == EXIT_NOT_YOUR_TURN, (refused.returncode, refused.stderr)
    assert f"has not received the message of its receive {name}" in refused.stderr, refused
    assert refused.stdout == "", refused.stdout
    again = _ask_again(command, gw)
    assert again.returncode == 0, (again.returncode, again.stderr)
    assert again.stdout.strip().endswith(MESSAGE), again.stdout
    # kept for NAME still (the recv that asked again is named so): a send
    # naming another recv runs
    ran = _ask_again(
        [str(console_script("kupctl")), "--socket", gw.socket, op, lease, *data,
         "--again-of", "another-recv"],
        gw,
    )  # fmt: skip
    assert ran.returncode == 0, (ran.returncode, ran.stderr)
    with Client(gw.socket) as c:
        got = c.lease_receive(lease, timeout=30)
        sent = (Kind.DATA, b"sent anyway") if op == "send" else (Kind.PASS, b"")
        assert (got.kind, got.data) == sent


def test_recv_run_again_without_again_of_leaves_the_message_for_the_hint(
    gw: Gateway, lease: str
) -> None:
    """The same ``kupctl recv L`` run again (the shell's history) instead
    of the printed command: refused, exit 5 "already received" -- and that
    refusal dropped the message kupd kept, so the printed command, run
    next, was refused too and the message was gone.  Now the refusal names
    the receive the message is kept for and leaves it, and the printed
    command gets it."""
    r, w = os.pipe()
    os.close(r)  # a closed output: a recv that took its message, and hints
    plain = [str(console_script("kupctl")), "--socket", gw.socket, "recv", lease]
    try:
        p = subprocess.run(
            plain, stdout=w, stderr=subprocess.PIPE, text=True, env=gw.env(), timeout=TIMEOUT,
            check=False,
        )  # fmt: skip
    finally:
        os.close(w)
    assert p.returncode == EXIT_FAILURE, (p.returncode, p.stderr)
    command = _hint(p.stderr, 0)
    again = _ask_again(plain, gw)
    assert again.returncode == EXIT_NOT_YOUR_TURN, (again.returncode, again.stderr)
    assert f"reply kupd wrote for receive {command[-1]}" in again.stderr, again.stderr
    got = _ask_again(command, gw)
    assert got.returncode == 0, (got.returncode, got.stderr)
    assert got.stdout.strip().endswith(MESSAGE), got.stdout
    _exactly_once(gw, lease)


def test_attach_past_its_timeout_leaves_no_lease(gw: Gateway, proxy: StallProxy) -> None:
    """``kupctl attach --timeout S``: the attach's deadline is S (the proxy
    passes kupd's reply and holds its status, so gRPC drops the reply as S
    passes); it exits DeadlineExceeded and the lease kupd granted is
    released by the attach's name, not left to idle out."""
    channel = next(_CHANNELS)
    p = subprocess.run(
        [str(console_script("kupctl")), "--socket", proxy.path, "attach", "echo",
         "--channel", str(channel), "--timeout", SHORT],
        capture_output=True, text=True, env=gw.env(), timeout=TIMEOUT, check=False,
    )  # fmt: skip
    assert proxy.status_held.is_set(), "kupd did not answer the attach within its deadline"
    assert p.returncode == EXIT_DEADLINE, (p.returncode, p.stderr)
    assert p.stderr.startswith("kupctl: DeadlineExceeded: "), p.stderr
    assert p.stdout == "", p.stdout
    with Client(gw.socket) as c:
        (dev,) = c.devices("echo")
        assert dev.channels[channel].state == "free", dev.channels[channel]
