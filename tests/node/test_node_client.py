"""The Node.js client (clients/node/kup.js, @grpc/grpc-js + @grpc/proto-loader
loading protos/kup/v1/kup.proto) against a real kupd + kupsim.

Each file of clients/node/test/ (run.js, lifecycle.js, api.js, errors.js,
abort.js; node:test files taking the socket path) runs as one test, in turn,
against one kupd with a short call_timeout (errors.js checks that a Call
without a timeout gets kupd's) and call_quarantine (the Calls left
unanswered or aborted there give their pool channel back soon).

big.js runs against a second kupd, whose echo has 4 MiB channels;
ratelimit.js against one whose only tenant has a small calls_per_second
and channel_ops_per_second.
gone.js runs on its own, once per signal, against a kupd of its own that it
ends (SIGTERM, SIGKILL) under a waiting Watch and Session; a new kupd then
serves the same socket and the same client must reach it soon.

The npm dependencies are installed into clients/node/node_modules (ignored by
git) from the committed package-lock.json with ``npm ci`` the first time, and
again only when package.json or the lock file changed; npm's cache makes the
reinstall work offline after the first one.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import IO

import pytest

from kupclient import Client
from kupd.testing import REPO_ROOT, doc_block, kupd, wait_until

sys.path.insert(0, str(REPO_ROOT / "tests" / "gateway"))
from h2slowping import SlowPingProxy  # tests/gateway's
from h2stall import StallProxy  # tests/gateway's

NODE_DIR = REPO_ROOT / "clients" / "node"
NPM_TIMEOUT = 600.0
RUN_TIMEOUT = 180.0

# The first test pays for `npm ci` (a clean clone: node_modules missing) and
# kupsim + kupd's start-up inside its own time; pytest's default 300 s would
# cut short the 600 s this file allows npm on a slow network.
pytestmark = pytest.mark.timeout(NPM_TIMEOUT + RUN_TIMEOUT + 120)


def _deps_current() -> bool:
    installed = NODE_DIR / "node_modules" / ".package-lock.json"
    if not installed.is_file():
        return False
    newest = max((NODE_DIR / f).stat().st_mtime for f in ("package.json", "package-lock.json"))
    return installed.stat().st_mtime >= newest


def ensure_node_deps() -> None:
    """``npm ci`` into clients/node when node_modules is missing or stale
    (idempotent; serialised by a lock file against parallel runs)."""
    npm = shutil.which("npm")
    assert shutil.which("node") and npm, "node and npm must be installed (Node.js >= 18)"
    with open(NODE_DIR / ".npm-install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _deps_current():
            return
        proc = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--prefer-offline"],
            cwd=NODE_DIR,
            capture_output=True,
            text=True,
            timeout=NPM_TIMEOUT,
            check=False,
        )
        assert proc.returncode == 0, f"npm ci failed:\n{proc.stdout}\n{proc.stderr}"
        (NODE_DIR / "node_modules" / ".package-lock.json").touch()


@pytest.fixture(scope="module")
def node_deps() -> None:
    ensure_node_deps()


#: kupd's call_timeout here, seconds (errors.js expects kupd's
#: DeadlineExceeded for a Call without timeoutMs to name it: "within 2.000s").
CALL_TIMEOUT = "2"

#: The test files and the least number of tests each must pass.
NODE_TESTS = {"run.js": 11, "lifecycle.js": 10, "api.js": 7, "errors.js": 11, "abort.js": 11}


#: The flags of the kupd the test files run against (docs/kupctl.md names
#: them for a run by hand).
KUPD_ARGS = ("--call-timeout", CALL_TIMEOUT, "--call-quarantine", "1")


@pytest.fixture(scope="module")
def kupd_socket(node_deps: None, cli_gateway: ModuleType) -> Iterator[tuple[str, int]]:
    with cli_gateway.gateway(("echo:2",), args=KUPD_ARGS) as gw:
        yield gw.socket, gw.pid


@pytest.mark.parametrize("name", sorted(NODE_TESTS))
def test_node_client(kupd_socket: tuple[str, int], name: str) -> None:
    socket, pid = kupd_socket
    # --expose-gc: lifecycle.js checks that a dropped Session is released
    # when it is collected; KUPD_PID: it and abort.js stop kupd (SIGSTOP)
    # for a moment
    proc = subprocess.run(
        ["node", "--expose-gc", str(NODE_DIR / "test" / name), socket, "echo"],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
        env={**os.environ, "KUPD_PID": str(pid)},
    )
    report = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, report
    # node:test's summary: every test ran and passed
    assert "# fail 0" in proc.stdout, report
    passed = [line for line in proc.stdout.splitlines() if line.startswith("# pass ")]
    assert passed and int(passed[0].split()[2]) >= NODE_TESTS[name], report


def test_node_client_rate_limits(node_deps: None, cli_gateway: ModuleType) -> None:
    """ratelimit.js, against a kupd whose one tenant may make a Call every
    2 s and a Session or lease operation every 10 s: the refused second
    Call's .retryAfterMs (kup-retry-after-ms), and a refused operation's,
    in-band on a Session (Error.retry_after_ms) as in a lease RPC's status."""
    with cli_gateway.rate_limited_gateway(0.5, channel_ops_per_second=0.1) as (_, sock):
        proc = subprocess.run(
            ["node", str(NODE_DIR / "test" / "ratelimit.js"), sock, "echo"],
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            check=False,
            env={**os.environ, "KUPD_RATE": "0.5", "KUPD_OPS_RATE": "0.1"},
        )
    report = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, report
    assert "# fail 0" in proc.stdout and "# pass 2" in proc.stdout, report


