"""Section titles of the results table (sorted by their leading number)."""

from __future__ import annotations

__all__ = ["S_CHAN", "S_E2E", "S_FLOOR", "S_IDLE", "S_MEM", "S_SCALE", "S_SYSCALL", "S_TRANSPORT"]

S_FLOOR = "1 floor: C libkup <-> kupsim echo"
S_SYSCALL = "2 syscall alternative: unix socket"
S_CHAN = "3 channel layer: Python <-> kupsim echo"
S_TRANSPORT = "4 transport floor: bare grpc.aio echo"
S_E2E = "5 kupd end to end"
S_SCALE = "6 scale"
S_IDLE = "7 idle cost"
S_MEM = "8 memory"
