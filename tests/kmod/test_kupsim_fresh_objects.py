"""Every attachment of a kupsim channel gets objects of its own: a fresh
memfd for the channel pages (the kernel side's mapping replaced at the same
address) and fresh kernel->user / user->kernel eventfds.  A user that kept
its memfd mapping and eventfds after detaching -- a process that passed them
on, or simply never closed them -- must not be able to scribble on the next
user's control page or data, nor wake the kernel side on its behalf, nor
steal its wake-ups (kmod/kupsim/kupsim_glue.c, kupsim_chan_renew).

All real processes: kupsim (ASan+UBSan and TSan builds, which must exit 0
with no sanitizer report), this test process as the previous holder
speaking kupsim's wire protocol and the turn protocol of kup_abi.h by hand,
and the next user either also by hand or as a separate Python process
using libkup through kupd.channel."""

from __future__ import annotations

import mmap
import os
import random
import select
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

from kmod_util import (
    ATTACH_REPLY,
    E_BUSY,
    E_OK,
    E_RELEASING,
    E_SYS,
    variant_kupsim,
    wire_attach,
    wire_connect,
    wire_info,
)

from kupd.testing import KupSim, kmod_out, kupd_env, kupsim

__all__: list[str] = []

# kup_abi.h, pinned there by _Static_assert
MAGIC = 0x3150554B
TURN_KERNEL, TURN_USER = 0x4B45524E, 0x55534552
KIND_DATA, KIND_PASS = 1, 2
OFF_MAGIC, OFF_CHAN_ID, OFF_U2K_OFF, OFF_U2K_SIZE = 0, 32, 24, 28
OFF_K2U_OFF, OFF_K2U_SIZE = 16, 20
OFF_TURN, OFF_STATE, OFF_ATTACH_GEN = 64, 68, 72
OFF_K2U, OFF_KERNEL_WAITING, OFF_U2K, OFF_USER_WAITING = 128, 144, 192, 208
STATE_PEER_GONE = 0x4
DESC = struct.Struct("<IIQ")

WAIT = 30.0  # generous bound on every wait; never a timing assertion
CHANNELS = "8"


def echo_env() -> dict[str, str]:
    return {**os.environ, "KUP_PARAM_ECHO_CHANNELS": CHANNELS}


