"""The core's C unit tests (tests/c/test_core.c): kmod/core/kup_core.c linked
with kupsim's glue, driven in-process, under ASan+UBSan and under TSan."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from kmod_util import assert_clean, sanitizer_env

__all__: list[str] = []


def _run_clean(variant_out: Path, name: str) -> subprocess.CompletedProcess[str]:
    """Run the C test ``name`` of a sanitizer build: it passed, and the
    sanitizers reported nothing."""
    proc = subprocess.run(
        ["nice", str(variant_out / name)],
        capture_output=True,
        text=True,
        timeout=240,
        env=sanitizer_env(),
        check=False,
    )
    assert proc.returncode == 0, f"{name} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    assert_clean(name, proc.stderr)
    return proc


def test_core_unit_on_reused_memory(variant_out: Path) -> None:
    """The same tests on the core built as the Linux and FreeBSD hosts run
    it (channel memory reused across attachments, cleared by the core):
    nothing a user wrote anywhere in its mapping reaches the next user."""
    proc = _run_clean(variant_out, "test_core_reuse")
    assert "ok reattach_clean" in proc.stdout
    assert "OK core" in proc.stdout


def test_core_unit(variant_out: Path) -> None:
    proc = _run_clean(variant_out, "test_core")
    # every section ran, every malformed descriptor was refused
    sections = (
        "create_args",
        "attach_rules",
        "turns",
        "proto",
        "proto_flood",
        "wait_timeout_kept",
        "sessions",
        "second_thread",
        "relay_no_deadlock",
        "left_message",
        "poll_no_spin",
        "shutdown",
        "disconnect",
        "wake",
        "receive_any",
        "receive_any_stress",
        "receive_any_herd",
        "holder_exits",
        "unload_with_waiters",
        "unload_twice",
        "misuse",
        "dropped_request",
        "param_rule",
    )
    for section in sections:
        assert f"ok {section}" in proc.stdout
    # 41 refusals on device "flood", the last after the 5 s window: at most
    # 10 lines per window, every refusal either logged or counted in a
    # "not logged" summary (logged before the next line that gets through)
    flood = [ln for ln in proc.stderr.splitlines() if ln.startswith("kup: flood")]
    logged = [ln for ln in flood if "protocol error from user: bad message kind" in ln]
    summaries = [
        int(m.group(1))
        for ln in flood
        if (
            m := re.fullmatch(
                r"kup: flood: (\d+) protocol-error lines not logged "
                r"\(rate limit\)",
                ln,
            )
        )
    ]
    assert summaries and len(logged) < 41, flood
    assert len(logged) + sum(summaries) == 41, flood
    assert len(flood) == len(logged) + len(summaries), flood
    assert proc.stdout.count("refused ") == 8
    err = proc.stderr.splitlines()
    # every re-entry of the holder (-EDEADLK) is logged (within the device's
    # misuse budget): a re-entrant pass or receive after a re-entrant send
    # too, and an unlock by a thread that did not receive is refused with a
    # line
    reentry = [
        ln
        for ln in err
        if ln.startswith("kup: turns: chan 0: ")
        and ln.endswith("call kupdev_unlock_channel first (-EDEADLK)")
    ]
    assert [ln.split()[4] for ln in reentry] == ["send", "pass", "receive", "receive", "send"], (
        reentry
    )
    assert (
        "kup: turns: chan 0: kupdev_unlock_channel: unlock without a receive by this thread"
    ) in err
    assert (
        "kup: turns: chan 0: kupdev_send: 4097 bytes do not fit the channel's 4096 "
        "(nothing sent)" in err
    )
    # a bad device name is shown (control characters as '?') with the reason
    assert (
        'kup: kupdev_create: bad device name "bad?name": a character outside '
        "[A-Za-z0-9_.-] (1..31 characters of [A-Za-z0-9_.-], not starting with '.')"
    ) in err
    assert 'kup: kupdev_create: bad device name "": empty' in proc.stderr
    # a second unload, and calls after unload, are refused from the registry
    # alone (ASan: no use after free) and named
    assert err.count("kup: kupdev_unload: not a live device (unloaded twice?)") == 2, err
    for op in ("kupdev_shutdown", "kupdev_announce", "kupdev_notify", "kupdev_wait_channel"):
        assert f"kup: {op}: not a live device (called after kupdev_unload?)" in err, op
    assert "kup: kupdev_unload: NULL device" in err
    assert "kup: kupdev_send: NULL device" in err
    # each misuse names the device, channel, call and value; normal
    # conditions (-EPIPE, -EAGAIN, -ETIMEDOUT) log nothing; 16 lines, then
    # one saying the rest of the window (10 s) is not logged
    misuse = [ln for ln in err if ln.startswith("kup: misuse: ")]
    expected = [
        "kupdev_wait_channel_timeout: timeout -2 ms (0 or more, or KUPDEV_FOREVER = -1)",
        "chan 0: kupdev_receive_msg: timeout -1000 ms (0 or more, or KUPDEV_FOREVER = -1)",
        "chan 0: kupdev_receive_msg: NULL msg",
        "kupdev_receive_msg: channel 5 out of range 0..1",
        "kupdev_send: channel -1 out of range 0..1",
        "chan 0: kupdev_send: NULL data with length 4",
        "chan 0: kupdev_send: 4097 bytes do not fit the channel's 4096 (nothing sent)",
        "kupdev_pass: channel 2 out of range 0..1",
        "kupdev_unlock_channel: channel 7 out of range 0..1",
        "kupdev_announce: count 3 beyond the 2 channels",
        "kupdev_announce: count 1 below the 2 already announced (it may only grow)",
        "kupdev_channel_attached: channel 2 out of range 0..1",
        *(
            f"chan 0: kupdev_send: {n} bytes do not fit the channel's 4096 (nothing sent)"
            for n in range(4097, 4101)
        ),
        "further misuse of the kupdev API is not logged for 10 s",
        # the next window: a count of the lines left out, then the new mistake
        "16 misuse lines not logged (rate limit)",
        "kupdev_pass: channel 9 out of range 0..1",
    ]
    assert misuse == [f"kup: misuse: {ln}" for ln in expected], misuse
    # a user message dropped by a second send is logged (the PASS is not)
    drop = [ln for ln in err if ln.startswith("kup: drop: ")]
    assert drop == [
        "kup: drop: chan 0: kupdev_send dropped the user's unread message "
        "(seq 1, 7 bytes): receive before sending again"
    ], drop
    # module parameters: a malformed value is named with what is wrong
    assert (
        'kup: module mod: parameter p (TEST) = "0x10" is not a decimal integer: '
        "using the default 77"
    ) in err
    assert (
        'kup: module mod: parameter p (TEST) = "-2147483649" is out of range '
        "(an int: -2147483648 to 2147483647): using the default 77"
    ) in err
    assert 'parameter p (TEST) = "bad?value" is not a decimal integer' in proc.stderr
    # kupdev_receive_any's misuse names what is wrong with the set
    any_lines = [ln for ln in err if ln.startswith("kup: any: ")]
    assert any_lines == [
        f"kup: any: {ln}"
        for ln in (
            "kupdev_receive_any: -1 channels (0..4, the device's)",
            "kupdev_receive_any: 5 channels (0..4, the device's)",
            "kupdev_receive_any: channel 1 twice (entry 1)",
            "kupdev_receive_any: channel 4 (entry 1) out of range 0..3",
            "kupdev_receive_any: NULL channel list",
            "kupdev_receive_any: NULL msg",
            "kupdev_receive_any: NULL chan_out",
            "kupdev_receive_any: timeout -2 ms (0 or more, or KUPDEV_FOREVER = -1)",
            "chan 1: receive_any while this thread holds the channel from its receive: "
            "call kupdev_unlock_channel first (-EDEADLK)",
        )
    ], any_lines
    assert "kup: kupdev_receive_any: NULL device" in err
    assert "kup: kupdev_wake_any: not a live device (called after kupdev_unload?)" in err
    assert proc.stdout.rstrip().endswith("OK core")
