"""Trial counts and sizes of a run.  Fixed numbers, printed with the results.

``full`` is what ``make bench`` runs (budget: well under 10 minutes on a
2-core machine); ``quick`` is a smoke run for development, never a result.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

__all__ = ["Config"]

KIB = 1024
MIB = 1024 * 1024


@dataclass(frozen=True)
class Config:
    trials: int = 10              # kept trials per figure
    warmup: int = 1               # discarded trials per figure, before the kept ones
    c_rounds: int = 5000          # round trips per trial, C programs (plus -w warm-up)
    c_warmup_rounds: int = 500    # in-program warm-up round trips (not printed)
    py_rounds: int = 2000         # round trips per trial, Python unix socket / channel layer
    grpc_rounds: int = 300        # round trips per trial, anything over gRPC
    pump_bytes: int = 16 * MIB    # payload bytes echoed per throughput trial (at least 4 msgs)
    chan_pump_bytes: int = 64 * MIB  # same for the channel layer / unix socket (faster)
    scale_total: int = 768        # round trips per scale trial, split over the clients
    scale_trials: int = 10        # kept trials per scale shape
    idle_seconds: int = 10        # CPU measured over this long (1 s samples)
    idle_sessions: int = 64       # idle Sessions during the CPU measurement
    idle_channels: int = 64       # idle attached channels (unary leases) during it
    wake_samples: int = 12        # wake-ups after 1 s idle
    wake_idle_s: float = 1.0
    memory_sessions: tuple[int, ...] = (1, 64, 1000)
    scale_clients: tuple[int, ...] = (1, 8, 64)
    call_clients: int = 256
    call_channels: int = 8
    stripe_sessions: tuple[int, ...] = (4, 8)  # a pump striped over this many Sessions
    seed: int = 0                 # the trial orders' shuffle (kupbench --seed; default: random)

    @staticmethod
    def quick() -> Config:
        return replace(
            Config(), trials=3, c_rounds=1000, py_rounds=500, grpc_rounds=50,
            pump_bytes=4 * MIB, chan_pump_bytes=8 * MIB, scale_total=256, scale_trials=2,
            idle_seconds=3, wake_samples=3, memory_sessions=(1, 64, 200),
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
