"""Clients after fork(): gRPC's channels do not survive it (the child's
operations hung), so every live client is marked in the child and its
operations, and its channels', fail at once with InvalidArgument naming it.

The clients register here (a WeakSet, so a client is not kept alive); the
hook runs in the child only.  The cost on an operation is the flag check it
does anyway (``_closed``): the hook sets it, and the error tells why.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from typing import Protocol

__all__ = ["at_fork_in_child", "track"]


class _Forkable(Protocol):
    def _after_fork(self) -> None: ...


_LIVE: weakref.WeakSet[_Forkable] = weakref.WeakSet()
_HOOKS: list[Callable[[], None]] = []


def track(client: _Forkable) -> None:
    """Mark ``client`` unusable in a child process forked later."""
    _LIVE.add(client)


def at_fork_in_child(hook: Callable[[], None]) -> None:
    """Run ``hook()`` in the child after a fork (module state to reset)."""
    _HOOKS.append(hook)


def _after_fork_in_child() -> None:
    for client in list(_LIVE):
        try:
            client._after_fork()
        except Exception:  # never let one client break the child's fork
            pass
    for hook in _HOOKS:
        try:
            hook()
        except Exception:
            pass


os.register_at_fork(after_in_child=_after_fork_in_child)
