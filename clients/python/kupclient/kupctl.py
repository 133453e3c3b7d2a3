"""kupctl -- command-line client of the kupd gateway.

Every command talks to a running ``kupd`` over its unix socket through the
Python client library (:mod:`kupclient`).  Output is a readable table or
text by default, JSON with ``--json`` (one document per result; ``watch``
and ``session`` print one JSON object per line).

DATA arguments are the argument's own UTF-8 text, ``@PATH`` for a file's
bytes, or ``-`` for standard input; ``--hex-in`` reads them as hex instead.

Exit codes, one per error class so scripts can tell failures apart (see
:data:`EXIT_CODES`; ``docs/kupctl.md`` has the same table):

 0 success                      10 NotReady (e.g. ``recv --nb`` found nothing)
 1 other failure (bad file...)  11 PeerGone
 2 usage error                  12 ProtocolError
 3 NotFound                     13 VersionMismatch
 4 Busy                         14 PermissionDenied
 5 NotYourTurn                  15 ResourceExhausted
 6 Shutdown (EKU_SHUTDOWN)      16 SystemFailure
 7 TooBig                       17 Unavailable: kupd (or the metrics endpoint)
 8 InvalidArgument                 cannot be reached
 9 DeadlineExceeded             18 health: not SERVING
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import json
import os
import pwd
import secrets
import shlex
import signal
import stat
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, BinaryIO, NoReturn, TextIO

# gRPC's core logs to stderr on its own ("I1127 ... chttp2_transport.cc:1403]
# ...: Got goaway [2] ..." when kupd drops or drains a connection), where
# kupctl writes its one error line: when kupctl is the program, only gRPC's
# errors, unless the user set GRPC_VERBOSITY.  gRPC reads it when grpc is
# first imported, so this comes before the imports below (the kupclient
# package itself imports no grpc).
if __name__ == "__main__" or Path((getattr(sys, "argv", None) or [""])[0]).stem == "kupctl":
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from prometheus_client.parser import text_string_to_metric_families

from kupapi import __version__ as kupd_version
from kupapi.defaults import DEFAULT_SOCKET, REQUEST_NAME_MAX, request_name_error
from kupclient import Client, DeviceInfo, Kind, Lease, Message, WatchEvent
from kupclient import errors as kerr
from kupclient._args import ArgumentError, channel_arg, seconds_option
from kupclient._errors import PING_TIMEOUT, closed_as_made, is_connection_failure
from kupclient.admin import DEFAULT_ADMIN_SOCKET, AdminClient, reload_summary

__all__ = [
    "DEFAULT_METRICS",
    "EXIT_CODES",
    "EXIT_FAILURE",
    "EXIT_NOT_SERVING",
    "EXIT_OK",
    "EXIT_USAGE",
    "CliError",
    "again_command",
    "build_parser",
    "default_socket",
    "exit_code_for",
    "main",
    "permission_hint",
    "read_data",
    "unavailable_hint",
]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_SERVING = 18

#: Exit code of each client exception class (first match wins).
EXIT_CODES: tuple[tuple[type[kerr.KupError], int], ...] = (
    (kerr.NotFound, 3),
    (kerr.Busy, 4),
    (kerr.NotYourTurn, 5),
    (kerr.Shutdown, 6),
    (kerr.TooBig, 7),
    (kerr.InvalidArgument, 8),
    (kerr.DeadlineExceeded, 9),
    (kerr.NotReady, 10),
    (kerr.PeerGone, 11),
    (kerr.ProtocolError, 12),
    (kerr.VersionMismatch, 13),
    (kerr.PermissionDenied, 14),
    (kerr.ResourceExhausted, 15),
    (kerr.SystemFailure, 16),
    (kerr.Unavailable, 17),
)

#: Where ``kupctl stats`` looks when neither --metrics nor $KUPD_METRICS is set.
DEFAULT_METRICS = "http://127.0.0.1:9464/metrics"


class CliError(Exception):
    """A failure of kupctl itself (bad input)."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def exit_code_for(exc: BaseException) -> int:
    """The documented exit code for an exception raised by a command."""
    if isinstance(exc, CliError):
        return exc.exit_code
    for cls, code in EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return EXIT_FAILURE


def default_socket() -> str:
    """$KUPD_SOCKET, else the daemon's default socket path."""
    env = os.environ.get("KUPD_SOCKET")
    if env:
        return env
    return DEFAULT_SOCKET  # the daemon's own default (kupd.config's), not a copy


# --------------------------------------------------------------------------
# input and output helpers


def read_data(spec: str, *, hex_in: bool = False, stdin: BinaryIO | None = None) -> bytes:
    """The bytes a DATA argument names: ``-`` is stdin, ``@PATH`` a file,
    anything else the argument's own UTF-8 text.  With ``hex_in`` the text
    (from wherever it came) is decoded as hex."""
    if spec == "-":
        raw = (stdin if stdin is not None else sys.stdin.buffer).read()
    elif spec.startswith("@"):
        path = spec[1:]
        if not path:
            raise CliError("DATA '@' names no file: write @PATH")
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise CliError(f"cannot read DATA file {path!r}: {e.strerror}") from e
    else:
        # the argument's own bytes, even when they are not UTF-8 (Python
        # decoded argv with surrogateescape)
        raw = spec.encode(errors="surrogateescape")
    if not hex_in:
        return raw
    text = raw.decode(errors="replace")
    try:
        return bytes.fromhex("".join(text.split()))
    except ValueError as e:
        raise CliError(f"DATA is not valid hex ({e}): {text[:40]!r}") from e


def render_data(data: bytes, as_hex: bool) -> str:
    """Payload as text: hex when asked, or ``hex:...`` when not printable UTF-8."""
    if as_hex:
        return data.hex()
    try:
        text = data.decode()
    except UnicodeDecodeError:
        return "hex:" + data.hex()
    if all(c.isprintable() or c in "\t" for c in text):
        return text
    return "hex:" + data.hex()


def count_bytes(n: int) -> str:
    """``"1 byte"``, ``"2 bytes"``: a byte count as kupctl prints it."""
    return f"{n} byte{'s' if n != 1 else ''}"


def describe(msg: Message, as_hex: bool) -> str:
    """One line for a received message: ``#SEQ KIND (N bytes): payload``."""
    kind = msg.kind.name
    if msg.kind == Kind.DATA:
        return f"#{msg.seq} {kind} ({count_bytes(len(msg.data))}): {render_data(msg.data, as_hex)}"
    return f"#{msg.seq} {kind}"


def message_json(msg: Message) -> dict[str, object]:
    out: dict[str, object] = {
        "seq": msg.seq,
        "kind": msg.kind.name.lower(),
        "data_hex": msg.data.hex(),
        "size": len(msg.data),
    }
    try:
        out["data"] = msg.data.decode()
    except UnicodeDecodeError:
        out["data"] = None
    return out


def lease_json(lease: Lease) -> dict[str, object]:
    return dict(asdict(lease))


def event_json(ev: WatchEvent) -> dict[str, object]:
    out = dict(asdict(ev))
    out["type"] = ev.type.name.lower()
    return out


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A plain left-aligned text table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