def wait_until(pred: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def efd_drain(fd: int) -> None:
    """Read an eventfd (non-blocking, as kupsim makes them) if it has a count."""
    try:
        os.read(fd, 8)
    except BlockingIOError:
        pass


def efd_kick(fd: int) -> None:
    os.write(fd, struct.pack("<Q", 1))


class RawUser:
    """One attachment, spoken by hand: the fds of the ATTACH reply, the
    channel pages mapped MAP_SHARED, and the user side of the turn protocol.
    Sends always write the user->kernel eventfd (a spurious wake-up is
    harmless; Python cannot fence, so a conditional one could be missed);
    waits poll the kernel->user eventfd in short slices and re-check the
    turn word, so they never depend on a wake-up arriving."""

    def __init__(self, path: str, chan: int, busy_timeout: float = 0.0) -> None:
        """Attach chan; while kupsim answers KUP_E_RELEASING (the module
        has not let go of it yet) or KUP_E_BUSY (its last user's hang-up not
        yet seen), ask again every 20 ms for up to busy_timeout seconds (a
        bounded wait)."""
        deadline = time.monotonic() + busy_timeout
        self.sock = wire_connect(path)
        st, fds, msg = wire_attach(self.sock, chan)
        while st in (E_BUSY, E_RELEASING) and time.monotonic() < deadline:
            time.sleep(0.02)
            st, fds, msg = wire_attach(self.sock, chan)
        assert st == E_OK and len(fds) == 3, (st, fds)
        self.memfd, self.k2u_efd, self.u2k_efd = fds
        _op, _st, self.chan, _pages, _psz, _pad, self.nbytes = ATTACH_REPLY.unpack_from(msg)
        self.mem = mmap.mmap(self.memfd, self.nbytes, mmap.MAP_SHARED)
        self.k2u_seq = 0
        self.u2k_seq = 0
        assert self.u32(OFF_MAGIC) == MAGIC
        assert self.u32(OFF_CHAN_ID) == chan
        self.gen = struct.unpack_from("<Q", self.mem, OFF_ATTACH_GEN)[0]
        self.k2u_off, self.k2u_size = self.u32(OFF_K2U_OFF), self.u32(OFF_K2U_SIZE)
        self.u2k_off, self.u2k_size = self.u32(OFF_U2K_OFF), self.u32(OFF_U2K_SIZE)

    def u32(self, off: int) -> int:
        value: int = struct.unpack_from("<I", self.mem, off)[0]
        return value

    def inode(self) -> int:
        return os.fstat(self.memfd).st_ino

    def detach(self) -> None:
        """End the attachment (close the connection), keeping every fd and
        the mapping."""
        self.sock.close()

    def close(self) -> None:
        self.sock.close()
        self.mem.close()
        for fd in (self.memfd, self.k2u_efd, self.u2k_efd):
            os.close(fd)

    def receive(self) -> tuple[int, bytes]:
        """Wait until the kernel hands the turn over; (kind, payload)."""
        deadline = time.monotonic() + WAIT
        struct.pack_into("<I", self.mem, OFF_USER_WAITING, 1)
        try:
            while self.u32(OFF_TURN) != TURN_USER:
                assert not self.u32(OFF_STATE) & STATE_PEER_GONE, "kernel gave up on us"
                assert time.monotonic() < deadline, f"chan {self.chan}: no reply"
                if select.select([self.k2u_efd], [], [], 0.05)[0]:
                    efd_drain(self.k2u_efd)
        finally:
            struct.pack_into("<I", self.mem, OFF_USER_WAITING, 0)
        length, kind, seq = DESC.unpack_from(self.mem, OFF_K2U)
        assert seq == self.k2u_seq + 1, (seq, self.k2u_seq)
        assert length <= self.k2u_size
        self.k2u_seq = seq
        return kind, bytes(self.mem[self.k2u_off : self.k2u_off + length])

    def send(self, data: bytes) -> None:
        assert self.u32(OFF_TURN) == TURN_USER
        self.mem[self.u2k_off : self.u2k_off + len(data)] = data
        self.u2k_seq += 1
        DESC.pack_into(self.mem, OFF_U2K, len(data), KIND_DATA, self.u2k_seq)
        struct.pack_into("<I", self.mem, OFF_TURN, TURN_KERNEL)
        efd_kick(self.u2k_efd)

    def exchange(self, data: bytes) -> bytes:
        self.send(data)
        kind, reply = self.receive()
        assert kind == KIND_DATA, kind
        return reply


class Scribbler:
    """What a detached holder can still do with the objects it kept."""

    def __init__(self, old: RawUser, seed: int) -> None:
        self.old = old
        self.rng = random.Random(seed)

    def once(self) -> None:
        mem = self.old.mem
        # garbage everywhere, then the words a peer acts on: a turn handed
        # to the kernel with a nonsense descriptor, a user "waiting"
        mem[:] = self.rng.randbytes(len(mem))
        DESC.pack_into(mem, OFF_U2K, 0xFFFFFFFF, 77, self.rng.getrandbits(64))
        struct.pack_into("<I", mem, OFF_TURN, self.rng.choice((TURN_KERNEL, TURN_USER, 0)))
        struct.pack_into("<I", mem, OFF_USER_WAITING, 1)
        efd_kick(self.old.u2k_efd)  # wake "the kernel"
        efd_kick(self.old.k2u_efd)
        efd_drain(self.old.k2u_efd)  # steal "the user's" wake-up


def memfd_inodes_mapped(pid: int) -> set[int]:
    """Inodes of the kup channel memfds that process pid has mapped."""
    out = set()
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].startswith("/memfd:kup-"):
                out.add(int(parts[4]))
    return out


def memfd_inodes_open(pid: int) -> set[int]:
    """Inodes of the kup channel memfds that process pid holds a descriptor of."""
    out = set()
    fd_dir = f"/proc/{pid}/fd"
    for name in os.listdir(fd_dir):
        try:
            if os.readlink(f"{fd_dir}/{name}").startswith("/memfd:kup-"):
                out.add(os.stat(f"{fd_dir}/{name}").st_ino)
        except FileNotFoundError:
            continue
    return out


def wait_detached(path: str, chan: int) -> None:
    with wire_connect(path) as s:
        wait_detached_on(s, chan)


