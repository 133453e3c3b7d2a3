"""Model-check the KUP turn protocol (kmod/include/kup_turn.pml) with SPIN.

For every configuration the model is translated with ``spin -a``, the
verifier ``pan`` is compiled with gcc and run in a temporary directory.

* Correct configurations must verify with ``errors: 0``: assertions
  (mutual exclusion on the data areas, sequence numbers 1, 2, 3, ...,
  payload belongs to its descriptor, nobody touches data after the peer is
  gone), invalid end states (nobody asleep forever) and the LTL formulas
  (every hand-over is received, every process ends) under weak fairness.
  The statements tagged ``@reach:<name>`` in the model that a configuration
  is meant to exercise must actually be reached, so a model that silently
  stops sleeping, waking or dying cannot pass.
* Deliberately broken variants (a missing fence on either side, a wake-up
  object that drops early wake-ups, a missing release, a shutdown or detach
  that forgets to wake, a re-attach page reset without the channel lock, a
  kernel that ignores the attach generation, poll mode without the self
  wake-up or with a late drain) must be REPORTED by SPIN, with the kind of
  error the bug causes; for lost wake-ups the counter-example is replayed
  and must end with a side asleep.  If the model stops being able to see
  these bugs, these tests fail.
* The model's constants must match kmod/include/kup_abi.h, and the
  header's protocol comment must still say what the model encodes.

A missing spin or gcc is a failure (install with scripts/setup-apt.sh),
never a skip.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

__all__: list[str] = []

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "kmod" / "include" / "kup_turn.pml"
HEADER = ROOT / "kmod" / "include" / "kup_abi.h"
MODEL_NAME = MODEL.name

DEPTH = "-m200000"  # search depth bound; "too small" in the output is a failure
HASH = "-w22"  # 4M-slot hash table: the largest run stores ~1.5M states
LTL_NAMES = ("mutex", "k2u_recv", "u2k_recv", "terminate")
SETUP_HINT = "run scripts/setup-apt.sh (or `make setup`) to install it"


# ---------------------------------------------------------------------------
# tools


def _require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` not found on PATH: {SETUP_HINT}", pytrace=False)
    return path


@pytest.fixture(scope="session")
def tools() -> tuple[str, str]:
    return _require_tool("spin"), _require_tool("gcc")


@dataclass
class PanResult:
    """The output of one pan run, with the facts the tests look at."""

    argv: list[str]
    output: str
    workdir: Path
    defines: tuple[str, ...]
    # proctype -> {(model line, pan state)} reported unreached
    unreached: dict[str, set[tuple[int, int]]] = field(default_factory=dict)

    @property
    def errors(self) -> int:
        m = re.search(r"errors: (\d+)", self.output)
        if m is None:
            raise AssertionError(f"no 'errors:' line in pan output:\n{self.output}")
        return int(m.group(1))

    def describe(self) -> str:
        return (
            f"defines={' '.join(self.defines) or '(none)'} argv={' '.join(self.argv)}\n"
            + (self.output[-4000:])
        )


def _run(argv: list[str], cwd: Path, timeout: float = 240.0) -> str:
    proc = subprocess.run(
        ["nice", "-n", "10", *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    out = proc.stdout + proc.stderr
    if proc.returncode != 0 and argv[0] != "./pan":
        raise AssertionError(f"{' '.join(argv)} failed (exit {proc.returncode}) in {cwd}:\n{out}")
    return out


def _parse_unreached(output: str) -> dict[str, set[tuple[int, int]]]:
    """proctype -> (line, state) pairs pan reports as unreached."""
    result: dict[str, set[tuple[int, int]]] = {}
    current: str | None = None
    for line in output.splitlines():
        m = re.match(r"unreached in (?:proctype|claim) (\S+)", line)
        if m:
            current = m.group(1)
            result.setdefault(current, set())
            continue
        if current is not None:
            m = re.match(rf"\s+{re.escape(MODEL_NAME)}:(\d+), state (\d+),", line)
            if m:
                result[current].add((int(m.group(1)), int(m.group(2))))
    return result


def _parse_machines(output: str) -> dict[str, dict[int, set[int]]]:
    """From `pan -d`: proctype -> model line -> the states whose transitions
    come from that line (an inline used n times gives n states per line)."""
    result: dict[str, dict[int, set[int]]] = {}
    current: dict[int, set[int]] | None = None
    for line in output.splitlines():
        m = re.match(r"(?:proctype|claim) (\S+)", line)
        if m:
            current = result.setdefault(m.group(1), {})
            continue
        m = re.match(rf"\s+state\s+(\d+) -\(tr\s+\d+\)->.*\s{re.escape(MODEL_NAME)}:(\d+) =>", line)
        if m and current is not None:
            current.setdefault(int(m.group(2)), set()).add(int(m.group(1)))
    return result


class PanBuilder:
    """Build one pan per (defines, mode) once per session and run it."""

    def __init__(self, base: Path, spin: str, gcc: str) -> None:
        self._base = base
        self._spin = spin
        self._gcc = gcc
        self._built: dict[tuple[tuple[str, ...], bool], Path] = {}

    def build(self, defines: tuple[str, ...], safety: bool) -> Path:
        key = (defines, safety)
        if key in self._built:
            return self._built[key]
        name = ("safety" if safety else "ltl") + "".join(
            "_" + d.lstrip("-D").replace("=", "") for d in defines
        )
        work = self._base / name
        work.mkdir()
        shutil.copy(MODEL, work / MODEL_NAME)
        out = _run([self._spin, *defines, "-a", MODEL_NAME], work)
        if re.search(r"error", out, re.IGNORECASE) or not (work / "pan.c").exists():
            raise AssertionError(f"spin -a {' '.join(defines)} rejected the model:\n{out}")
        # pan.c takes ~6x longer to compile with -O2 than with -O0, and
        # most runs here are small: optimise only the big liveness runs.
        opt = "-O2" if (not safety and "-DSHUTDOWN" in defines) else "-O0"
        cflags = [opt, "-DSAFETY", "-DNOCLAIM"] if safety else [opt, "-DNFAIR=3"]
        _run([self._gcc, *cflags, "-o", "pan", "pan.c"], work)
        self._built[key] = work
        return work

    def safety(self, defines: tuple[str, ...]) -> PanResult:
        work = self.build(defines, safety=True)
        argv = ["./pan", DEPTH, HASH]
        out = _run(argv, work)
        return PanResult(argv, out, work, defines, _parse_unreached(out))

    def machines(self, res: PanResult) -> dict[str, dict[int, set[int]]]:
        """The state machines of the pan that produced `res` (pan -d)."""
        return _parse_machines(_run(["./pan", "-d"], res.workdir))

    def ltl(self, defines: tuple[str, ...], formula: str) -> PanResult:
        if formula == "mutex":
            # without the model's exclusion asserts: the formula alone must
            # judge (the asserts are checked by the safety runs)
            defines = (*defines, "-DNO_CS_ASSERT")
        work = self.build(defines, safety=False)
        argv = ["./pan", "-a", "-f", "-N", formula, DEPTH, HASH]
        out = _run(argv, work)
        return PanResult(argv, out, work, defines, _parse_unreached(out))

    def replay(self, res: PanResult) -> str:
        """Replay the counter-example of a failed run (spin -t)."""
        assert (res.workdir / f"{MODEL_NAME}.trail").exists(), res.describe()
        return _run([self._spin, *res.defines, "-t", "-p", MODEL_NAME], res.workdir)


@pytest.fixture(scope="session")
def pan(tools: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[PanBuilder]:
    spin, gcc = tools
    yield PanBuilder(tmp_path_factory.mktemp("spin"), spin, gcc)


# ---------------------------------------------------------------------------
# the model's @reach tags


def _reach_tags() -> dict[str, int]:
    tags: dict[str, int] = {}
    for lineno, line in enumerate(MODEL.read_text().splitlines(), start=1):
        for tag in re.findall(r"@reach:(\w+)", line):
            assert tag not in tags, f"@reach:{tag} appears twice in {MODEL_NAME}"
            tags[tag] = lineno
    return tags


def _sleep_lines() -> set[int]:
    tags = _reach_tags()
    return {tags["ksleep"], tags["usleep"], tags["upoll"]}


def assert_verified(res: PanResult) -> None:
    out = res.output
    assert "Full statespace search" in out, res.describe()
    assert res.errors == 0, "SPIN found an error:\n" + res.describe()
    for bad in (
        "assertion violated",
        "invalid end state (",
        "acceptance cycle (",
        "max search depth too small",
        "pan: error",
        "out of memory",
    ):
        assert bad not in out, f"{bad!r} in pan output:\n" + res.describe()


def assert_reached(
    res: PanResult, machines: dict[str, dict[int, set[int]]], reach: dict[str, tuple[str, ...]]
) -> None:
    """Every statement tagged @reach:<name> is executed by the named proctype
    in at least one of its copies (inlines are expanded once per use)."""
    tags = _reach_tags()
    for proc, names in reach.items():
        assert proc in machines, f"no proctype {proc} in this configuration"
        assert proc in res.unreached, f"no unreached report for {proc}:\n" + res.describe()
        for name in names:
            line = tags[name]
            copies = machines[proc].get(line, set())
            assert copies, f"@reach:{name} (line {line}) is not part of {proc} here"
            dead = {st for (ln, st) in res.unreached[proc] if ln == line}
            assert copies - dead, (
                f"@reach:{name} (line {line}) never executed by {proc}: "
                "the check is vacuous\n" + res.describe()
            )


def assert_found(res: PanResult, kind: str) -> None:
    """SPIN reported the seeded bug; `kind` is a regex for the report line."""
    assert res.errors >= 1, "SPIN did NOT find the seeded bug:\n" + res.describe()
    assert re.search(kind, res.output), f"expected /{kind}/:\n" + res.describe()


# ---------------------------------------------------------------------------
# correct configurations

BASE: tuple[str, ...] = ()
DEATH = ("-DDEATH", "-DREATTACH")
SHUTDOWN = ("-DSHUTDOWN",)
BOTH = ("-DDEATH", "-DREATTACH", "-DSHUTDOWN")
POLL = ("-DPOLL_MODE",)
DISCONNECT = ("-DDISCONNECT",)

KERNEL_HS = ("wake", "krecheck", "ksleep", "krx_wait")
USER_HS = ("wake", "urecheck", "usleep")

SAFETY_CASES: dict[str, tuple[tuple[str, ...], dict[str, tuple[str, ...]]]] = {
    "base": (BASE, {"Kernel": (*KERNEL_HS, "close", "left_msg"), "User": USER_HS}),
    "deeper": (("-DNMSG=4", "-DSPINS=2"), {"Kernel": (*KERNEL_HS, "close"), "User": USER_HS}),
    "no_spin": (("-DSPINS=0",), {"Kernel": KERNEL_HS, "User": USER_HS}),
    "anykind": (("-DANYKIND",), {"Kernel": KERNEL_HS, "User": USER_HS}),
    # ksleep/usleep lines then hold both the wake-up and the early return
    "spurious": (("-DSPURIOUS",), {"Kernel": ("ksleep",), "User": ("usleep",)}),
    "reattach": (
        ("-DREATTACH",),
        {
            "Kernel": ("enter_peer", "left_msg"),
            "Attach": ("attach_reset", "attach_gave_up"),
        },
    ),
    "death": (
        DEATH,
        {
            "Kernel": ("ksleep", "enter_peer"),
            "User": ("death", "usleep"),
            "Host": ("wake",),
            "Attach": ("attach_reset", "attach_gave_up"),
        },
    ),
    "shutdown": (
        SHUTDOWN,
        {
            "Kernel": ("ksleep", "enter_shutdown"),
            "User": ("usleep", "user_wait_stop", "user_send_shutdown"),
            "Unload": ("wake",),
        },
    ),
    "poll_mode": (POLL, {"Kernel": (*KERNEL_HS, "close"), "User": ("self_wake", "upoll")}),
    "poll_quiet": (
        (*POLL, "-DQUIET_SPIN"),
        {
            "Kernel": (*KERNEL_HS, "close"),
            "User": ("self_wake", "upoll", "quiet_hit", "quiet_late", "quiet_miss"),
        },
    ),
    "poll_mode_death": (
        (*POLL, *DEATH),
        {"Kernel": ("ksleep", "enter_peer"), "User": ("death", "upoll")},
    ),
    "poll_mode_shutdown": (
        (*POLL, *SHUTDOWN),
        {"Kernel": ("enter_shutdown",), "User": ("upoll", "user_wait_stop", "user_send_shutdown")},
    ),
    "disconnect": (
        DISCONNECT,
        {
            "Kernel": ("ksleep", "enter_peer"),
            "User": ("usleep", "user_wait_stop"),
            "Disconnect": ("disconnect", "wake"),
        },
    ),
    "poll_mode_disconnect": (
        (*POLL, *DISCONNECT),
        {"Kernel": ("enter_peer",), "User": ("upoll", "user_wait_stop")},
    ),
    "disconnect_reattach": (
        (*DISCONNECT, "-DREATTACH"),
        {"Kernel": ("enter_peer",), "Attach": ("attach_reset",)},
    ),
    "death_and_shutdown": (
        BOTH,
        {
            "Kernel": ("enter_peer", "enter_shutdown"),
            "User": ("death", "user_wait_stop", "user_send_shutdown"),
            "Attach": ("attach_reset",),
        },
    ),
}


@pytest.mark.parametrize("case", sorted(SAFETY_CASES))
def test_safety(pan: PanBuilder, case: str) -> None:
    """Assertions + invalid end states, exhaustively, with reachability."""
    defines, reach = SAFETY_CASES[case]
    res = pan.safety(defines)
    assert_verified(res)
    assert_reached(res, pan.machines(res), reach)


LTL_CASES: list[tuple[str, tuple[str, ...], str]] = [
    *(("base", BASE, f) for f in LTL_NAMES),
    *(("death", DEATH, f) for f in ("k2u_recv", "u2k_recv", "terminate")),
    *(("shutdown", SHUTDOWN, f) for f in ("k2u_recv", "u2k_recv", "terminate")),
    ("spurious", ("-DSPURIOUS",), "terminate"),
    *(("poll_mode", POLL, f) for f in ("k2u_recv", "u2k_recv", "terminate")),
    ("poll_mode_shutdown", (*POLL, *SHUTDOWN), "terminate"),
    *(("disconnect", DISCONNECT, f) for f in ("k2u_recv", "u2k_recv", "terminate")),
    ("poll_mode_disconnect", (*POLL, *DISCONNECT), "terminate"),
    *(("poll_quiet", (*POLL, "-DQUIET_SPIN"), f) for f in ("k2u_recv", "u2k_recv", "terminate")),
    # NMSG=2 (one full round, then CLOSE) keeps this, the largest run, short
    ("death_and_shutdown", (*BOTH, "-DNMSG=2"), "terminate"),
]


@pytest.mark.parametrize(
    ("case", "defines", "formula"), LTL_CASES, ids=[f"{c}-{f}" for c, _, f in LTL_CASES]
)
def test_ltl(pan: PanBuilder, case: str, defines: tuple[str, ...], formula: str) -> None:
    """LTL liveness (and mutex) under weak fairness: no acceptance cycle."""
    res = pan.ltl(defines, formula)
    assert f"ltl formula {formula}" in res.output, res.describe()
    assert "fairness enabled" in res.output, res.describe()
    assert_verified(res)


# ---------------------------------------------------------------------------
# broken variants: SPIN must find the bug


def _asleep_at_end(trail: str) -> list[str]:
    """Processes the replayed counter-example leaves blocked in a sleep."""
    sleeps = _sleep_lines()
    stuck = []
    for m in re.finditer(
        rf"proc\s+\d+ \((Kernel|User):\d+\) {re.escape(MODEL_NAME)}:(\d+) \(state \d+\)$",
        trail,
        re.MULTILINE,
    ):
        if int(m.group(2)) in sleeps:
            stuck.append(m.group(1))
    return stuck


LOST_WAKEUP_CASES: dict[str, tuple[str, ...]] = {
    "waiter_no_fence": ("-DBROKEN_WAITER_NO_FENCE",),
    "passer_no_fence": ("-DBROKEN_PASSER_NO_FENCE",),
    "early_wake_lost": ("-DBROKEN_EARLY_WAKE_LOST",),
    "shutdown_no_wake": ("-DSHUTDOWN", "-DBROKEN_SHUTDOWN_NO_WAKE"),
    "detach_no_wake": ("-DDEATH", "-DBROKEN_DETACH_NO_WAKE"),
    "disconnect_no_wake": (*DISCONNECT, "-DBROKEN_DISCONNECT_NO_WAKE"),
    "poll_no_self_wake": (*POLL, "-DBROKEN_POLL_NO_SELF_WAKE"),
    "poll_late_drain": (*POLL, "-DBROKEN_POLL_LATE_DRAIN"),
    "quiet_no_unquiet": (*POLL, "-DQUIET_SPIN", "-DBROKEN_QUIET_NO_UNQUIET"),
}


@pytest.mark.parametrize("case", sorted(LOST_WAKEUP_CASES))
def test_broken_lost_wakeup_found(pan: PanBuilder, case: str) -> None:
    """The safety run reports an invalid end state: a side asleep forever."""
    res = pan.safety(LOST_WAKEUP_CASES[case])
    assert_found(res, r"invalid end state \(")
    trail = pan.replay(res)
    assert _asleep_at_end(trail), "counter-example does not end with a sleeper:\n" + trail[-3000:]


@pytest.mark.parametrize("case", ["waiter_no_fence", "passer_no_fence"])
def test_broken_fence_violates_liveness(pan: PanBuilder, case: str) -> None:
    """The same bug seen by the LTL check: the run never ends."""
    res = pan.ltl(LOST_WAKEUP_CASES[case], "terminate")
    assert_found(res, r"acceptance cycle \(")


@pytest.mark.parametrize(
    ("case", "defines", "report"),
    [
        # the receiver enters the data area while the sender still writes
        ("no_release", ("-DBROKEN_NO_RELEASE",), r"assertion violated\s+!\((u|k)_cs\)"),
        # a new attachment resets the page under a kernel caller of the old one
        (
            "attach_no_lock",
            ("-DDEATH", "-DREATTACH", "-DBROKEN_ATTACH_NO_LOCK"),
            r"assertion violated\s+\(attach_gen==1\)",
        ),
        # without the generation, the kernel takes the new page for its own
        (
            "no_gen_check",
            ("-DREATTACH", "-DBROKEN_NO_GEN_CHECK"),
            r"assertion violated\s+\(attach_gen==1\)",
        ),
        # taking what the departed user left from a page reset for the next
        # user: the kernel reads the new attachment's page
        (
            "left_ignores_reset",
            ("-DREATTACH", "-DBROKEN_LEFT_IGNORES_RESET"),
            r"assertion violated\s+\(attach_gen==1\)",
        ),
    ],
)
def test_broken_exclusion_found(
    pan: PanBuilder, case: str, defines: tuple[str, ...], report: str
) -> None:
    """A missing release lets both sides into the data areas; an unlocked
    page reset or a missing generation check lets the kernel touch the page
    of an attachment that is not its own (data after the peer is gone)."""
    res = pan.safety(defines)
    assert_found(res, report)


def test_broken_no_release_violates_mutex_ltl(pan: PanBuilder) -> None:
    """The LTL formula alone (exclusion asserts compiled out) sees the overlap.
    A violated safety formula shows up as the never claim's own assert."""
    res = pan.ltl(("-DBROKEN_NO_RELEASE",), "mutex")
    assert "-DNO_CS_ASSERT" in res.defines
    assert_found(res, r"assertion violated .*k_cs&&u_cs")