class Output:
    """Where results go, in the chosen format."""

    def __init__(self, as_json: bool, out: TextIO) -> None:
        self.as_json = as_json
        self.out = out

    def json(self, obj: object) -> None:
        self.out.write(json.dumps(obj, sort_keys=True) + "\n")
        self.out.flush()

    def line(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()


def _channel_id(value: str) -> int:
    try:
        n = int(value, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a channel number: {value!r}") from None
    try:
        checked = channel_arg(n)
    except ArgumentError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    assert checked is not None
    return checked


def _receive_name(value: str) -> str:
    """--again-of: a receive's name, as kupd takes it (kupapi's rule)."""
    if not value:
        raise argparse.ArgumentTypeError("must not be empty (the NAME a recv that gave up printed)")
    if request_name_error(value, "NAME") is not None:
        shown = repr(value) if len(value) <= 2 * REQUEST_NAME_MAX else f"{value[:80]!r}..."
        if len(value) > REQUEST_NAME_MAX:
            shown += f" ({len(value)} characters)"
        raise argparse.ArgumentTypeError(
            f"not a receive name: {shown} (up to {REQUEST_NAME_MAX} letters, digits, '_' "
            "and '-': the NAME a recv that gave up printed)"
        )
    return value


def _event_count(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of events: {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (leave it out to watch until ^C), not {n}")
    return n


# --------------------------------------------------------------------------
# commands

Handler = Callable[[argparse.Namespace, Output], int]


def _client(args: argparse.Namespace) -> Client:
    return Client(args.socket)


def _device_state(d: DeviceInfo) -> str:
    """The STATE column of ``kupctl devices``.

    A host that stopped answering leaves the rest of the info at the last
    state it gave -- so that state (ok, shutting-down, drained) must not be
    shown as if it were current.  (A kupd before ``not_answering_ms`` set
    ``error`` on a *reachable* device only then; one before ``cannot_attach``
    set it for a removed node too, which reads "not answering".)  A device
    that answers but whose node is gone is "unattachable": the sessions
    attached go on, new attaches fail."""
    if not d.reachable:
        return "unreachable"
    if d.cannot_attach and not d.not_answering_s:
        return "unattachable"
    if d.not_answering_s or d.error:
        return "not answering"
    if d.shutting_down:
        return "shutting-down"
    return "drained" if d.drained else "ok"


def cmd_devices(args: argparse.Namespace, out: Output) -> int:
    # --admin: the admin socket's view, which counts every tenant's Calls
    with Client(args.admin_socket) if args.admin else _client(args) as c:
        devs = c.devices(args.device or "")
    tenant = next((d.calls_tenant for d in devs if d.calls_tenant), "")
    if args.admin and tenant:
        # a tenant's socket counts only that tenant's Calls: shown as the
        # admin view, its CALLS and QUEUED would read as the whole pool's
        raise CliError(
            f"--admin-socket {args.admin_socket} is tenant {tenant}'s socket, not kupd's "
            "admin socket: its CALLS and QUEUED count that tenant's Calls only "
            "(the admin socket is kupd's admin_socket setting)",
            EXIT_USAGE,
        )
    if out.as_json:
        out.json({"devices": [asdict(d) for d in devs]})
        return EXIT_OK
    if not devs:
        out.line("no devices")
        return EXIT_OK
    out.line(
        table(
            [
                "DEVICE",
                "STATE",
                "ABI",
                "CHANNELS",
                "ANNOUNCED",
                "PAGES",
                "MAX_MSG",
                "CALL_POOL",
                "CALLS",
                "QUEUED",
            ],
            [
                (
                    d.name,
                    _device_state(d),
                    d.abi_version,
                    d.channel_count,
                    d.announced,
                    d.pages_per_channel,
                    d.max_message_bytes,
                    d.call_channels,
                    d.calls_in_flight,
                    d.calls_queued,
                )
                for d in devs
            ],
        )
    )
    rows = [
        (d.name, ch.id, ch.state, ch.lease_id or "-")
        for d in devs
        for ch in d.channels
        if args.all_channels or ch.state not in ("free", "not_announced")
    ]
    out.line("")
    if rows:
        out.line(table(["DEVICE", "CHANNEL", "STATE", "LEASE"], rows))
    for d in devs:
        counts: dict[str, int] = {}
        for ch in d.channels:
            counts[ch.state] = counts.get(ch.state, 0) + 1
        summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
        out.line(f"{d.name}: channels {summary or 'none'}")
        if d.calls_tenant:
            # a tenant's socket: CALLS and QUEUED are that tenant's own
            out.line(
                f"{d.name}: CALLS and QUEUED count tenant {d.calls_tenant}'s Calls only "
                "(the whole pool: kupctl devices --admin)"
            )
        if d.error:
            out.line(f"{d.name}: {d.error}")
    return EXIT_OK


def cmd_watch(args: argparse.Namespace, out: Output) -> int:
    seen = 0
    with _client(args) as c, c.watch(args.device or "", initial_state=args.initial) as events:
        for ev in events:
            if out.as_json:
                out.json(event_json(ev))
            else:
                out.line(_event_line(ev))
            seen += 1
            if args.count is not None and seen >= args.count:
                break
    return EXIT_OK


def _event_line(ev: WatchEvent) -> str:
    """One readable line per event: time, type, then the fields that are set."""
    if ev.time_unix_ms:
        stamp = time.strftime("%H:%M:%S", time.localtime(ev.time_unix_ms / 1000))
        stamp += f".{ev.time_unix_ms % 1000:03d}"
    else:
        stamp = "--:--:--.---"
    parts = [stamp, f"{ev.type.name.lower():<20}", ev.device or "-"]
    if ev.type.name.startswith("LEASE_") or ev.lease_id:
        parts.append(f"channel={ev.channel}")
    for key in ("lease_id", "holder", "announced", "notify_gen", "reason"):
        value = getattr(ev, key)
        if value:
            parts.append(f"{key}={value}")
    if ev.initial:
        parts.append("(initial)")
    return " ".join(parts)


def cmd_call(args: argparse.Namespace, out: Output) -> int:
    data = read_data(args.data, hex_in=args.hex_in)
    with _client(args) as c:
        reply = c.call(args.device, data, timeout=args.timeout)
    return _print_message(
        reply, args, out, extra={"device": args.device, "channel": reply.channel}
    )


def _print_message(
    msg: Message, args: argparse.Namespace, out: Output, extra: dict[str, object] | None = None
) -> int:
    if out.as_json:
        out.json({**(extra or {}), "message": message_json(msg)})
    elif getattr(args, "raw", False):
        sys.stdout.flush()
        sys.stdout.buffer.write(msg.data)
        sys.stdout.buffer.flush()
    else:
        out.line(describe(msg, args.hex))
    return EXIT_OK


def cmd_attach(args: argparse.Namespace, out: Output) -> int:
    with _client(args) as c:
        lease = c.attach(args.device, args.channel, timeout=args.timeout)
        try:
            if out.as_json:
                out.json(lease_json(lease))
            else:
                out.line(lease.lease_id)
        except BaseException:
            # its id not shown (Ctrl-C, the reader gone): no one could use
            # or release the lease, which would hold its channel until it
            # idled out -- released here, best effort
            with contextlib.suppress(Exception):
                c.release(lease.lease_id)
            raise
    return EXIT_OK


def cmd_send(args: argparse.Namespace, out: Output) -> int:
    data = read_data(args.data, hex_in=args.hex_in)
    with _client(args) as c:
        c.lease_send(args.lease, data, again_of=args.again_of)
    if out.as_json:
        out.json({"lease_id": args.lease, "sent": len(data)})
    else:
        out.line(f"sent {count_bytes(len(data))}")
    return EXIT_OK


def cmd_recv(args: argparse.Namespace, out: Output) -> int:
    timeout: float | None = 0.0 if args.nb else args.timeout
    # Named (receive_id), so that one given up on -- ^C, past --timeout,
    # the connection lost -- can be asked for again by the next kupctl, a
    # process of its own: kupd keeps the message it wrote for this name
    # until the lease's next operation.  Given up on while args.receiving
    # is set, kupctl prints how (_again_hint); one that asks again
    # (--again-of) carries that name on, for the same reason.
    if sys.stdout is None:
        # started with its standard output closed (`>&-`): the message it
        # took could not be shown to anyone -- take none
        raise CliError("recv: standard output is closed: the message would have nowhere to go")
    name = args.again_of or secrets.token_hex(16)
    args.receiving = name
    with _client(args) as c:
        try:
            msg = c.lease_receive(args.lease, timeout, receive_id=name, again_of=args.again_of)
        except kerr.NotReady:
            # kupd found nothing and kept nothing for this name
            args.receiving = None
            # Not an error on the wire (a reply marked not-ready), but a
            # script needs to know: exit code 10 with a readable result.
            if out.as_json:
                out.json({"lease_id": args.lease, "ready": False})
            else:
                out.line("not ready: the kernel still holds the turn")
            return exit_code_for(kerr.NotReady(""))
        except Exception as exc:
            # refused (by kupd, or an argument before it was sent): nothing
            # to ask again for
            if not (isinstance(exc, kerr.KupError) and _gave_up(exc)):
                args.receiving = None
            raise
    with _OUTPUT:
        # written and flushed, and the hint forgotten, as one: a ^C waits
        # for both (main), so no hint offers a message already shown
        args.writing = True
        try:
            code = _print_message(msg, args, out, extra={"lease_id": args.lease, "ready": True})
        finally:
            args.writing = False
        args.receiving = None  # shown: a ^C now loses nothing
    return code


def _gave_up(exc: kerr.KupError) -> bool:
    """Whether a receive that failed with ``exc`` was given up on while
    kupd may have written its reply: past its deadline (kupctl's, or
    kupd's own: a message taken then is the lease's next receive's
    anyway), or its connection broke -- not one that never connected."""
    if isinstance(exc, kerr.DeadlineExceeded):
        return True
    return is_connection_failure(exc) and "failed to connect" not in exc.message


def again_command(args: argparse.Namespace, name: str) -> str:
    """The shell command that asks again for the message of the receive
    ``name`` of ``kupctl recv`` ARGS: the same command, its socket spelled
    out, with ``--again-of NAME``.  kupctl is run as this one was
    (_kupctl_argv); it and the socket are named by the absolute paths this
    kupctl used (a relative one as given would work only from this
    directory)."""
    # the client's own rule (kupclient._types.target_for): a plain path is
    # taken from the current directory, a unix: target as it is
    socket = args.socket if args.socket.startswith("unix:") else os.path.abspath(args.socket)
    argv = [*_kupctl_argv(), "--socket", socket]
    if args.json:
        argv.append("--json")
    argv += ["recv", args.lease]
    if args.nb:
        argv.append("--nb")
    elif args.timeout is not None:
        argv += ["--timeout", str(args.timeout)]
    if args.hex:
        argv.append("--hex")
    if args.raw:
        argv.append("--raw")
    argv += ["--again-of", name]
    return shlex.join(argv)


#: Held by the thread that runs the command while a recv writes the message
#: it received (until it has forgotten its receive's name) and while it
#: prints a hint; by the main thread from a ^C on (main).  So the message
#: written and the hint that says how to get it again are never both
#: shown, and a hint is printed once.
_OUTPUT = threading.Lock()


def _kupctl_argv() -> list[str]:
    """The words that run kupctl as this process was run: ``python -m
    kupclient.kupctl`` (this module is ``__main__``) as the interpreter by
    its absolute path and ``-m kupclient.kupctl`` -- "kupctl" may not be on
    $PATH, the reason to run it so; the ``kupctl`` script by the absolute
    path it was run by, "kupctl" when found on $PATH or run otherwise
    (main() called by a program of its own)."""
    # run as a script (python .../kupctl.py) there is no module to name
    if __name__ == "__main__" and __spec__ is not None and sys.executable:
        return [os.path.abspath(sys.executable), "-m", __spec__.name]
    prog = sys.argv[0] if sys.argv and Path(sys.argv[0]).name == "kupctl" else "kupctl"
    return [os.path.abspath(prog) if os.sep in prog else prog]


def _again_hint(args: argparse.Namespace, why: str) -> tuple[str, str, dict[str, str]] | None:
    """For a recv given up on (``why``: how), what to tell the user: the
    text, the command that asks again, and the fields of its JSON error;
    None when no receive was under way -- or its hint was given already:
    it is given once (the caller holds _OUTPUT and prints it)."""
    name = getattr(args, "receiving", None)
    if not name:
        return None
    args.receiving = None
    command = again_command(args, name)
    text = (
        f"recv {why} (receive {name}): a message kupd had already sent for it is kept "
        "until the lease's next operation; to get it (or, if none was sent, the lease's "
        "next message), run"
    )
    return text, command, {"again_of": name, "again_command": command}


def cmd_pass(args: argparse.Namespace, out: Output) -> int:
    with _client(args) as c:
        c.lease_pass(args.lease, again_of=args.again_of)
    if out.as_json:
        out.json({"lease_id": args.lease, "passed": True})
    else:
        out.line("passed the turn")
    return EXIT_OK


def cmd_release(args: argparse.Namespace, out: Output) -> int:
    with _client(args) as c:
        c.release(args.lease)
    if out.as_json:
        out.json({"lease_id": args.lease, "released": True})
    else:
        out.line(f"released {args.lease}")
    return EXIT_OK


def cmd_health(args: argparse.Namespace, out: Output) -> int:
    with _client(args) as c:
        status = c.health(args.service)
    if out.as_json:
        out.json({"service": args.service, "status": status})
    else:
        out.line(status)
    return EXIT_OK if status == "SERVING" else EXIT_NOT_SERVING


# -- session -------------------------------------------------------------

SESSION_HELP = """\
plain text          send the line (without its newline) and hand over the turn
::text              send ':text' (a leading ':' doubled)
:send TEXT          send TEXT
:hex HEX            send the bytes written as hex
:recv [SECONDS]     receive: wait for the kernel's message (at most SECONDS)
:nb                 non-blocking receive (reports 'not ready' if the turn is not back)
:pass               hand the turn over without data
:help               this text
:quit               end the session (also end of input)"""


def cmd_session(args: argparse.Namespace, out: Output) -> int:
    # bytes: a data line is sent as it is, UTF-8 or not
    stdin: BinaryIO = sys.stdin.buffer
    interactive = stdin.isatty()
    with _client(args) as c:
        ch = c.open(args.device).channel(args.channel)
        with ch:
            lease = ch.lease
            if out.as_json:
                out.json({"op": "attach", **lease_json(lease)})
            else:
                out.line(
                    f"attached {lease.device} channel {lease.channel} "
                    f"(lease {lease.lease_id}, max {lease.max_message_bytes} bytes); "
                    "type :help for commands"
                )
            while True:
                if interactive:
                    sys.stderr.write(f"{lease.device}/{lease.channel}> ")
                    sys.stderr.flush()
                line = stdin.readline()
                if not line:
                    break
                line = line.rstrip(b"\n")
                if line.endswith(b"\r"):
                    line = line[:-1]
                try:
                    if not _session_line(ch, line, args, out):
                        break
                except kerr.KupError as exc:
                    if isinstance(exc, (kerr.Shutdown, kerr.Unavailable)) or ch_closed(ch):
                        raise  # the session is over: main() reports it on stderr
                    _session_error(exc, out)
                except (CliError, ArgumentError) as exc:
                    message = exc.message if isinstance(exc, CliError) else str(exc)
                    if out.as_json:
                        err = {"kind": "usage", "message": message}
                        out.json({"op": "error", "error": err})
                    else:
                        out.line(f"error: {message}")
    if out.as_json:
        out.json({"op": "end"})
    else:
        out.line("session ended")
    return EXIT_OK


def ch_closed(ch: Any) -> bool:
    return bool(getattr(ch, "_closed", False))


def _session_error(exc: kerr.KupError, out: Output) -> None:
    name = type(exc).__name__
    if out.as_json:
        out.json({"op": "error", "error": {"kind": name, "message": exc.message}})
    else:
        out.line(f"error: {name}: {exc.message}")


def _session_line(ch: Any, raw: bytes, args: argparse.Namespace, out: Output) -> bool:
    """Run one input line; False when the session should end."""
    if not raw.startswith(b":") or raw.startswith(b"::"):
        return _session_send(ch, raw[1:] if raw.startswith(b"::") else raw, out)
    try:
        line = raw.decode()
    except UnicodeDecodeError:
        raise CliError(f"session command is not valid UTF-8: {raw[:40]!r}") from None
    cmd, _, rest = line[1:].partition(" ")
    rest = rest.strip()
    if cmd in ("quit", "q", "exit"):
        return False
    if cmd in ("help", "h", "?"):
        out.line(SESSION_HELP) if not out.as_json else out.json(
            {"op": "help", "text": SESSION_HELP}
        )
        return True
    if cmd == "send":
        return _session_send(ch, rest.encode(), out)
    if cmd == "hex":
        return _session_send(ch, read_data(rest, hex_in=True), out)
    if cmd == "pass":
        ch.pass_()
        if out.as_json:
            out.json({"op": "pass"})
        else:
            out.line("passed the turn")
        return True
    if cmd in ("recv", "nb"):
        if cmd == "nb":
            timeout: float | None = 0.0
        elif rest:
            try:
                timeout = seconds_option(rest)
            except argparse.ArgumentTypeError as e:
                raise CliError(f":recv {e}") from None
        else:
            timeout = None
        msg = ch.try_receive() if timeout == 0.0 else ch.receive(timeout)
        if msg is None:
            if out.as_json:
                out.json({"op": "recv", "ready": False})
            else:
                out.line("not ready: the kernel still holds the turn")
        elif out.as_json:
            out.json({"op": "recv", "ready": True, "message": message_json(msg)})
        else:
            out.line(describe(msg, args.hex))
        return True
    raise CliError(f"unknown session command ':{cmd}' (try :help)")


def _session_send(ch: Any, data: bytes, out: Output) -> bool:
    ch.send(data)
    if out.as_json:
        out.json({"op": "send", "size": len(data)})
    else:
        out.line(f"sent {count_bytes(len(data))}")
    return True


# -- stats -----------------------------------------------------------------


def _metrics_url(value: str) -> str:
    url = value if "://" in value else "http://" + value
    scheme, _, rest = url.partition("://")
    if "/" not in rest:
        url += "/metrics"
    if scheme not in ("http", "https"):
        raise CliError(f"--metrics must be an http URL or HOST:PORT, not {value!r}")
    return url


def fetch_metrics(url: str, timeout: float = 10.0) -> str:
    """The text exposition at ``url`` (:class:`~kupd.errors.Unavailable`, exit
    17, when it cannot be fetched)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body: bytes = resp.read()
    except urllib.error.HTTPError as e:
        raise kerr.Unavailable(f"metrics endpoint {url} answered HTTP {e.code}") from e
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise kerr.Unavailable(
            f"cannot reach the metrics endpoint {url}: {reason} "
            "(is kupd running with metrics_port set?)"
        ) from e
    return body.decode(errors="replace")


#: Columns of the per-device/channel table: (column, metric family, label filter).
_CHANNEL_COLUMNS: tuple[tuple[str, str, dict[str, str]], ...] = (
    ("msgs_to_kernel", "kupd_messages", {"direction": "to_kernel"}),
    ("msgs_from_kernel", "kupd_messages", {"direction": "from_kernel"}),
    ("bytes_to_kernel", "kupd_bytes", {"direction": "to_kernel"}),
    ("bytes_from_kernel", "kupd_bytes", {"direction": "from_kernel"}),
    ("errors", "kupd_errors", {}),
)
_DEVICE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("sessions", "kupd_sessions"),
    ("leases", "kupd_leases"),
    ("calls_queued", "kupd_calls_queued"),
    ("calls", "kupd_calls"),
)


#: Per-tenant columns of ``kupctl stats`` summed from one family each:
#: (column, metric family, label filter).  Denials (by rule) and
#: connections (of a max) are gathered apart.
_TENANT_COLUMNS: tuple[tuple[str, str, dict[str, str]], ...] = (
    ("sessions", "kupd_tenant_leases", {"holder": "session"}),
    ("leases", "kupd_tenant_leases", {"holder": "lease"}),
    ("calls_in_flight", "kupd_tenant_calls_in_flight", {}),
    ("ops_paced", "kupd_tenant_paced", {}),
    ("ops_paced_seconds", "kupd_tenant_paced_seconds", {}),
    ("requests_paced", "kupd_tenant_requests_paced", {}),
    ("requests_paced_seconds", "kupd_tenant_requests_paced_seconds", {}),
)
#: The families that name kupd's tenants (those above, and these).
_TENANT_FAMILIES = frozenset(
    {name for _, name, _ in _TENANT_COLUMNS}
    | {"kupd_tenant_denials", "kupd_connections", "kupd_connections_max"}
)
#: Tenant labels that are no [[tenant]]: the plain socket's "default" (a
#: kupd without tenants has only it) and the admin socket's "admin"
#: (kupd_connections counts kupctl's own connection there).
_DEFAULT_TENANT, _ADMIN_TENANT = "default", "admin"


def summarize_metrics(text: str) -> dict[str, Any]:
    """Group kupd's metrics by device and channel, and by tenant.

    Returns ``{"channels": [...], "devices": [...], "errors": [...],
    "tenants": [...]}``: one row per (device, channel) with message/byte/
    error counters, one per device with sessions/leases/queued calls/calls,
    errors by code, and one row per tenant (:func:`_tenant_rows`; none on a
    kupd without tenants).  Metric families kupd does not export are simply
    absent (zero).
    """
    samples: list[tuple[str, dict[str, str], float]] = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            # Counters: the value is NAME_total (skip NAME_created); gauges: NAME.
            if s.name not in (family.name, family.name + "_total"):
                continue
            samples.append((family.name, dict(s.labels), float(s.value)))

    channels: dict[tuple[str, str], dict[str, float]] = {}
    devices: dict[str, dict[str, float]] = {}
    errors: dict[tuple[str, str, str], float] = {}
    for fam, labels, value in samples:
        dev = labels.get("device", "")
        chan = labels.get("channel", "")
        for col, name, match in _CHANNEL_COLUMNS:
            if fam == name and all(labels.get(k) == v for k, v in match.items()) and dev:
                row = channels.setdefault((dev, chan), {})
                row[col] = row.get(col, 0.0) + value
        for col, name in _DEVICE_COLUMNS:
            if fam == name and dev:
                row = devices.setdefault(dev, {})
                row[col] = row.get(col, 0.0) + value
        if fam == "kupd_errors":
            key = (dev, chan, labels.get("code", ""))
            errors[key] = errors.get(key, 0.0) + value

    chan_cols = [c for c, _, _ in _CHANNEL_COLUMNS]
    return {
        "tenants": _tenant_rows(samples),
        "channels": [
            {"device": d, "channel": ch, **{c: _num(row.get(c, 0.0)) for c in chan_cols}}
            for (d, ch), row in sorted(channels.items(), key=lambda kv: (kv[0][0], _ckey(kv[0][1])))
        ],
        "devices": [
            {"device": d, **{c: _num(row.get(c, 0.0)) for c, _ in _DEVICE_COLUMNS}}
            for d, row in sorted(devices.items())
        ],
        "errors": [
            {"device": d, "channel": ch, "code": code, "count": _num(v)}
            for (d, ch, code), v in sorted(errors.items())
            if v
        ],
    }


def _num(v: float) -> int | float:
    """A metric's value as JSON shows it: a whole number as an int."""
    return int(v) if v == int(v) else v


def _tenant_rows(samples: Iterable[tuple[str, dict[str, str], float]]) -> list[dict[str, Any]]:
    """One row per tenant the metrics name, by name: its open Sessions and
    leases, Calls in flight, connections on its socket (``connections_max``:
    its max_connections, None when it has none), denials (the total, and
    ``denials_by_rule``) and what its rates paced (channel operations under
    channel_ops_per_second, requests under requests_per_second: how many,
    and the seconds they waited).  The admin socket's "admin" is no tenant;
    a kupd whose only tenant is "default" (no [[tenant]] tables) has no
    rows: the question "which tenant is limited" does not arise there."""
    rows: dict[str, dict[str, Any]] = {}

    def row(tenant: str) -> dict[str, Any]:
        if tenant not in rows:
            rows[tenant] = {
                **{c: 0.0 for c, _, _ in _TENANT_COLUMNS},
                "connections": 0.0,
                "connections_max": None,
                "denials_by_rule": {},
            }
        return rows[tenant]

    for fam, labels, value in samples:
        tenant = labels.get("tenant")
        if fam not in _TENANT_FAMILIES or tenant is None or tenant == _ADMIN_TENANT:
            continue
        r = row(tenant)
        for col, name, match in _TENANT_COLUMNS:
            if fam == name and all(labels.get(k) == v for k, v in match.items()):
                r[col] += value
        if fam == "kupd_tenant_denials":
            rule = labels.get("rule", "")
            r["denials_by_rule"][rule] = r["denials_by_rule"].get(rule, 0.0) + value
        elif fam == "kupd_connections":
            r["connections"] += value
        elif fam == "kupd_connections_max":
            r["connections_max"] = value
    if set(rows) <= {_DEFAULT_TENANT}:
        return []
    out: list[dict[str, Any]] = []
    for tenant, r in sorted(rows.items()):
        by_rule = {rule: _num(n) for rule, n in r.pop("denials_by_rule").items() if n}
        cap = r.pop("connections_max")
        out.append({
            "tenant": tenant,
            **{c: _num(v) for c, v in r.items()},
            "connections_max": None if cap is None else _num(cap),
            "denials": _num(sum(by_rule.values())),
            "denials_by_rule": by_rule,
        })  # fmt: skip
    return out


def _denied_by(by_rule: dict[str, int | float]) -> str:
    """``rule=N,...``, the rule that refused most first ("-": none)."""
    ranked = sorted(by_rule.items(), key=lambda kv: (-kv[1], kv[0]))
    return ",".join(f"{rule}={n}" for rule, n in ranked) or "-"


def _seconds(v: float) -> str:
    return f"{v:.3f}" if v else "0"


def tenant_table(rows: Sequence[dict[str, Any]]) -> str:
    """``kupctl stats``'s TENANT table of :func:`_tenant_rows`' rows."""
    return table(
        [
            "TENANT", "SESSIONS", "LEASES", "CALLS_IN_FLIGHT", "CONNECTIONS", "DENIALS",
            "DENIED_BY", "OPS_PACED", "OPS_PACED_S", "REQUESTS_PACED", "REQUESTS_PACED_S",
        ],
        [
            (
                r["tenant"], r["sessions"], r["leases"], r["calls_in_flight"],
                f"{r['connections']}/{r['connections_max']}"
                if r["connections_max"] is not None
                else r["connections"],
                r["denials"], _denied_by(r["denials_by_rule"]),
                r["ops_paced"], _seconds(r["ops_paced_seconds"]),
                r["requests_paced"], _seconds(r["requests_paced_seconds"]),
            )
            for r in rows
        ],
    )  # fmt: skip


def _ckey(chan: str) -> tuple[int, str]:
    return (int(chan), "") if chan.isdigit() else (1 << 30, chan)


# -- admin (kup.v1.Admin on kupd's root-only admin socket; docs/security.md)


def _admin(args: argparse.Namespace) -> AdminClient:
    return AdminClient(args.admin_socket)


def cmd_reload(args: argparse.Namespace, out: Output) -> int:
    with _admin(args) as a:
        r = a.reload(timeout=args.timeout)
    if args.json:
        print(json.dumps({
            "tenants": list(r.tenants),
            "sessions_ended": list(r.sessions_ended),
            "rpcs_ended": r.rpcs_ended,
            "calls_refused": r.calls_refused,
            "applied": list(r.applied),
            "needs_restart": list(r.needs_restart),
            "audit_log_error": r.audit_log_error,
            "warnings": [{"key": k, "why": why} for k, why in r.warnings],
            "sockets_added": list(r.sockets_added),
            "sockets_removed": list(r.sockets_removed),
        }))
    else:
        print(reload_summary(r))
    return EXIT_OK


def cmd_leases(args: argparse.Namespace, out: Output) -> int:
    with _admin(args) as a:
        leases = a.list_leases(args.tenant or "")
    if args.json:
        print(json.dumps([asdict(x) for x in leases]))
        return EXIT_OK
    print(f"{'LEASE':<18} {'TENANT':<12} {'DEVICE':<12} {'CH':>4} {'HOLDER':<8} IDLE")
    for x in leases:
        print(
            f"{x.lease_id:<18} {x.tenant:<12} {x.device:<12} {x.channel:>4} "
            f"{x.holder:<8} {x.idle_seconds:.1f}s"
        )
    return EXIT_OK


def cmd_revoke(args: argparse.Namespace, out: Output) -> int:
    with _admin(args) as a:
        a.revoke(args.lease, args.reason or "")
    if args.json:
        print(json.dumps({"lease_id": args.lease, "revoked": True}))
    else:
        print(f"revoked {args.lease}")
    return EXIT_OK


def cmd_metrics(args: argparse.Namespace, out: Output) -> int:
    with _admin(args) as a:
        text = a.metrics(args.prefix or "")
    if not text:
        # an empty exposition reads as "kupd exports nothing": say why
        raise kerr.NotFound(f"kupd has no metric family starting with {args.prefix!r}")
    if args.json:
        print(json.dumps([
            {"name": s.name, "labels": dict(s.labels), "value": s.value}
            for family in text_string_to_metric_families(text)
            for s in family.samples
        ]))
    else:
        sys.stdout.write(text)
    return EXIT_OK


def cmd_drain(args: argparse.Namespace, out: Output) -> int:
    with _admin(args) as a:
        r = a.drain_device(args.device, args.undo)
    ended = list(r.leases_ended)
    if args.json:
        print(json.dumps({
            "device": args.device, "undo": args.undo, "leases_ended": ended, "changed": r.changed,
        }))  # fmt: skip
    elif not r.changed:
        what = "was not drained" if args.undo else "is drained already (its leases ended then)"
        print(f"{args.device}: {what}; nothing changed")
    else:
        what = "undrained" if args.undo else f"drained ({len(ended)} leases ended)"
        print(f"{args.device}: {what}")
    return EXIT_OK


def cmd_stats(args: argparse.Namespace, out: Output) -> int:
    if args.admin:
        with _admin(args) as a:
            text = a.metrics()
    else:
        text = fetch_metrics(_metrics_url(args.metrics))  # main() filled it in
    summary = summarize_metrics(text)
    if out.as_json:
        out.json(summary)
        return EXIT_OK
    if summary["channels"]:
        cols = [c for c, _, _ in _CHANNEL_COLUMNS]
        out.line(
            table(
                ["DEVICE", "CHANNEL", *(c.upper() for c in cols)],
                [
                    (r["device"], r["channel"] or "-", *(r[c] for c in cols))
                    for r in summary["channels"]
                ],
            )
        )
    else:
        out.line("no channel traffic yet")
    if summary["devices"]:
        cols = [c for c, _ in _DEVICE_COLUMNS]
        out.line("")
        out.line(
            table(
                ["DEVICE", *(c.upper() for c in cols)],
                [(r["device"], *(r[c] for c in cols)) for r in summary["devices"]],
            )
        )
    out.line("")
    if summary["errors"]:
        out.line(
            table(
                ["DEVICE", "CHANNEL", "ERROR_CODE", "COUNT"],
                [
                    (r["device"] or "-", r["channel"] or "-", r["code"], r["count"])
                    for r in summary["errors"]
                ],
            )
        )
    else:
        out.line("no errors")
    out.line("")
    out.line(tenant_table(summary["tenants"]) if summary["tenants"] else "no tenants")
    return EXIT_OK


# --------------------------------------------------------------------------
# argument parsing


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kupctl",
        description="Talk to the kupd gateway: devices, calls, leases, sessions, events.",
        epilog="DATA: text, @FILE or - (stdin).  Exit codes: see docs/kupctl.md.",
    )
    p.add_argument(
        "--version", action="version", version=f"kupctl {kupd_version} (API kup.v1)"
    )

    # The global options are accepted before or after the command name; the
    # subcommands' copies only set them when given (SUPPRESS), so
    # `kupctl --json devices` and `kupctl devices --json` mean the same.
    def global_opts(parser: argparse.ArgumentParser, top: bool) -> None:
        parser.add_argument(
            "--socket",
            metavar="PATH",
            default=None if top else argparse.SUPPRESS,
            help="kupd's unix socket (default: $KUPD_SOCKET, else kupd's default path)",
        )
        parser.add_argument(
            "--json",
            action="store_true",
            default=False if top else argparse.SUPPRESS,
            help="machine-readable JSON output",
        )

    global_opts(p, True)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_text, description=help_text)
        global_opts(sp, False)
        sp.set_defaults(handler=handler)
        return sp

    def data_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("data", metavar="DATA", help="text, @FILE or - for stdin")
        sp.add_argument("--hex-in", action="store_true", help="DATA is written as hex")

    def out_opts(sp: argparse.ArgumentParser) -> None:
        g = sp.add_mutually_exclusive_group()
        g.add_argument("--hex", action="store_true", help="show the payload as hex")
        g.add_argument("--raw", action="store_true", help="write only the raw payload bytes")

    sp = add("devices", cmd_devices, "list devices and their channels")
    sp.add_argument("device", nargs="?", metavar="DEVICE", help="only this device")
    sp.add_argument(
        "--all-channels", action="store_true", help="list free channels too (default: only busy)"
    )
    sp.add_argument(
        "--admin",
        action="store_true",
        help="ask on the admin socket: every device, channel and lease, and the Calls of "
        "every tenant (a tenant's socket counts its own)",
    )

    sp = add("watch", cmd_watch, "print device and lease events as they happen")
    sp.add_argument("device", nargs="?", metavar="DEVICE", help="only this device's events")
    sp.add_argument("--initial", action="store_true", help="first show the current state")
    sp.add_argument("--count", type=_event_count, metavar="N",
                    help="stop after N events (default: until interrupted)")

    sp = add("call", cmd_call, "send DATA on a pooled channel and print the reply")
    sp.add_argument("device", metavar="DEVICE")
    data_opts(sp)
    out_opts(sp)
    sp.add_argument("--timeout", type=seconds_option, metavar="S", help="give up after S seconds")

    sp = add("attach", cmd_attach, "take a lease on a channel; prints the lease id")
    sp.add_argument("device", metavar="DEVICE")
    sp.add_argument("--channel", type=_channel_id, metavar="N", help="channel id (default: any)")
    sp.add_argument(
        "--timeout",
        type=seconds_option,
        metavar="S",
        help="give up after S seconds (default 30), leaving no lease behind",
    )

    def after_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--again-of",
            type=_receive_name,
            metavar="NAME",
            help="the recv NAME gave up (it printed NAME): refused, exit 5 and nothing "
            "done, while the message kupd kept for it is not received (recv --again-of "
            "NAME gets it); done as without it otherwise",
        )

    sp = add("send", cmd_send, "send DATA on a lease (hands the turn to the kernel)")
    sp.add_argument("lease", metavar="LEASE")
    data_opts(sp)
    after_opts(sp)

    sp = add("recv", cmd_recv, "receive the kernel's message on a lease")
    sp.add_argument("lease", metavar="LEASE")
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--timeout", type=seconds_option, metavar="S", help="wait at most S seconds")
    g.add_argument("--nb", action="store_true", help="do not wait (exit 10 if not ready)")
    out_opts(sp)
    sp.add_argument(
        "--again-of",
        type=_receive_name,
        metavar="NAME",
        help="ask again for the message of the recv NAME that gave up (it printed this "
        "command); a recv like any other when kupd kept nothing for NAME",
    )

    sp = add("pass", cmd_pass, "hand the turn to the kernel without data")
    sp.add_argument("lease", metavar="LEASE")
    after_opts(sp)

    sp = add("release", cmd_release, "end a lease")
    sp.add_argument("lease", metavar="LEASE")

    sp = add("session", cmd_session, "interactive session on one channel (lines from stdin)")
    sp.add_argument("device", metavar="DEVICE")
    sp.add_argument("--channel", type=_channel_id, metavar="N", help="channel id (default: any)")
    sp.add_argument("--hex", action="store_true", help="show received payloads as hex")

    sp = add("health", cmd_health, "kupd's gRPC health status (exit 18 unless SERVING)")
    sp.add_argument("--service", default="", help="service name (default: the whole server)")

    def admin_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--admin-socket",
            metavar="PATH",
            help="kupd's root-only admin socket (default: $KUPD_ADMIN_SOCKET, else "
            f"{DEFAULT_ADMIN_SOCKET})",
        )

    admin_opts(sub.choices["devices"])

    sp = add("stats", cmd_stats, "traffic, sessions and errors from kupd's metrics")
    sp.add_argument(
        "--metrics",
        metavar="URL",
        help=f"metrics URL or HOST:PORT (default: $KUPD_METRICS, else {DEFAULT_METRICS})",
    )
    sp.add_argument(
        "--admin",
        action="store_true",
        help="read them over the admin socket instead (kupd needs no metrics_port)",
    )
    admin_opts(sp)

    sp = add("reload", cmd_reload, "admin: re-read kupd's config, apply what can change live")
    sp.epilog = (
        "Prints what the reload applied and which changed keys need a restart, then a "
        "'warning:' line for an audit_log kupd could not open again and for each setting "
        "that has no effect as set (--json: audit_log_error, warnings).  Exit 0 whenever "
        "the reload was applied, these included; 8 when kupd refused the file (nothing "
        "changed); 9 when kupd did not answer within --timeout (whether it reloaded is "
        "then not known)."
    )
    sp.add_argument(
        "--timeout",
        type=seconds_option,
        metavar="S",
        help="wait at most S seconds for kupd's answer (default 30): a stopped or hung "
        "kupd fails it then, exit 9",
    )
    admin_opts(sp)
    sp = add("leases", cmd_leases, "admin: every lease of every tenant")
    sp.add_argument("--tenant", metavar="NAME", help="only this tenant's")
    admin_opts(sp)
    sp = add("revoke", cmd_revoke, "admin: end a lease (its session gets PERMISSION_DENIED)")
    sp.add_argument("lease", metavar="LEASE")
    sp.add_argument("--reason", metavar="TEXT", help="shown to the lease's holder")
    admin_opts(sp)
    sp = add("metrics", cmd_metrics, "admin: kupd's metrics, in Prometheus text format")
    sp.add_argument(
        "--prefix", metavar="NAME", help="only the families whose name starts with this"
    )
    admin_opts(sp)
    sp = add("drain", cmd_drain, "admin: refuse new work on a device and end its leases")
    sp.add_argument("device", metavar="DEVICE")
    sp.add_argument("--undo", action="store_true", help="serve the device again")
    admin_opts(sp)
    return p