@pytest.fixture(scope="module")
def big_kupd_socket(node_deps: None, cli_gateway: ModuleType) -> Iterator[str]:
    """kupd over an echo with 4 MiB channels (KUP_MAX_PAGES pages of 4 KiB)."""
    sim_env = {**os.environ, "KUP_PARAM_ECHO_CHANNELS": "4", "KUP_PARAM_ECHO_PAGES": "1024"}
    with cli_gateway.gateway(("echo:2",), sim_env=sim_env) as gw:
        yield gw.socket


def test_node_client_big_messages(big_kupd_socket: str) -> None:
    """big.js: messages of 4 MiB (a channel's largest, past gRPC's default
    limit with the envelope) through a Call, a Session and a lease."""
    proc = subprocess.run(
        ["node", str(NODE_DIR / "test" / "big.js"), big_kupd_socket, "echo"],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    report = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, report
    assert "# fail 0" in proc.stdout and "# pass 1" in proc.stdout, report


#: The Node attach past its deadline: kupd's reply goes through the proxy,
#: its status is held, and the attach's timeoutMs (short, as the Python
#: test's: below gRPC's ping timeout) passes.
ATTACH_PAST_DEADLINE = """
const kup = require(process.argv[1]);
const client = kup.connect(process.argv[2]);
client.attach('echo', Number(process.argv[3]), { timeoutMs: 2000 }).then(
  (lease) => { console.log('attached', lease.lease_id); client.close(); },
  (err) => { console.log(err.constructor.name); client.close(); },
);
"""


def _through_stall(
    cli_gateway: ModuleType,
    tmp_path: Path,
    script: str,
    channel: int,
    *,
    direct: bool = True,
    free_after: bool = False,
) -> tuple[list[str], str]:
    """Run ``script`` (node -e) against a kupd of its own through
    tests/gateway's StallProxy, which passes kupd's reply to the first RPC
    and holds its status, so that the RPC's deadline passes after kupd wrote
    its reply: the script's arguments are kup.js, kupd's own socket
    (``direct``), the proxy's and ``channel``.  Returns its stdout lines and
    a report for assertions; checks that the proxy held kupd's status (kupd
    answered within the deadline) and, with ``free_after``, that
    ``channel`` is free once the script is done."""
    with cli_gateway.gateway(("echo:2",), args=("--lease-idle-timeout", "600")) as gw:
        proxy = StallProxy(str(tmp_path / "stall.sock"), gw.socket)
        sockets = [gw.socket, proxy.path] if direct else [proxy.path]
        try:
            proc = subprocess.run(
                ["node", "-e", script, str(NODE_DIR / "kup.js"), *sockets, str(channel)],
                capture_output=True,
                text=True,
                timeout=RUN_TIMEOUT,
                check=False,
            )
        finally:
            proxy.close()
        report = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        assert proxy.status_held.is_set(), "kupd did not answer within the deadline\n" + report
        if free_after:
            with Client(gw.socket) as c:
                state = c.devices("echo")[0].channels[channel].state
            assert state == "free", state + "\n" + report
    return proc.stdout.split("\n"), report


def test_node_client_attach_past_its_deadline_after_kupd_wrote_its_reply(
    node_deps: None, cli_gateway: ModuleType, tmp_path: Path
) -> None:
    """An attach past its deadline (its timeoutMs) after kupd wrote its
    reply (for kupd: delivered) -- gRPC drops the reply -- leaves no
    lease: the client releases by its attach_id before it rejects (see
    tests/gateway/test_gw_attach_reply_dropped.py for the Python client)."""
    lines, report = _through_stall(
        cli_gateway, tmp_path, ATTACH_PAST_DEADLINE, 5, direct=False, free_after=True
    )
    assert [line for line in lines if line] == ["DeadlineExceeded"], report


#: A lease receive past its deadline after kupd wrote its reply: the lease
#: is taken directly, the receive goes through the proxy (kupd's reply goes
#: through, its status is held), and the next receive gets the message.
RECEIVE_PAST_DEADLINE = """
const kup = require(process.argv[1]);
const direct = kup.connect(process.argv[2]);
const stalled = kup.connect(process.argv[3]);
(async () => {
  const lease = await direct.attach('echo', Number(process.argv[4]));
  await direct.leaseReceive(lease.lease_id, 30000);  // echo's greeting (a PASS)
  await direct.leaseSend(lease.lease_id, 'the one message');
  try {
    await stalled.leaseReceive(lease.lease_id, 1000);
    console.log('received');
  } catch (err) {
    console.log(err.constructor.name);
  }
  const got = await stalled.leaseReceive(lease.lease_id, 30000);
  console.log(`again ${got.kind} ${got.data.toString()}`);
  await direct.release(lease.lease_id);
})().catch((err) => console.log(`error ${err.message}`)).finally(() => {
  direct.close();
  stalled.close();
});
"""


def test_node_client_receive_past_its_deadline_after_kupd_wrote_its_reply(
    node_deps: None, cli_gateway: ModuleType, tmp_path: Path
) -> None:
    """A leaseReceive past its deadline after kupd wrote its reply -- gRPC
    drops the reply -- loses nothing: the next leaseReceive names it
    (again_of) and gets the same message (see
    tests/gateway/test_gw_receive_reply_dropped.py for the Python client)."""
    lines, report = _through_stall(cli_gateway, tmp_path, RECEIVE_PAST_DEADLINE, 6)
    assert lines[:2] == ["DeadlineExceeded", "again data the one message"], report


#: As RECEIVE_PAST_DEADLINE, with a leaseSend between that kupd refuses
#: before it runs on the lease (too big for the channel): kupd still keeps
#: the message of the receive given up on, and the next receive must name
#: that one still.  Then 3000 leases' receives given up on: at most 1024
#: names kept.
RECEIVE_PAST_DEADLINE_THEN_REFUSED = """
const kup = require(process.argv[1]);
const direct = kup.connect(process.argv[2]);
const stalled = kup.connect(process.argv[3]);
(async () => {
  const lease = await direct.attach('echo', Number(process.argv[4]));
  await direct.leaseReceive(lease.lease_id, 30000);  // echo's greeting (a PASS)
  await direct.leaseSend(lease.lease_id, 'the one message');
  try {
    await stalled.leaseReceive(lease.lease_id, 1000);
    console.log('received');
  } catch (err) {
    console.log(err.constructor.name);
  }
  try {
    await stalled.leaseSend(lease.lease_id, Buffer.alloc(1 << 16));
    console.log('sent');
  } catch (err) {
    console.log(err.constructor.name);
  }
  const got = await stalled.leaseReceive(lease.lease_id, 30000);
  console.log(`again ${got.kind} ${got.data.toString()}`);
  await direct.release(lease.lease_id);
  for (let i = 0; i < 3000; i++) stalled._gaveUp(`lease${i}`, `receive${i}`);
  console.log(`kept ${stalled.again.size} ${stalled.again.get('lease2999')}`);
})().catch((err) => console.log(`error ${err.message}`)).finally(() => {
  direct.close();
  stalled.close();
});
"""


def test_node_client_receive_given_up_then_an_operation_refused_before_it_ran(
    node_deps: None, cli_gateway: ModuleType, tmp_path: Path
) -> None:
    """The name of a leaseReceive given up on stays until an operation on
    the lease succeeds: one refused before it ran (TooBig) left kupd's kept
    message as it was, and the client forgot the name (NotYourTurn
    'already received').  And the names kept are bounded."""
    lines, report = _through_stall(cli_gateway, tmp_path, RECEIVE_PAST_DEADLINE_THEN_REFUSED, 5)
    # (echo answers channel 5 in upper case)
    assert [line.lower() for line in lines[:4]] == [
        "deadlineexceeded",
        "toobig",
        "again data the one message",
        "kept 1024 receive2999",
    ], report


#: A leaseReceive past its deadline after kupd wrote its reply, then the
#: program sends anyway (leaseSend, leasePass, leaseExchange): each names
#: the receive given up on (again_of) and kupd refuses it, NotYourTurn,
#: over the message it kept; the next leaseReceive gets the message.
SEND_AFTER_RECEIVE_GIVEN_UP = """
const kup = require(process.argv[1]);
const direct = kup.connect(process.argv[2]);
const stalled = kup.connect(process.argv[3]);
(async () => {
  const lease = await direct.attach('echo', Number(process.argv[4]));
  const id = lease.lease_id;
  await direct.leaseReceive(id, 30000);  // echo's greeting (a PASS)
  await direct.leaseSend(id, 'not lost');
  try {
    await stalled.leaseReceive(id, 1000);
    console.log('received');
  } catch (err) {
    console.log(err.constructor.name);
  }
  const name = stalled.again.get(id);
  for (const op of [() => stalled.leaseSend(id, 'sent anyway'), () => stalled.leasePass(id),
    () => stalled.leaseExchange(id, 'exchanged anyway', 30000)]) {
    try {
      await op();
      console.log('ran');
    } catch (err) {
      const named = err.message.includes(`its receive ${name}`);
      console.log(`${err.constructor.name} ${named}`);
    }
  }
  const got = await stalled.leaseReceive(id, 30000);
  console.log(`again ${got.kind} ${got.data.toString()}`);
  console.log(`forgotten ${stalled.again.get(id) === undefined}`);
  await direct.release(id);
})().catch((err) => console.log(`error ${err.message}`)).finally(() => {
  direct.close();
  stalled.close();
});
"""


def test_node_client_send_after_a_receive_given_up_on_loses_nothing(
    node_deps: None, cli_gateway: ModuleType, tmp_path: Path
) -> None:
    """A leaseSend, leasePass or leaseExchange after a leaseReceive given
    up on whose reply kupd had written is refused NotYourTurn -- before,
    it ran and the message was lost -- and the next leaseReceive gets it
    (see tests/gateway/test_gw_send_after_given_up.py for Python)."""
    lines, report = _through_stall(cli_gateway, tmp_path, SEND_AFTER_RECEIVE_GIVEN_UP, 6)
    assert lines[:6] == [
        "DeadlineExceeded",
        "NotYourTurn true",
        "NotYourTurn true",
        "NotYourTurn true",
        "again data not lost",
        "forgotten true",
    ], report


#: A program whose receives outlive their client names them itself: the
#: receive given up on (through the proxy: kupd's reply goes through, its
#: status is held, the deadline passes) names itself (receiveId); a second,
#: fresh client's leaseSend, leasePass and leaseExchange naming it
#: (againOf) are refused NotYourTurn, nothing sent, and its leaseReceive
#: naming it gets the message.
NAMED_RECEIVE_ACROSS_CLIENTS = """
const kup = require(process.argv[1]);
const direct = kup.connect(process.argv[2]);
const stalled = kup.connect(process.argv[3]);
let fresh = null;
(async () => {
  const lease = await direct.attach('echo', Number(process.argv[4]));
  const id = lease.lease_id;
  await direct.leaseReceive(id, 30000);  // echo's greeting (a PASS)
  await direct.leaseSend(id, 'outlives its client');
  direct.close();
  try {
    await stalled.leaseReceive(id, 1000, { receiveId: 'given-up_1' });
    console.log('received');
  } catch (err) {
    console.log(err.constructor.name);
  }
  stalled.close();
  fresh = kup.connect(process.argv[2]);
  const againOf = 'given-up_1';
  for (const op of [() => fresh.leaseSend(id, 'sent anyway', { againOf }),
    () => fresh.leasePass(id, { againOf }),
    () => fresh.leaseExchange(id, 'exchanged anyway', 30000, { againOf })]) {
    try {
      await op();
      console.log('ran');
    } catch (err) {
      console.log(`${err.constructor.name} ${err.message.includes('its receive given-up_1')}`);
    }
  }
  const got = await fresh.leaseReceive(id, 30000, { againOf });
  console.log(`again ${got.kind} ${got.data.toString()}`);
  try {  // nothing was sent: the turn is this side's
    await fresh.leaseReceive(id, 0);
    console.log('received');
  } catch (err) {
    console.log(`${err.constructor.name} ${err.message.includes('already received')}`);
  }
  await fresh.release(id);
})().catch((err) => console.log(`error ${err.message}`)).finally(() => {
  direct.close();
  stalled.close();
  if (fresh) fresh.close();
});
"""


def test_node_client_receive_given_up_in_one_client_is_named_by_another(
    node_deps: None, cli_gateway: ModuleType, tmp_path: Path
) -> None:
    """leaseReceive's receiveId / againOf and leaseSend's, leasePass's and
    leaseExchange's againOf, for a program whose receives outlive the
    client (see tests/gateway/test_gw_receive_reply_dropped.py and
    test_gw_send_after_given_up.py for Python).  Before, the names lived
    in the client that gave up: a fresh client's send ran over the message
    kupd kept, and its receive could not ask for it."""
    lines, report = _through_stall(cli_gateway, tmp_path, NAMED_RECEIVE_ACROSS_CLIENTS, 6)
    assert lines[:6] == [
        "DeadlineExceeded",
        "NotYourTurn true",
        "NotYourTurn true",
        "NotYourTurn true",
        "again data outlives its client",
        "NotYourTurn true",
    ], report


#: As NAMED_RECEIVE_ACROSS_CLIENTS for an exchange: the one given up on
#: names its reply (receiveId); the fresh client's exchange naming it is
#: refused, and its leaseReceive naming it gets the reply.
NAMED_EXCHANGE_ACROSS_CLIENTS = """
const kup = require(process.argv[1]);
const direct = kup.connect(process.argv[2]);
const stalled = kup.connect(process.argv[3]);
let fresh = null;
(async () => {
  const lease = await direct.attach('echo', Number(process.argv[4]));
  const id = lease.lease_id;
  await direct.leaseReceive(id, 30000);  // echo's greeting (a PASS)
  direct.close();
  try {
    await stalled.leaseExchange(id, 'request', 1000, { receiveId: 'xchg-1' });
    console.log('exchanged');
  } catch (err) {
    console.log(err.constructor.name);
  }
  stalled.close();
  fresh = kup.connect(process.argv[2]);
  try {
    await fresh.leaseExchange(id, 'sent anyway', 30000, { againOf: 'xchg-1' });
    console.log('ran');
  } catch (err) {
    console.log(`${err.constructor.name} ${err.message.includes('its receive xchg-1')}`);
  }
  const got = await fresh.leaseReceive(id, 30000, { againOf: 'xchg-1' });
  console.log(`again ${got.kind} ${got.data.toString()}`);
  await fresh.release(id);
})().catch((err) => console.log(`error ${err.message}`)).finally(() => {
  direct.close();
  stalled.close();
  if (fresh) fresh.close();
});
"""


def test_node_client_exchange_given_up_in_one_client_is_named_by_another(
    node_deps: None, cli_gateway: ModuleType, tmp_path: Path
) -> None:
    """leaseExchange's receiveId and againOf (its Send carries both)."""
    lines, report = _through_stall(cli_gateway, tmp_path, NAMED_EXCHANGE_ACROSS_CLIENTS, 6)
    assert lines[:3] == [
        "DeadlineExceeded",
        "NotYourTurn true",
        "again data request",
    ], report


#: A leaseReceive aborted (its name kept), then a non-blocking one that
#: finds nothing: the name stays (kupd answers one at once while another
#: operation holds the lease, such as the aborted one still under way).
NOT_READY_KEEPS_THE_NAME = """
const kup = require(process.argv[1]);
const c = kup.connect(process.argv[2]);
(async () => {
  const lease = await c.attach('echo', Number(process.argv[3]));
  await c.leaseReceive(lease.lease_id, 30000);  // echo's greeting (a PASS)
  await c.leaseSend(lease.lease_id, '!hold');  // never answered
  const ac = new AbortController();
  const p = c.leaseReceive(lease.lease_id, undefined, { signal: ac.signal });
  setTimeout(() => ac.abort(), 200);
  try {
    await p;
    console.log('received');
  } catch (err) {
    console.log(err.constructor.name);
  }
  const name = c.again.get(lease.lease_id);
  console.log(`named ${Boolean(name)}`);
  console.log(`got ${await c.leaseReceive(lease.lease_id, 0)}`);
  console.log(`kept ${c.again.get(lease.lease_id) === name}`);
  await c.release(lease.lease_id);
})().catch((err) => console.log(`error ${err.message}`)).finally(() => c.close());
"""


def test_node_client_receive_that_found_nothing_keeps_the_name_given_up_on(
    kupd_socket: tuple[str, int],
) -> None:
    proc = subprocess.run(
        ["node", "-e", NOT_READY_KEEPS_THE_NAME, str(NODE_DIR / "kup.js"), kupd_socket[0], "9"],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    report = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.stdout.split("\n")[:4] == [
        "AbortError",
        "named true",
        "got null",
        "kept true",
    ], report


def _read_until(stream: IO[str], marker: str, seen: list[str], out: Path) -> None:
    """Read ``stream``'s lines into ``seen`` up to the line ``marker``
    (``out``: the program's stdout, for the report)."""
    for line in stream:
        seen.append(line)
        if line.rstrip("\n") == marker:
            return
    report = f"stdout:\n{out.read_text()}\nstderr:\n{''.join(seen)}"
    raise AssertionError(f"no line {marker!r}\n{report}")


#: A Session that goes quiet while its ping answers come late (the proxy):
#: kupd drops the connection as hung; the next operation's error is printed.
QUIET_SESSION = """
const kup = require(process.argv[1]);
const client = kup.connect(process.argv[2]);
(async () => {
  const s = await kup.openSession(client, 'echo', Number(process.argv[3]));
  await s.receive(30000);  // echo's greeting (a PASS)
  console.log('quiet');
  await new Promise((resolve) => process.stdin.once('data', resolve));
  try {
    await s.exchange(Buffer.from('late'), 30000);
    console.log('exchanged');
  } catch (err) {
    console.log(err.constructor.name);
    console.log(err.message);
  }
})().catch((err) => console.log(`error ${err.message}`)).finally(() => {
  client.close();
  process.stdin.destroy();
});
"""


def test_node_client_dropped_as_hung_is_told_why(
    node_deps: None, cli_gateway: ModuleType, tmp_path: Path
) -> None:
    """A Session quiet while its ping answers come 2.5 s late, past kupd's
    1 s keepalive timeout: kupd drops the connection (GOAWAY
    ENHANCE_YOUR_CALM "ping_timeout"), and the next operation fails
    Unavailable saying so -- grpc-js alone says RESOURCE_EXHAUSTED
    "Bandwidth exhausted or memory limit exceeded", which reads as a quota
    (see tests/gateway/test_gw_ping_timeout.py for the Python client)."""
    args = ("--keepalive-time", "1", "--keepalive-timeout", "1")
    with cli_gateway.gateway(("echo:2",), args=args) as gw:
        proxy = SlowPingProxy(str(tmp_path / "slowping.sock"), gw.socket, 2.5)
        try:
            proc = subprocess.Popen(
                ["node", "-e", QUIET_SESSION, str(NODE_DIR / "kup.js"), proxy.path, "6"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                assert proc.stdout is not None and proc.stdin is not None
                assert proc.stdout.readline().strip() == "quiet"
                wait_until(lambda: proxy.goaways, timeout=60, what="kupd to drop the client")
                proc.stdin.write("go\n")
                proc.stdin.flush()
                out, err = proc.communicate(timeout=RUN_TIMEOUT)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        finally:
            proxy.close()
    report = f"stdout:\n{out}\nstderr:\n{err}\ngoaways: {proxy.goaways}"
    assert proxy.goaways[0].startswith(b"ping_timeout"), report
    lines = out.splitlines()
    assert lines[0] == "Unavailable", report
    assert "keepalive ping" in lines[1], report


@pytest.mark.parametrize("signal", ["SIGTERM", "SIGKILL"])
def test_node_client_kupd_goes_away(
    node_deps: None, cli_gateway: ModuleType, tmp_path: Path, signal: str
) -> None:
    """gone.js: kupd stopping (SIGTERM: Shutdown after SERVER_SHUTTING_DOWN)
    or dying (SIGKILL: Unavailable, a connection failure) under a Watch
    waiting in next(), a Watch nobody waits on and a Session's waiting
    receive: each ends with that class, and again on the next call; none
    hangs.  Then a new kupd serves the same socket (started on another path
    and linked in its place), and the same client
    reaches it within one short reconnect back-off."""
    with cli_gateway.gateway(("echo:2",), check_exit=signal == "SIGTERM") as gw:
        out = tmp_path / "stdout"
        with open(out, "w") as stdout:
            proc = subprocess.Popen(
                ["node", str(NODE_DIR / "test" / "gone.js"), gw.socket, "echo"],
                stdin=subprocess.PIPE,
                stdout=stdout,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, "KUPD_PID": str(gw.pid), "KUPD_SIGNAL": signal},
            )
        assert proc.stdin is not None and proc.stderr is not None
        seen: list[str] = []
        try:
            _read_until(proc.stderr, "kupd gone", seen, out)
            new = tmp_path / "new.sock"
            with kupd(
                "--pid-file",
                "-",
                sim=gw.sim,
                devices=("echo:2",),
                socket=new,
                command=[str(cli_gateway.console_script("kupd"))],
                env=gw.sim.env(),
                start_timeout=cli_gateway.START_TIMEOUT,
                stop_timeout=cli_gateway.STOP_TIMEOUT,
            ):
                proc.stdin.write("ready\n")
                proc.stdin.flush()
                _read_until(proc.stderr, "rename", seen, out)
                # the new kupd serves the client's path from now on (a link: kupd stops
                # when its own path is removed or replaced)
                os.link(new, gw.socket)
                proc.stdin.write("back\n")
                proc.stdin.close()
                seen.append(proc.stderr.read())
                proc.wait(RUN_TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        report = f"stdout:\n{out.read_text()}\nstderr:\n{''.join(seen)}"
        assert proc.returncode == 0, report
        assert "# fail 0" in out.read_text() and "# pass 1" in out.read_text(), report


def test_kupctl_md_runs_the_test_files_as_tests_node_does() -> None:
    """docs/kupctl.md's Node tests by hand: its loop runs the files this
    file runs against one kupd, in the same order, with KUPD_PID set, and
    its text names the kupd flags they need (without them errors.js
    fails)."""
    block = doc_block("docs/kupctl.md", "sh", "clients/node/test/$t.js")
    loop = [ln for ln in block.splitlines() if ln.startswith("for t in ")]
    assert len(loop) == 1, block
    names = loop[0].removeprefix("for t in ").split(";", 1)[0].split()
    # in test_node_client's order, so that a run by hand is the run
    # tests/node does (no file needs its place any more: abort.js's first
    # test, which met a pool channel errors.js left quarantined, looks for
    # leases of its own now, not at every channel's state)
    assert [f"{n}.js" for n in names] == sorted(NODE_TESTS), loop
    assert 'KUPD_PID=$(cat "$RUN/kupd.sock.pid")' in block, block
    text = " ".join((REPO_ROOT / "docs" / "kupctl.md").read_text().split())
    assert f"`{' '.join(KUPD_ARGS)}` added" in text


def test_gateway_md_sample_runs(kupd_socket: tuple[str, int], tmp_path: Path) -> None:
    """docs/gateway.md's Node.js sample, from the repository's root as it
    says, runs against kupd to its end (the watch included)."""
    socket, _ = kupd_socket
    source = doc_block("docs/gateway.md", "js", "kup.connect(")
    assert source.count("'/run/kupd/kupd.sock'") == 1
    source = source.replace("/run/kupd/kupd.sock", socket)
    kup_js = f"require({str(NODE_DIR / 'kup')!r})"
    sample = tmp_path / "sample.js"
    sample.write_text(source.replace("require('./clients/node/kup')", kup_js))
    proc = subprocess.run(
        ["node", str(sample)], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=RUN_TIMEOUT, check=False,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stderr == "", proc