def wait_detached_on(s: socket.socket, chan: int) -> None:
    # KUP_INFO_ATTACHED clear (its module may still hold it: the other bit)
    wait_until(lambda: not wire_info(s)[1][chan] & 1, f"channel {chan} to detach")


def assert_fresh_attachment(
    sim: KupSim, a: RawUser, ino_a: int, b: RawUser, seed: int
) -> Scribbler:
    """B, the next user of the channel detached holder A had (its memfd inode
    ino_a), has fresh objects: its own file, which kupsim maps and A's is
    gone, the next generation, the kernel's opening PASS, zeroed pages; and A
    doing its worst (scribbling its old mapping, poking its old eventfds)
    while B holds the turn and the kernel side sleeps changes nothing of B's.
    Returns A's scribbler, for more of the same."""
    assert b.inode() != ino_a
    assert b.inode() in memfd_inodes_mapped(sim.pid)  # the kernel side maps B's
    assert ino_a not in memfd_inodes_mapped(sim.pid)
    assert b.gen == a.gen + 1
    assert b.receive() == (KIND_PASS, b"")
    # nothing of A's session is in B's pages
    assert bytes(b.mem[b.u2k_off : b.u2k_off + b.u2k_size]).count(0) == b.u2k_size
    assert bytes(b.mem[b.k2u_off : b.k2u_off + b.k2u_size]).count(0) == b.k2u_size
    # the kernel side says so in B's page before it sleeps
    wait_until(lambda: b.u32(OFF_KERNEL_WAITING) == 1, "echo to sleep")
    scribbler = Scribbler(a, seed=seed)
    before = bytes(b.mem)
    for _ in range(20):
        scribbler.once()
    assert bytes(b.mem) == before
    assert not readable(b.k2u_efd) and not readable(b.u2k_efd)
    return scribbler


def assert_no_protocol_errors(sim: KupSim) -> None:
    log = sim.stderr()
    bad = [ln for ln in log.splitlines() if "protocol error" in ln or "-EPROTO" in ln]
    assert not bad, log


def test_detached_holder_cannot_reach_next_attachment(variant_out: Path) -> None:
    chan = 4  # even: echo answers unchanged
    with variant_kupsim(variant_out, "echo", env=echo_env()) as sim:
        path = sim.device_path("echo")
        a = RawUser(path, chan)
        assert a.receive() == (KIND_PASS, b"")  # echo hands a fresh user the turn
        assert a.exchange(b"from A") == b"from A"  # A's objects were the live ones
        a.mem[a.u2k_off : a.u2k_off + 9] = b"A secret!"  # left in the data area
        ino_a = a.inode()
        assert ino_a in memfd_inodes_mapped(sim.pid)
        a.detach()
        wait_detached(path, chan)

        # kupsim lets go of A's file once the channel is renewed: at the
        # detach, or as soon as echo's worker (asleep in its receive,
        # holding the channel) has seen A leave -- not mapped, not open
        wait_until(
            lambda: (
                ino_a not in memfd_inodes_mapped(sim.pid)
                and ino_a not in memfd_inodes_open(sim.pid)
            ),
            "kupsim to renew the channel",
        )

        b = RawUser(path, chan)
        try:
            scribbler = assert_fresh_attachment(sim, a, ino_a, b, seed=1)
            # and the other way round: B's eventfds do not reach A's
            efd_drain(a.k2u_efd)
            efd_drain(a.u2k_efd)
            efd_kick(b.k2u_efd)
            efd_kick(b.u2k_efd)
            assert not readable(a.k2u_efd) and not readable(a.u2k_efd)
            efd_drain(b.k2u_efd)

            # B's conversation, with A scribbling between every step; the
            # kernel's wake-ups (B sets user_waiting) land on B's eventfd only
            for i in range(200):
                payload = f"B message {i} ".encode() * (1 + i % 40)
                scribbler.once()
                efd_drain(a.k2u_efd)
                b.send(payload)
                scribbler.once()
                kind, reply = b.receive()
                assert (kind, reply) == (KIND_DATA, payload), i
                assert not readable(a.k2u_efd), "a wake-up for B reached A's old eventfd"
            assert b.u32(OFF_STATE) & STATE_PEER_GONE == 0
        finally:
            b.close()
            a.close()
        assert_no_protocol_errors(sim)


