"""Structured JSON logs (structlog) for kupd.

Every line is one JSON object on stderr with ``event``, ``level``,
``timestamp`` and whatever context is bound: ``device``, ``channel``,
``lease`` and ``request`` ids are bound with :func:`bind` (contextvars, so
they follow the asyncio task that serves a request).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

__all__ = ["bind", "configure", "get_logger"]

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure(level: str = "info", stream: Any = None) -> None:
    """Set up JSON logging at ``level`` to ``stream`` (default stderr)."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=True),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.WriteLoggerFactory(file=stream or sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str = "kupd") -> Any:
    """A bound structlog logger carrying ``logger=name``."""
    return structlog.get_logger().bind(logger=name)


def bind(**ids: Any) -> None:
    """Bind ids (device, channel, lease, request) to the current task's logs."""
    structlog.contextvars.bind_contextvars(**{k: v for k, v in ids.items() if v is not None})
