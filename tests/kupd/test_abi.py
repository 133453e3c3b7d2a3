"""kupd.abi must repeat kmod/include/kup_abi.h exactly.

A probe program is generated from the header's own list of ``#define``s,
compiled with the system C compiler against the real header, and run; every
number it prints (constants, struct sizes, field offsets, geometry macros)
is compared with the Python mirror.  The error classes of kupd.errors are
checked against the KUP_E_* codes and the seed's EKU_* names of kup.h.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from kupd import abi, errors

ROOT = Path(__file__).resolve().parents[2]
INCLUDE = ROOT / "kmod" / "include"
ABI_H = INCLUDE / "kup_abi.h"

# Object-like macros of the header that are not ABI values.
_NOT_VALUES = {"KUP_ABI_H"}

# struct fields whose offsetof the probe prints independently of the
# KUP_OFF_* macros (the macros are pinned by _Static_assert in the header,
# this checks the Python side against the compiler's layout as well).
_CTRL_FIELDS = {
    "magic": "KUP_OFF_MAGIC",
    "abi_version": "KUP_OFF_ABI_VERSION",
    "page_size": "KUP_OFF_PAGE_SIZE",
    "ctrl_size": "KUP_OFF_CTRL_SIZE",
    "k2u_off": "KUP_OFF_K2U_OFF",
    "k2u_size": "KUP_OFF_K2U_SIZE",
    "u2k_off": "KUP_OFF_U2K_OFF",
    "u2k_size": "KUP_OFF_U2K_SIZE",
    "chan_id": "KUP_OFF_CHAN_ID",
    "chan_count": "KUP_OFF_CHAN_COUNT",
    "turn": "KUP_OFF_TURN",
    "state": "KUP_OFF_STATE",
    "attach_gen": "KUP_OFF_ATTACH_GEN",
    "k2u": "KUP_OFF_K2U",
    "kernel_waiting": "KUP_OFF_KERNEL_WAITING",
    "u2k": "KUP_OFF_U2K",
    "user_waiting": "KUP_OFF_USER_WAITING",
}
_DESC_FIELDS = {"len": "KUP_DESC_OFF_LEN", "kind": "KUP_DESC_OFF_KIND", "seq": "KUP_DESC_OFF_SEQ"}

# (page, npages) pairs on which the geometry macros are evaluated.
_GEOMETRY = [(4096, 1), (4096, 3), (16384, 2), (4096, abi.KUP_MAX_PAGES)]


def _header_value_macros() -> list[str]:
    names = []
    for m in re.finditer(r"^#define\s+(KUP_[A-Z0-9_]+)(\(?)", ABI_H.read_text(), re.M):
        name, function_like = m.group(1), m.group(2)
        if function_like or name in _NOT_VALUES:
            continue
        names.append(name)
    return names


def _probe_source(names: list[str], seed_names: list[str]) -> str:
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        '#include "kup.h"',
        "#define P(n, v) printf(\"%s %llu\\n\", n, (unsigned long long)(v))",
        "int main(void) {",
    ]
    for n in names + seed_names:
        lines.append(f'    P("{n}", {n});')
    lines.append('    P("sizeof(struct kup_ctrl)", sizeof(struct kup_ctrl));')
    lines.append('    P("sizeof(struct kup_msg_desc)", sizeof(struct kup_msg_desc));')
    for f in _CTRL_FIELDS:
        lines.append(f'    P("offsetof(kup_ctrl.{f})", offsetof(struct kup_ctrl, {f}));')
    for f in _DESC_FIELDS:
        lines.append(f'    P("offsetof(kup_msg_desc.{f})", offsetof(struct kup_msg_desc, {f}));')
    for page, n in _GEOMETRY:
        for macro in ("KUP_CHAN_BYTES", "KUP_CHAN_U2K_OFF", "KUP_CHAN_DATA_SIZE"):
            lines.append(f'    P("{macro}({page},{n})", {macro}({page}, {n}));')
        lines.append(f'    P("KUP_CHAN_K2U_OFF({page})", KUP_CHAN_K2U_OFF({page}));')
    lines += ["    return 0;", "}", ""]
    return "\n".join(lines)


def _seed_names() -> list[str]:
    text = (INCLUDE / "kup.h").read_text()
    return re.findall(r"^#define\s+(EKU_[A-Z]+)\s", text, re.M)


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "no C compiler (cc/gcc) on PATH: needed to probe kup_abi.h"
    d = tmp_path_factory.mktemp("abi_probe")
    src = d / "probe.c"
    exe = d / "probe"
    src.write_text(_probe_source(_header_value_macros(), _seed_names()))
    cmd = [cc, "-std=c11", "-Wall", "-Wextra", "-Werror", "-I", str(INCLUDE)]
    build = subprocess.run(
        [*cmd, "-o", str(exe), str(src)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert build.returncode == 0, f"probe did not compile:\n{build.stderr}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=30, check=True)
    values: dict[str, int] = {}
    for line in run.stdout.splitlines():
        name, value = line.rsplit(" ", 1)
        values[name] = int(value)
    return values


def test_header_has_the_expected_macros() -> None:
    names = _header_value_macros()
    # A sanity floor so that a broken regex cannot make the next test vacuous.
    assert len(names) >= 45, names
    assert "KUP_MAGIC" in names and "KUP_E_SYS" in names and "KUP_OFF_USER_WAITING" in names


def test_every_header_constant_is_mirrored(probe: dict[str, int]) -> None:
    names = _header_value_macros()
    missing = [n for n in names if not hasattr(abi, n)]
    assert not missing, f"kupd.abi lacks {missing}"
    wrong = {n: (getattr(abi, n), probe[n]) for n in names if getattr(abi, n) != probe[n]}
    assert not wrong, f"kupd.abi differs from kup_abi.h (python, C): {wrong}"
    not_exported = [n for n in names if n not in abi.__all__]
    assert not not_exported, f"kupd.abi.__all__ lacks {not_exported}"


def test_struct_sizes(probe: dict[str, int]) -> None:
    assert probe["sizeof(struct kup_ctrl)"] == abi.KUP_CTRL_SIZE
    assert probe["sizeof(struct kup_msg_desc)"] == abi.KUP_DESC_SIZE


def test_field_offsets(probe: dict[str, int]) -> None:
    for field, name in _CTRL_FIELDS.items():
        assert probe[f"offsetof(kup_ctrl.{field})"] == getattr(abi, name), field
    for field, name in _DESC_FIELDS.items():
        assert probe[f"offsetof(kup_msg_desc.{field})"] == getattr(abi, name), field


def test_geometry_helpers(probe: dict[str, int]) -> None:
    for page, n in _GEOMETRY:
        assert probe[f"KUP_CHAN_BYTES({page},{n})"] == abi.chan_bytes(page, n)
        assert probe[f"KUP_CHAN_U2K_OFF({page},{n})"] == abi.chan_u2k_off(page, n)
        assert probe[f"KUP_CHAN_DATA_SIZE({page},{n})"] == abi.chan_data_size(page, n)
        assert probe[f"KUP_CHAN_K2U_OFF({page})"] == abi.chan_k2u_off(page)


def test_kind_enum_matches() -> None:
    assert {k.name: int(k) for k in abi.Kind} == {
        "DATA": abi.KUP_KIND_DATA,
        "PASS": abi.KUP_KIND_PASS,
        "CLOSE": abi.KUP_KIND_CLOSE,
    }


def test_error_codes_table(probe: dict[str, int]) -> None:
    header_codes = {n: probe[n] for n in _header_value_macros() if n.startswith("KUP_E_")}
    header_codes.pop("KUP_E_OK")
    assert abi.ERROR_CODES == header_codes


def test_error_classes_match_codes(probe: dict[str, int]) -> None:
    classes = [
        getattr(errors, n)
        for n in errors.__all__
        if isinstance(getattr(errors, n), type) and issubclass(getattr(errors, n), errors.KupError)
    ]
    with_code = [c for c in classes if c.code != 0]
    # Exactly one class per KUP_E_* code.
    by_code = {c.code: c for c in with_code}
    assert len(by_code) == len(with_code), "two error classes share a KUP_E_* code"
    assert set(by_code) == set(abi.ERROR_CODES.values())
    for cls in with_code:
        # The class names the seed's EKU_* macro, and kup.h gives it the same value.
        assert cls.seed_name in probe, f"{cls.__name__}.seed_name {cls.seed_name} not in kup.h"
        assert probe[cls.seed_name] == cls.code, cls.__name__
        made = errors.error_for_code(cls.code, "x")
        assert type(made) is cls and made.message == "x"
    # Policy-only errors carry no protocol code.
    assert errors.PermissionDenied.code == 0 and errors.ResourceExhausted.code == 0
    assert type(errors.error_for_code(99999, "?")) is errors.SystemFailure
