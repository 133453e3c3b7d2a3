"""placeholder"""
from __future__ import annotations

from .context import RunCtx

__all__ = ["run"]


async def run(ctx: RunCtx) -> None:
    return None