B_USER = textwrap.dedent(
    """
    import sys
    from kupd.channel import Device

    chan, rounds = int(sys.argv[1]), int(sys.argv[2])
    with Device.open("echo") as dev, dev.channel(chan) as ch:
        first = ch.receive(timeout=30.0)
        assert first.data == b"", first
        for i in range(rounds):
            payload = (b"round %d " % i) * (1 + i % 50)
            reply = ch.exchange(payload, 30.0)
            if reply.data != payload:
                print(f"round {i}: sent {payload!r}, got {reply.data!r}", flush=True)
                sys.exit(1)
            if i % 97 == 0:
                # a pause long enough for the module thread to go to sleep in
                # poll(): B's wake-up must reach it through B's eventfd
                reply = ch.exchange(b"!delay", 30.0)
                assert reply.data == b"!delay", reply
    print("ok", rounds, flush=True)
    """
)


def test_scribbler_does_not_disturb_libkup_user(variant_out: Path) -> None:
    """B is a separate process using libkup (kupd.channel); A keeps
    scribbling on its old mapping and poking its old eventfds the whole time
    B talks to echo.  Every reply must be right, no wait may time out (a
    stolen or lost wake-up would), and the kernel side must see no protocol
    error."""
    chan = 6
    rounds = 1500
    with variant_kupsim(variant_out, "echo", env=echo_env()) as sim:
        path = sim.device_path("echo")
        a = RawUser(path, chan)
        try:
            assert a.receive() == (KIND_PASS, b"")
            a.detach()
            wait_detached(path, chan)
            scribbler = Scribbler(a, seed=2)
            b = subprocess.Popen(
                [sys.executable, "-c", B_USER, str(chan), str(rounds)],
                env=kupd_env(sim),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                deadline = time.monotonic() + 240
                while b.poll() is None:
                    assert time.monotonic() < deadline, "B did not finish"
                    scribbler.once()
                    time.sleep(0.001)
                out, err = b.communicate(timeout=WAIT)
            finally:
                if b.poll() is None:
                    b.kill()
                    b.wait()
            assert b.returncode == 0, f"B failed:\n{out}\n{err}\n--- kupsim ---\n{sim.stderr()}"
            assert out.split() == ["ok", str(rounds)]
        finally:
            a.close()
        assert_no_protocol_errors(sim)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def memfd_descriptors(pid: int) -> int:
    """How many descriptors process pid holds of kup channel memfds."""
    n = 0
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}").startswith("/memfd:kup-"):
                n += 1
        except FileNotFoundError:
            continue
    return n


def wait_renewed(sim: KupSim, old_ino: int) -> None:
    """Wait until kupsim has finished renewing the channel whose memfd was
    old_ino.  A detach usually finds a module thread asleep on the channel
    (holding its lock), so the renewal runs a moment after INFO already
    says "detached", and while it runs kupsim holds the new objects' spare
    descriptors: reading the descriptor table then is not a leak.  Done
    means the old file is no longer mapped and there is one memfd
    descriptor per channel again (kupsim closes the new memfd's spare
    descriptor last, kupsim_glue.c)."""
    wait_until(
        lambda: old_ino not in memfd_inodes_mapped(sim.pid)
        and memfd_descriptors(sim.pid) == int(CHANNELS),
        "the channel's renewal to finish",
    )


def fd_table(pid: int) -> list[str]:
    """What process pid's descriptors are (for failure messages)."""
    out = []
    for name in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        try:
            out.append(f"{name} -> {os.readlink(f'/proc/{pid}/fd/{name}')}")
        except FileNotFoundError:
            continue
    return out


