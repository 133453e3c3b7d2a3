"""Python mirror of ``kmod/include/kup_abi.h`` (KUP shared-page ABI, version 1);
:mod:`kupd.abi` re-exports it.

Every constant, size and offset of the header is repeated here so that
Python code (tools, tests, the gateway's diagnostics) can name them without
parsing C.  The header stays the only *definition*: ``tests/kupd/test_abi.py``
compiles a probe program against it and checks every value below against
what the C compiler sees.  When the header changes, this file must change
with it, or that test fails.

Nothing here reads shared memory: the channel layer does that in C
(``kupd._kupchan``), where the fences of the turn protocol can be expressed.
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = [
    "ERROR_CODES",
    "KUP_ABI_VERSION",
    "KUP_CACHELINE",
    "KUP_CTRL_SIZE",
    "KUP_DESC_OFF_KIND",
    "KUP_DESC_OFF_LEN",
    "KUP_DESC_OFF_SEQ",
    "KUP_DESC_SIZE",
    "KUP_E_BUSY",
    "KUP_E_INVAL",
    "KUP_E_NOENT",
    "KUP_E_NOTREADY",
    "KUP_E_NOTTURN",
    "KUP_E_OK",
    "KUP_E_PEER",
    "KUP_E_PROTO",
    "KUP_E_RELEASING",
    "KUP_E_SHUTDOWN",
    "KUP_E_SYS",
    "KUP_E_TIMEDOUT",
    "KUP_E_TOOBIG",
    "KUP_E_VERSION",
    "KUP_INFO_ATTACHED",
    "KUP_INFO_MODULE_HOLDS",
    "KUP_KIND_CLOSE",
    "KUP_KIND_DATA",
    "KUP_KIND_PASS",
    "KUP_MAGIC",
    "KUP_MAX_CHANNELS",
    "KUP_MAX_PAGES",
    "KUP_NAME_MAX",
    "KUP_OFF_ABI_VERSION",
    "KUP_OFF_ATTACH_GEN",
    "KUP_OFF_CHAN_COUNT",
    "KUP_OFF_CHAN_ID",
    "KUP_OFF_CTRL_SIZE",
    "KUP_OFF_K2U",
    "KUP_OFF_K2U_OFF",
    "KUP_OFF_K2U_SIZE",
    "KUP_OFF_KERNEL_WAITING",
    "KUP_OFF_MAGIC",
    "KUP_OFF_PAGE_SIZE",
    "KUP_OFF_STATE",
    "KUP_OFF_TURN",
    "KUP_OFF_U2K",
    "KUP_OFF_U2K_OFF",
    "KUP_OFF_U2K_SIZE",
    "KUP_OFF_USER_WAITING",
    "KUP_STATE_ATTACHED",
    "KUP_STATE_PEER_GONE",
    "KUP_STATE_SHUTDOWN",
    "KUP_TURN_KERNEL",
    "KUP_TURN_USER",
    "Kind",
    "chan_bytes",
    "chan_data_size",
    "chan_k2u_off",
    "chan_u2k_off",
]

# --- identity ---------------------------------------------------------------
KUP_MAGIC: Final = 0x3150554B  # "KUP1" read as little-endian bytes
KUP_ABI_VERSION: Final = 1

KUP_CTRL_SIZE: Final = 256
KUP_CACHELINE: Final = 64

# --- ctrl->turn -------------------------------------------------------------
KUP_TURN_KERNEL: Final = 0x4B45524E  # "KERN"
KUP_TURN_USER: Final = 0x55534552  # "USER"

# --- message kinds (struct kup_msg_desc.kind) ---------------------------------
KUP_KIND_DATA: Final = 1
KUP_KIND_PASS: Final = 2
KUP_KIND_CLOSE: Final = 3

# --- ctrl->state bits (kernel-written) ----------------------------------------
KUP_STATE_ATTACHED: Final = 0x1
KUP_STATE_SHUTDOWN: Final = 0x2
KUP_STATE_PEER_GONE: Final = 0x4

# --- error codes (libkup, kupsim wire replies, kupd.errors) -------------------
KUP_E_OK: Final = 0
KUP_E_SHUTDOWN: Final = 1001
KUP_E_NOTREADY: Final = 1002
KUP_E_NOTTURN: Final = 1003
KUP_E_TOOBIG: Final = 1004
KUP_E_TIMEDOUT: Final = 1005
KUP_E_PROTO: Final = 1006
KUP_E_VERSION: Final = 1007
KUP_E_BUSY: Final = 1008
KUP_E_NOENT: Final = 1009
KUP_E_PEER: Final = 1010
KUP_E_INVAL: Final = 1011
KUP_E_SYS: Final = 1012
KUP_E_RELEASING: Final = 1013

#: Every KUP_E_* name (except OK) and its value, for tables and tests.
ERROR_CODES: Final[dict[str, int]] = {
    "KUP_E_SHUTDOWN": KUP_E_SHUTDOWN,
    "KUP_E_NOTREADY": KUP_E_NOTREADY,
    "KUP_E_NOTTURN": KUP_E_NOTTURN,
    "KUP_E_TOOBIG": KUP_E_TOOBIG,
    "KUP_E_TIMEDOUT": KUP_E_TIMEDOUT,
    "KUP_E_PROTO": KUP_E_PROTO,
    "KUP_E_VERSION": KUP_E_VERSION,
    "KUP_E_BUSY": KUP_E_BUSY,
    "KUP_E_NOENT": KUP_E_NOENT,
    "KUP_E_PEER": KUP_E_PEER,
    "KUP_E_INVAL": KUP_E_INVAL,
    "KUP_E_SYS": KUP_E_SYS,
    "KUP_E_RELEASING": KUP_E_RELEASING,
}

# --- struct kup_msg_desc --------------------------------------------------------
KUP_DESC_OFF_LEN: Final = 0
KUP_DESC_OFF_KIND: Final = 4
KUP_DESC_OFF_SEQ: Final = 8
KUP_DESC_SIZE: Final = 16

# --- struct kup_ctrl offsets ------------------------------------------------------
KUP_OFF_MAGIC: Final = 0
KUP_OFF_ABI_VERSION: Final = 4
KUP_OFF_PAGE_SIZE: Final = 8
KUP_OFF_CTRL_SIZE: Final = 12
KUP_OFF_K2U_OFF: Final = 16
KUP_OFF_K2U_SIZE: Final = 20
KUP_OFF_U2K_OFF: Final = 24
KUP_OFF_U2K_SIZE: Final = 28
KUP_OFF_CHAN_ID: Final = 32
KUP_OFF_CHAN_COUNT: Final = 36
KUP_OFF_TURN: Final = 64
KUP_OFF_STATE: Final = 68
KUP_OFF_ATTACH_GEN: Final = 72
KUP_OFF_K2U: Final = 128
KUP_OFF_KERNEL_WAITING: Final = 144
KUP_OFF_U2K: Final = 192
KUP_OFF_USER_WAITING: Final = 208

# --- limits the hosts enforce on kupdev_create() ----------------------------------
KUP_MAX_CHANNELS: Final = 1024
KUP_MAX_PAGES: Final = 1024
KUP_NAME_MAX: Final = 32  # including the NUL

# bits of a channel's byte in a device's INFO (kup_ioctl.h says what each means)
KUP_INFO_ATTACHED: Final = 0x01  # a user side holds the channel
KUP_INFO_MODULE_HOLDS: Final = 0x02  # a module thread holds it locked


class Kind(enum.IntEnum):
    """The kind of a message: what a hand-over of the turn carries."""

    DATA = KUP_KIND_DATA
    PASS = KUP_KIND_PASS
    CLOSE = KUP_KIND_CLOSE


# --- geometry helpers (KUP_CHAN_* macros) -------------------------------------------
def chan_k2u_off(page: int) -> int:
    """Offset of the kernel->user data area (``KUP_CHAN_K2U_OFF``)."""
    return page


def chan_u2k_off(page: int, npages: int) -> int:
    """Offset of the user->kernel data area (``KUP_CHAN_U2K_OFF``)."""
    return page * (1 + npages)


def chan_bytes(page: int, npages: int) -> int:
    """Bytes of one channel mapping (``KUP_CHAN_BYTES``)."""
    return page * (1 + 2 * npages)


def chan_data_size(page: int, npages: int) -> int:
    """Bytes of one direction's data area (``KUP_CHAN_DATA_SIZE``)."""
    return page * npages
