"""Helpers for the C tests of kmod/: build a sanitizer variant of kupsim,
libkup, the modules and the C test programs (``make -C kmod asan|tsan``),
run kupsim from that variant, and check sanitizer reports."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path

from kupd.testing import REPO_ROOT, KupSim, kupsim

__all__ = [
    "KMOD",
    "SANITIZER_MARKERS",
    "VARIANTS",
    "assert_clean",
    "build_variant",
    "sanitizer_env",
    "variant_kupsim",
]

KMOD = REPO_ROOT / "kmod"
VARIANTS = ("asan", "tsan")

#: text a sanitizer prints when it found something
SANITIZER_MARKERS = (
    "ERROR: AddressSanitizer",
    "ERROR: LeakSanitizer",
    "WARNING: ThreadSanitizer",
    "ThreadSanitizer: reported",
    "runtime error:",
)


def build_variant(variant: str) -> Path:
    """``make -C kmod <variant>``; returns the variant's output directory."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown sanitizer variant {variant!r}; expected one of {VARIANTS}")
    proc = subprocess.run(
        ["nice", "make", "-s", "-C", str(KMOD), variant],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(f"make -C kmod {variant} failed:\n{proc.stdout}\n{proc.stderr}")
    return KMOD / "out" / variant


def sanitizer_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment that makes every sanitizer report fatal and verbose."""
    env = dict(os.environ if base is None else base)
    env["ASAN_OPTIONS"] = "detect_leaks=1:halt_on_error=1:abort_on_error=0:exitcode=86"
    env["UBSAN_OPTIONS"] = "halt_on_error=1:print_stacktrace=1:exitcode=87"
    env["TSAN_OPTIONS"] = "halt_on_error=1:second_deadlock_stack=1:exitcode=88"
    env["KUP_BACKEND"] = "sim"
    return env


def assert_clean(what: str, text: str) -> None:
    """Fail if ``text`` (a program's stderr) contains a sanitizer report."""
    for marker in SANITIZER_MARKERS:
        if marker in text:
            raise AssertionError(f"{what}: sanitizer report ({marker!r}):\n{text}")


@contextlib.contextmanager
def variant_kupsim(
    out: Path, *modules: str, env: Mapping[str, str] | None = None
) -> Iterator[KupSim]:
    """kupsim of one sanitizer build with that build's modules; on a normal
    exit of the block it is stopped with SIGTERM, must exit 0 and must not
    have printed a sanitizer report."""
    with kupsim(
        *(str(out / f"{m}.so") for m in modules),
        binary=out / "kupsim",
        env=sanitizer_env(env),
        ready_timeout=60.0,
        stop_timeout=60.0,
    ) as sim:
        yield sim
        sim.stop(timeout=60.0)
        assert_clean("kupsim", sim.stderr())