# ---------------------------------------------------------------------------
# the model and the header stay in step


def _defines(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, value in re.findall(
        r"^#define\s+(KUP_\w+)\s+(0[xX][0-9a-fA-F]+|\d+)U?\b", text, re.MULTILINE
    ):
        out[name] = int(value, 0)
    return out


REQUIRED_NAMES = (
    "KUP_ABI_VERSION",
    "KUP_TURN_KERNEL",
    "KUP_TURN_USER",
    "KUP_KIND_DATA",
    "KUP_KIND_PASS",
    "KUP_KIND_CLOSE",
    "KUP_STATE_ATTACHED",
    "KUP_STATE_SHUTDOWN",
    "KUP_STATE_PEER_GONE",
)


def test_model_constants_match_header() -> None:
    header = _defines(HEADER.read_text())
    model = _defines(MODEL.read_text())
    for name in REQUIRED_NAMES:
        assert name in model, f"{MODEL_NAME} no longer models {name}"
    for name, value in model.items():
        assert name in header, f"{MODEL_NAME} uses {name}, which kup_abi.h does not define"
        assert header[name] == value, (
            f"{name}: kup_abi.h says {header[name]:#x}, {MODEL_NAME} says {value:#x}"
        )


def test_model_names_the_header_version_it_mirrors() -> None:
    text = MODEL.read_text()
    m = re.search(r"MIRRORS: kup_abi\.h, KUP_ABI_VERSION (\d+)", text[:3000])
    assert m, f"{MODEL_NAME} must say at its top which kup_abi.h version it mirrors"
    assert int(m.group(1)) == _defines(HEADER.read_text())["KUP_ABI_VERSION"], (
        "kup_abi.h changed KUP_ABI_VERSION: re-check the model and update its MIRRORS line"
    )


def test_header_still_documents_the_modelled_handshake() -> None:
    """The phrases of the protocol comment the model encodes.  If the header
    changes the protocol, this fails until the model is looked at again."""
    raw = HEADER.read_text()
    # the comment as running text: no " * " line prefixes, single spaces
    text = " ".join(re.sub(r"^\s*\*\s?", "", ln) for ln in raw.splitlines())
    text = re.sub(r"\s+", " ", text)
    for phrase in (
        "kup_turn.pml",
        "STORE-RELEASE of ctrl->turn",
        "LOAD-ACQUIRE",
        "STORE my_waiting = 1",
        "FULL FENCE (seq_cst)",
        "if LOAD peer_waiting != 0",
        "are counting",
        "unconditional wake-up of the user side",
        "sends CLOSE if it holds the turn",
        "waking kernel-side waiters with an error",
        "seq == last seq seen in that direction + 1",
    ):
        assert phrase in text, f"kup_abi.h no longer says {phrase!r}: re-check {MODEL_NAME}"
    for field_name in ("turn", "state", "kernel_waiting", "user_waiting", "k2u", "u2k"):
        assert re.search(rf"\b{field_name};", raw), f"struct kup_ctrl lost field {field_name}"
