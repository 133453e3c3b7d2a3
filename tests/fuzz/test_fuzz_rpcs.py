"""Hypothesis-driven fuzz of every kup.v1 RPC (Kup and Admin) against a real kupd: random
fields (the requests' own names too: attach_id, receive_id, again_of), sizes,
orders and cancels.  After each example: kupd is alive and
SERVING, no lease is left behind (Admin.ListLeases, after the example
released what it took), and every status is one of the taxonomy's codes --
never UNKNOWN (an unmapped exception) nor INTERNAL from a healthy device.
Bounded: 100 examples, each RPC with a short deadline (about a minute)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import example as also_run
from hypothesis import strategies as st
from tenancy_helpers import TenantKupd

from kupapi import MAX_GRPC_MESSAGE, kup_pb2, kup_pb2_grpc
from kupd.testing import wait_until

ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.CANCELLED,  # our own cancels
    grpc.StatusCode.ABORTED,
}



def _revoked(code: grpc.StatusCode, details: str) -> bool:
    """What an operation on a lease the admin revoked gets: PERMISSION_DENIED
    with the admin's reason (the holder is told why, kupd.sessions'
    tombstones)."""
    return code == grpc.StatusCode.PERMISSION_DENIED and "rule admin-revoke" in details


devices = st.sampled_from(["echo", "hostile", "", "nope", "echo\x00", "é" * 40, "/etc/passwd"])
channels = st.one_of(st.none(), st.integers(0, 2**32 - 1), st.integers(0, 140))
data = st.one_of(
    st.binary(max_size=64),
    st.integers(0, 9000).map(lambda n: b"d" * n),
    st.sampled_from([b"!delay", b"!hold", b""]),
)
modes = st.integers(0, 5)
timeouts = st.integers(0, 300)
lease_refs = st.one_of(st.integers(0, 3), st.text(max_size=20))
# a request's own names (attach_id, receive_id, again_of): none, a few valid
# ones that repeat (so that an again_of can name a receive kupd kept and an
# attach_id can be withdrawn before or after its Attach), or anything
names = st.one_of(
    st.just(""),
    st.sampled_from(["n1", "n2", "n3"]),
    st.text(max_size=70),
    st.text(alphabet="ab-_", min_size=60, max_size=70),
)


@st.composite
def session_request(draw: Any) -> kup_pb2.SessionRequest:
    kind = draw(st.sampled_from(["attach", "send", "receive", "pass", "exchange", "empty"]))
    r = kup_pb2.SessionRequest(request_id=draw(st.integers(0, 2**64 - 1)))
    if kind == "attach":
        r.attach.device = draw(devices)
        c = draw(channels)
        if c is not None:
            r.attach.channel = c
    elif kind == "send":
        r.send.data = draw(data)
    elif kind == "receive":
        r.receive.mode = draw(modes)
        r.receive.timeout_ms = draw(timeouts)
    elif kind == "pass":
        r.pass_turn.SetInParent()
    elif kind == "exchange":
        r.exchange.data = draw(data)
        r.exchange.mode = draw(modes)
        r.exchange.timeout_ms = draw(timeouts)
    return r


ops = st.one_of(
    st.tuples(st.just("list"), devices),
    st.tuples(st.just("attach"), devices, channels),
    st.tuples(st.just("attach_named"), devices, channels, names),
    st.tuples(st.just("release"), lease_refs),
    st.tuples(st.just("release_named"), names),
    st.tuples(st.just("send"), lease_refs, data, st.booleans(), modes, timeouts, names, names),
    st.tuples(st.just("receive"), lease_refs, modes, timeouts, names, names),
    st.tuples(st.just("pass"), lease_refs, names),
    st.tuples(st.just("call"), devices, data, timeouts, st.text(max_size=30)),
    st.tuples(
        st.just("session"),
        st.lists(session_request(), min_size=0, max_size=6),
        st.integers(0, 6),  # cancel after this many responses
        st.booleans(),  # first request a valid attach
    ),
    st.tuples(st.just("watch"), devices, st.booleans(), st.integers(0, 3)),
    # the Admin service (admin socket)
    st.tuples(st.just("leases"), st.text(max_size=10)),
    st.tuples(st.just("revoke"), lease_refs, st.text(max_size=20)),
    st.tuples(st.just("drain"), devices, st.booleans()),
    st.tuples(st.just("reload")),
    st.tuples(st.just("metrics"), st.one_of(st.sampled_from(["", "kupd_", "kupd_calls"]),
                                            st.text(max_size=12))),
)

DEADLINE = 1.5


def _code(exc: grpc.RpcError) -> grpc.StatusCode:
    return exc.code()


class Runner:
    def __init__(self, stub: kup_pb2_grpc.KupStub, admin: kup_pb2_grpc.AdminStub) -> None:
        self.stub = stub
        self.admin = admin
        self.drained: set[str] = set()
        self.leases: list[str] = []
        self.codes: list[tuple[str, grpc.StatusCode, str]] = []

    def lease(self, ref: int | str) -> str:
        if isinstance(ref, int):
            return self.leases[ref % len(self.leases)] if self.leases else ""
        return ref

    def run(self, op: tuple[Any, ...]) -> None:
        name = op[0]
        try:
            self._run(op)
            self.codes.append((name, grpc.StatusCode.OK, ""))
        except grpc.RpcError as exc:
            self.codes.append((name, _code(exc), exc.details() or ""))

    def _run(self, op: tuple[Any, ...]) -> None:
        s = self.stub
        name = op[0]
        if name == "list":
            s.ListDevices(kup_pb2.ListDevicesRequest(device=op[1]), timeout=DEADLINE)
        elif name == "attach":
            req = kup_pb2.AttachRequest(device=op[1])
            if op[2] is not None:
                req.channel = op[2]
            self.leases.append(s.Attach(req, timeout=DEADLINE).lease_id)
        elif name == "attach_named":
            req = kup_pb2.AttachRequest(device=op[1], attach_id=op[3])
            if op[2] is not None:
                req.channel = op[2]
            self.leases.append(s.Attach(req, timeout=DEADLINE).lease_id)
        elif name == "release":
            s.Release(kup_pb2.ReleaseRequest(lease_id=self.lease(op[1])), timeout=DEADLINE)
        elif name == "release_named":
            s.Release(kup_pb2.ReleaseRequest(attach_id=op[1]), timeout=DEADLINE)
        elif name == "send":
            s.Send(
                kup_pb2.SendRequest(
                    lease_id=self.lease(op[1]),
                    data=op[2],
                    wait_reply=op[3],
                    reply_mode=op[4],
                    reply_timeout_ms=op[5],
                    receive_id=op[6],
                    again_of=op[7],
                ),
                timeout=DEADLINE,
            )
        elif name == "receive":
            s.Receive(
                kup_pb2.ReceiveRequest(
                    lease_id=self.lease(op[1]),
                    mode=op[2],
                    timeout_ms=op[3],
                    receive_id=op[4],
                    again_of=op[5],
                ),
                timeout=DEADLINE,
            )
        elif name == "pass":
            req_p = kup_pb2.PassRequest(lease_id=self.lease(op[1]), again_of=op[2])
            s.Pass(req_p, timeout=DEADLINE)
        elif name == "call":
            s.Call(
                kup_pb2.CallRequest(device=op[1], data=op[2], timeout_ms=op[3], caller=op[4]),
                timeout=DEADLINE,
            )
        elif name == "session":
            reqs: list[kup_pb2.SessionRequest] = list(op[1])
            if op[3]:
                reqs.insert(0, kup_pb2.SessionRequest(attach=kup_pb2.SessionAttach(device="echo")))
            stop = threading.Event()

            def gen() -> Iterator[kup_pb2.SessionRequest]:
                yield from reqs
                stop.wait(DEADLINE)

            call = s.Session(gen(), timeout=DEADLINE)
            try:
                for i, _ in enumerate(call):
                    if i + 1 >= op[2]:
                        call.cancel()
                        break
            finally:
                stop.set()
        elif name == "leases":
            self.admin.ListLeases(kup_pb2.ListLeasesRequest(tenant=op[1]), timeout=DEADLINE)
        elif name == "revoke":
            self.admin.RevokeLease(
                kup_pb2.RevokeLeaseRequest(lease_id=self.lease(op[1]), reason=op[2]),
                timeout=DEADLINE,
            )
        elif name == "drain":
            if not op[2]:
                self.drained.add(op[1])
            self.admin.DrainDevice(
                kup_pb2.DrainDeviceRequest(device=op[1], undo=op[2]), timeout=DEADLINE
            )
        elif name == "reload":
            self.admin.Reload(kup_pb2.ReloadRequest(), timeout=10)
        elif name == "metrics":
            text = self.admin.GetMetrics(
                kup_pb2.GetMetricsRequest(prefix=op[1]), timeout=DEADLINE
            ).text
            for line in text.splitlines():
                # every family kept, and only those: the prefix starts each name
                name_of = line.split()[2] if line.startswith("#") else line
                assert name_of.startswith(op[1]), (op[1], line)
        elif name == "watch":
            call = s.Watch(
                kup_pb2.WatchRequest(device=op[1], initial_state=op[2]), timeout=DEADLINE
            )
            for i, _ in enumerate(call):
                if i + 1 >= op[3]:
                    call.cancel()
                    break

    def release_all(self) -> None:
        for dev in self.drained:
            try:
                self.admin.DrainDevice(
                    kup_pb2.DrainDeviceRequest(device=dev, undo=True), timeout=10
                )
            except grpc.RpcError as exc:
                assert _code(exc) == grpc.StatusCode.NOT_FOUND, exc
        for lid in self.leases:
            try:
                self.stub.Release(kup_pb2.ReleaseRequest(lease_id=lid), timeout=10)
            except grpc.RpcError as exc:
                # already gone: released or expired (NOT_FOUND), or revoked by
                # the admin
                code = _code(exc)
                assert code == grpc.StatusCode.NOT_FOUND or _revoked(code, exc.details() or ""), exc


def test_fuzz_every_rpc(fk: TenantKupd) -> None:
    chan = grpc.insecure_channel(
        "unix:" + str(fk.dir / "kupd.sock"),
        options=[
            ("grpc.max_send_message_length", MAX_GRPC_MESSAGE),
            ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE),
        ],
    )
    stub = kup_pb2_grpc.KupStub(chan)
    admin_chan = grpc.insecure_channel("unix:" + fk.admin_socket)
    admin = kup_pb2_grpc.AdminStub(admin_chan)
    adm = fk.admin()

    @settings(
        max_examples=100,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(ops, min_size=1, max_size=8))
    # found by a run: the clean-up's Release of a lease the admin revoked
    @also_run(seq=[("attach", "echo", None), ("revoke", 0, "")])
    # and (a CI run) the example's own Release of it
    @also_run(seq=[("attach", "echo", None), ("revoke", 0, ""), ("release", 0)])
    # a named receive's message kept, then named by a Send, a Receive, a Pass
    @also_run(
        seq=[
            ("attach_named", "echo", None, "n1"),
            ("send", 0, b"x", False, 0, 0, "", ""),
            ("receive", 0, 2, 300, "n2", ""),
            ("send", 0, b"y", True, 2, 300, "n3", "n2"),
            ("receive", 0, 2, 300, "", "n2"),
            ("pass", 0, "n2"),
            ("release_named", "n1"),
            ("release_named", "n2"),
        ]
    )
    def example(seq: list[tuple[Any, ...]]) -> None:
        ran.append(len(seq))
        r = Runner(stub, admin)
        try:
            for op in seq:
                r.run(op)
        finally:
            r.release_all()
        for name, code, details in r.codes:
            # a revoked lease's later operations are told why, as its clean-up is
            assert code in ALLOWED or _revoked(code, details), (name, code, details, seq)
        assert fk.proc.poll() is None, fk.log()
        wait_until(lambda: adm.list_leases() == [], timeout=20, what="no leaked lease")
        with fk.client("kupd") as c:
            assert c.health() == "SERVING"

    ran: list[int] = []
    try:
        example()
        # hypothesis really ran the bounded batch (not 0 examples)
        assert len(ran) >= 50, ran
        print(f"fuzz: {len(ran)} examples, {sum(ran)} operations")
    finally:
        adm.close()
        admin_chan.close()
        chan.close()
    # still serving, after everything
    with fk.client("kupd") as c:
        assert c.call("echo", b"alive").data.lower() == b"alive"