def test_attach_detach_cycles_do_not_leak(variant_out: Path) -> None:
    """1000 attach/detach cycles (each one renews the channel's objects):
    kupsim ends with as many descriptors and channel mappings as it began
    with, each attachment got a memfd other than the previous one's (held
    open here across the next attach, so its inode cannot be reused), and
    (variant_kupsim) ASan finds no leak at exit."""
    chan = 2
    with variant_kupsim(variant_out, "echo", env=echo_env()) as sim:
        path = sim.device_path("echo")
        # One connection asks INFO throughout: a probe connection closed just
        # before a count would still be open in kupsim until it sees the
        # close.  One cycle first: echo's threads exist from then on.
        probe = wire_connect(path)
        first = RawUser(path, chan)
        first.detach()  # its memfd stays open here: the inode stays unique
        wait_detached_on(probe, chan)
        wait_renewed(sim, first.inode())
        first.close()
        table_before = fd_table(sim.pid)
        maps_before = memfd_inodes_mapped(sim.pid)
        assert len(maps_before) == int(CHANNELS)
        prev: int | None = None
        for i in range(1000):
            with wire_connect(path) as s:
                st, fds, _msg = wire_attach(s, chan)
                assert st == E_OK and len(fds) == 3, (i, st, sim.stderr())
                if prev is not None:
                    assert os.fstat(fds[0]).st_ino != os.fstat(prev).st_ino, i
                    os.close(prev)
                prev = fds[0]
                for fd in fds[1:]:
                    os.close(fd)
        assert prev is not None
        wait_detached_on(probe, chan)
        wait_renewed(sim, os.fstat(prev).st_ino)
        os.close(prev)
        # a descriptor open for a moment does not leak: echo names each
        # worker thread it starts (glibc opens /proc/self/task/TID/comm for
        # that), so a count is taken again until it settles, or 10 s pass
        deadline = time.monotonic() + 10.0
        while len(table_after := fd_table(sim.pid)) != len(table_before):
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert len(table_after) == len(table_before), (
            sorted(set(table_before) - set(table_after)),
            sorted(set(table_after) - set(table_before)),
        )
        maps_after = memfd_inodes_mapped(sim.pid)
        assert len(maps_after) == int(CHANNELS)
        assert len(maps_after - maps_before) == 1  # only channel 2's was replaced
        probe.close()


def test_channel_not_handed_out_until_renewed(tmp_path: Path) -> None:
    """When kupsim cannot make the fresh objects (here: out of descriptors
    when the previous user leaves), the channel keeps objects the previous
    holder has, and kupsim must not hand them out: an ATTACH of it tries
    the renewal again and, while that still fails, is refused with
    KUP_E_SYS; once descriptors are free again the next ATTACH's renewal
    runs and it gets a fresh memfd.  The plain build (no sanitizer runtime
    that might open a descriptor of its own at the wrong moment), run with
    a small RLIMIT_NOFILE through a wrapper script."""
    limit = 48
    wrapper = tmp_path / "kupsim-nofile"
    real = kmod_out() / "kupsim"
    wrapper.write_text(
        f'#!/bin/sh\nulimit -Sn {limit} && ulimit -Hn {limit} || exit 99\nexec "{real}" "$@"\n'
    )
    wrapper.chmod(0o755)
    chan = 1
    env = {**os.environ, "KUP_PARAM_ECHO_CHANNELS": "2"}
    with kupsim("echo", binary=wrapper, env=env) as sim:
        path = sim.device_path("echo")
        probe = wire_connect(path)
        a = RawUser(path, chan)
        ino_a = a.inode()
        wire_info(probe)  # both connections accepted
        # every descriptor kupsim may have is taken by an idle connection
        fillers: list[socket.socket] = []
        while fd_count(sim.pid) < limit:
            for _ in range(limit - fd_count(sim.pid)):
                fillers.append(wire_connect(path))
            wait_until(lambda: fd_count(sim.pid) >= limit or len(fillers) > 2 * limit, "fill")
        assert fd_count(sim.pid) == limit
        a.detach()  # frees one descriptor; the renewal needs three
        wait_detached_on(probe, chan)
        wait_until(
            lambda: "fresh channel objects for the next attachment" in sim.stderr(),
            "kupsim to report the failed renewal",
        )
        # A's connection was the one descriptor freed: this one takes it,
        # and the renewal this ATTACH tries fails again
        with wire_connect(path) as s:
            st, fds, _msg = wire_attach(s, chan)
            assert (st, fds) == (E_SYS, [])
            log = sim.stderr()
            assert log.count("fresh channel objects for the next attachment") == 2, log
            for f in fillers[:8]:
                f.close()
            wait_until(lambda: fd_count(sim.pid) <= limit - 8, "kupsim to close 8 connections")
            st, fds, _msg = wire_attach(s, chan)  # renewed by this request
            assert st == E_OK and len(fds) == 3
            assert os.fstat(fds[0]).st_ino != ino_a
            assert ino_a not in memfd_inodes_mapped(sim.pid)
            for fd in fds:
                os.close(fd)
        log = sim.stderr()
        assert log.count("fresh channel objects for the next attachment") == 2, log
        for s in fillers[8:]:
            s.close()
        probe.close()
        a.close()