def _socket_file(socket: str) -> str:
    """The file of a socket given as PATH, unix:PATH or unix:///PATH."""
    if socket.startswith("unix://"):
        return socket[len("unix://") :]
    return socket.removeprefix("unix:")


def _user(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _group(gid: int) -> str:
    try:
        return f"gid {gid} ({grp.getgrgid(gid).gr_name})"
    except KeyError:
        return f"gid {gid}"


def permission_hint(socket: str) -> str:
    """Why connect(2) to ``socket`` was refused (EACCES), from what this
    process can see: the socket's owner, group and mode against its own uid
    and groups.  kupctl cannot tell kupd's default socket (``socket_mode``,
    kupd's group) from a tenant's (the ``[[tenant]]``'s owner, group and
    mode), so it names what the file says and both places it comes from."""
    try:
        st = os.stat(_socket_file(socket))
    except PermissionError:
        return (
            f" (no permission to connect to {socket}: a directory on its path does not let "
            "you through (search permission); docs/security.md)"
        )
    except OSError:
        return f" (no permission to connect to {socket}; docs/security.md)"
    mode = stat.S_IMODE(st.st_mode)
    owner, group = _user(st.st_uid), _group(st.st_gid)
    uid = os.geteuid()
    in_group = st.st_gid in {os.getegid(), *os.getgroups()}
    # the one class of the mode that applies to this process, as the kernel picks it
    lets_in = mode & (0o200 if st.st_uid == uid else 0o020 if in_group else 0o002)
    what = f"no permission to connect to {socket}: owned by {owner}, {group}, mode {mode:04o}"
    if lets_in:
        why = "its mode lets you in, so something else refused (an ACL or a security module)"
    elif st.st_uid == uid:
        why = "its mode does not let even its owner (you) connect"
    elif mode & 0o020 and not in_group:
        why = (
            f"only {owner} and members of {group} may connect, and you are neither: "
            f"be a member of {group} (kupd's group for its own socket, see socket_mode; "
            "a tenant's `group` for a tenant's socket) or use your own tenant's socket"
        )
    else:
        why = (
            f"only {owner} may connect: it is for a tenant you are not (or for kupd's "
            "user only); run as that user or use your own tenant's socket"
        )
    return f" ({what}: {why}; docs/security.md)"


def unavailable_hint(
    message: str, socket: str, given_by: str = "--socket / $KUPD_SOCKET", capped: bool = True
) -> str:
    """What to check when kupd could not be reached (or why it closed the
    connection), from gRPC's reason; ``given_by``: where the user set ``socket``;
    ``capped``: the socket may have a connection cap (the admin socket has none)."""
    if "Permission denied" in message:
        return permission_hint(socket)
    if "No such file or directory" in message:
        return f" (nothing at {socket}: is kupd running, and is {given_by} right?)"
    if capped and closed_as_made(message):
        # closed as it was accepted, before any HTTP/2: gRPC's connection
        # cap.  The library's message says what that means; kupctl names
        # the socket
        return f" ({socket} is likely at its max_connections limit)"

    if "Connection refused" in message:
        return (
            f" ({socket} exists but nobody accepts on it: kupd is not running there, "
            "or it is not a kupd socket)"
        )
    if message.startswith(f"ping timeout ({PING_TIMEOUT})"):
        return ""  # the client's own words say it
    # kupd ended the connection itself: the status kupd's gRPC sends on the
    # streams it cuts ("ping timeout"), or the GOAWAY frame's own text
    keepalive = "keepalive ping not answered in time (client too slow or stopped)"
    if message == "ping timeout" or "ping_timeout" in message:
        return f" (kupd closed the connection: {keepalive})"
    if "Broken pipe" in message:
        # this client wrote before it read that the connection was closed
        # (e.g. it was stopped while kupd dropped it)
        return f" (kupd closed the connection: it stopped, or it dropped this client: {keepalive})"
    if "Cancelling all calls" in message:
        # gRPC's status for the calls a server being stopped cuts (bare, or as
        # the GOAWAY's debug text): kupd stopping.  A reload that moves or
        # removes a socket ends what waits there with kupd's own UNAVAILABLE
        # saying where the socket went; only a request that ran on there
        # (a Call on a pool channel) past call_timeout is cut so
        return (
            " (kupd closed the connection: it is stopping -- or a reload moved or removed "
            "this socket and this request ran on there past call_timeout)"
        )
    if "GOAWAY" in message:
        return " (kupd closed the connection)"
    return f" (is kupd running on {socket}?)"


def _standard_fds() -> None:
    """Started with a standard descriptor closed (``2>&-``, a daemon's
    ``<&-``): put /dev/null there.  Else the first file kupctl opens -- the
    socket to kupd -- takes that number, and gRPC's own log lines (on
    descriptor 2) would be written into it; and Python leaves
    ``sys.stderr`` None, on which every error message (and a ^C's exit)
    failed with an AttributeError, exit 1 instead of the error's code.
    ``sys.stdout`` stays None: a recv refuses then (cmd_recv)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free number: fd
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    if sys.stderr is None:
        sys.stderr = open(2, "w", closefd=False)  # for the life of kupctl


def main(argv: Sequence[str] | None = None) -> int:
    _standard_fds()
    parser = build_parser()
    args = parser.parse_args(argv)
    _fill_defaults(parser, args)
    out = Output(args.json, sys.stdout)
    handler: Handler = args.handler
    # The command runs in a thread of its own, the main thread only waits:
    # a ^C (KeyboardInterrupt, raised in the main thread) must never land
    # inside gRPC's blocking calls -- it can leave their internal lock held,
    # and the close that follows then hangs (or fails "cannot release
    # un-acquired lock").  On ^C kupctl exits 130 at once; closing its
    # connection ends its streams, so kupd releases what they held.
    done: list[int] = []
    worker = threading.Thread(
        target=lambda: done.append(_run(args, out, handler)), name="kupctl", daemon=True
    )
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.25)
    except KeyboardInterrupt:
        _interrupted(args)
    return done[0] if done else EXIT_FAILURE


def _interrupted(args: argparse.Namespace) -> NoReturn:
    """A ^C: the command given up on, exit 130 -- for a recv under way,
    with the hint that says how to get its message.  A recv writing the
    message it received is waited for: once written, the message is
    delivered and no hint is printed (it would show it a second time); a
    second ^C stops the wait -- the message is not delivered (a part of
    it, at most), and the hint is printed."""
    stuck = False
    try:
        if not _OUTPUT.acquire(blocking=False):  # and held until the exit
            if getattr(args, "writing", False) and not args.json:
                with contextlib.suppress(OSError, ValueError):
                    sys.stderr.write(
                        "kupctl: interrupted while writing the message it received: "
                        "waiting for the write to end (^C again to stop now)\n"
                    )
                    sys.stderr.flush()
            _OUTPUT.acquire()
    except KeyboardInterrupt:
        stuck = True  # in the write: a flush of stdout would wait as well
    # decided: a ^C from now on ends kupctl where it is
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if not stuck:
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
    again = _again_hint(args, "interrupted")
    if again is not None:  # a recv under way: say how to ask again
        text, command, fields = again
        with contextlib.suppress(OSError, ValueError):
            if args.json:
                _error(args, f"{text}: {command}", 130, error="interrupted", **fields)
            else:
                sys.stderr.write(f"kupctl: {text}:\n{command}\n")
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    os._exit(130)


def _fill_defaults(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The paths and URLs left out, from the environment or the built-in
    defaults.  An empty one is a usage error, whether given as the option or
    as its variable ($KUPD_SOCKET, $KUPD_ADMIN_SOCKET, $KUPD_METRICS): never
    a silent fall back to the default."""

    def env(name: str) -> str | None:
        value = os.environ.get(name)
        if value == "":
            parser.error(f"${name} is set but empty: unset it for the default")
        return value

    if args.socket is None:
        args.socket = env("KUPD_SOCKET") or default_socket()
    if not args.socket:
        parser.error("argument --socket: must not be empty")
    if hasattr(args, "admin") and not hasattr(args, "metrics"):  # devices
        if args.admin_socket is not None:
            args.admin = True  # --admin-socket says where, and so which
        if not args.admin:
            del args.admin_socket  # a connection failure's hint names the socket
    if hasattr(args, "metrics"):  # stats: the endpoint, or --admin's socket
        if args.admin_socket is not None:
            args.admin = True  # --admin-socket says where, and so which
        if args.admin and args.metrics is not None:
            parser.error(
                "argument --metrics: not with --admin / --admin-socket (one source: "
                "the metrics endpoint or the admin socket)"
            )
        if not args.admin:
            del args.admin_socket  # a connection failure's hint names the endpoint
    if hasattr(args, "admin_socket"):  # the admin commands, stats --admin
        if args.admin_socket is None:
            args.admin_socket = env("KUPD_ADMIN_SOCKET") or DEFAULT_ADMIN_SOCKET
        if not args.admin_socket:
            parser.error("argument --admin-socket: must not be empty")
    if hasattr(args, "metrics") and not args.admin:  # stats from the endpoint
        if args.metrics is None:
            args.metrics = env("KUPD_METRICS") or DEFAULT_METRICS
        if not args.metrics:
            parser.error("argument --metrics: must not be empty")


def _error(args: argparse.Namespace, text: str, code: int, **fields: Any) -> int:
    """Report a failure on stderr -- ``kupctl: TEXT``, or with ``--json`` one
    JSON object: ``error`` (the class, or "usage" / "failure"), ``message``,
    ``exit_code``, ``command`` and ``fields`` -- and return its exit code."""
    prefix = fields.pop("prefix", "")  # the text's "Kind: " / "COMMAND: "
    if getattr(args, "json", False):
        doc = {
            "error": fields.pop("error"),
            "message": text,
            "exit_code": code,
            "command": args.command,
            **fields,
        }
        sys.stderr.write(json.dumps(doc) + "\n")
    else:
        sys.stderr.write(f"kupctl: {prefix}{text}\n")
    return code


def _run(args: argparse.Namespace, out: Output, handler: Handler) -> int:
    """One command, its failures turned into kupctl's exit codes."""
    try:
        return handler(args, out)
    except ArgumentError as exc:
        # the client library refused an argument before sending anything
        return _error(args, str(exc), EXIT_USAGE, error="usage", prefix=f"{args.command}: ")
    except kerr.KupError as exc:
        code = exit_code_for(exc)
        hint = ""
        if is_connection_failure(exc):
            # only when the connection itself failed, not for kupd's own
            # Unavailable ("device rot13 is not reachable")
            # the socket this command dialed: reload's is the admin socket
            admin = getattr(args, "admin_socket", None)
            if admin:
                hint = unavailable_hint(
                    exc.message, admin, "--admin-socket / $KUPD_ADMIN_SOCKET", capped=False
                )
            else:
                hint = unavailable_hint(exc.message, args.socket)
        with _OUTPUT:  # a hint is the ^C's or this one's
            again = _again_hint(args, "gave up")
            fields: dict[str, Any] = again[2] if again is not None else {}
            code = _error(
                args,
                f"{exc.message}{hint}",
                code,
                error=type(exc).__name__,
                prefix=f"{type(exc).__name__}: ",
                kup_code=exc.code,
                grpc_code=exc.grpc_code.name if exc.grpc_code is not None else None,
                connection_failure=is_connection_failure(exc),
                **fields,
            )
            if again is not None and not args.json:
                sys.stderr.write(f"kupctl: {again[0]}:\n{again[1]}\n")
            return code
    except CliError as exc:
        return _error(args, exc.message, exc.exit_code, error="failure")
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (kupctl watch | head): not an error of ours.
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), sys.stdout.fileno())
        # -- but for a recv whose message it took: kupd keeps it for its
        # name until the lease's next operation, so say how to get it
        with _OUTPUT:
            again = _again_hint(args, "could not write its message (its output was closed)")
            if again is None:
                return EXIT_OK
            return _output_failed(args, again)
    except OSError as exc:
        # Any other failure to write (kupctl recv L > a full disk, an I/O
        # error): a recv that took its message says how to get it, as for
        # a closed output.  Only a recv's output can fail so while a
        # receive is named (cmd_recv forgets the name on any other failure)
        with _OUTPUT:
            again = _again_hint(args, f"could not write its message ({exc.strerror or exc})")
            if again is None:
                raise
            # what is left in stdout's buffer would fail again at exit
            with open(os.devnull, "w") as devnull:
                os.dup2(devnull.fileno(), sys.stdout.fileno())
            return _output_failed(args, again)


def _output_failed(args: argparse.Namespace, again: tuple[str, str, dict[str, str]]) -> int:
    """A recv that took its message and could not write it: say how to get
    it (``again``, from _again_hint) as every failure is said -- with
    ``--json`` the JSON error object, with ``again_of`` and
    ``again_command`` -- and exit 1."""
    text, command, fields = again
    with contextlib.suppress(OSError, ValueError):
        if args.json:
            _error(args, f"{text}: {command}", EXIT_FAILURE, error="failure", **fields)
        else:
            sys.stderr.write(f"kupctl: {text}:\n{command}\n")
        sys.stderr.flush()
    return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
