"""Structured JSON logs (structlog) for kupd.

Every line is one JSON object on stderr with ``event``, ``level``,
``timestamp`` and whatever context is bound: ``device``, ``channel``,
``lease`` and ``request`` ids are bound with :func:`bind` (contextvars, so
they follow the asyncio task that serves a request).

:func:`set_level` changes the level of a running kupd (a config reload):
the loggers :func:`get_logger` hands out are small proxies that re-bind
their structlog logger when the configuration changed, because a bound
structlog logger keeps the level filter it was made with.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

__all__ = ["bind", "configure", "get_logger", "set_level"]

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class _Sink:
    """The log stream, written so that logging never raises.  Why: kupd logs
    to stderr, usually a pipe to a supervisor or a log reader; when that
    reader goes away, every write raises BrokenPipeError in whatever kupd
    was doing -- kupd died on the next line, and a drain that logged into
    the closed pipe never finished.  Lines that cannot be written are
    dropped (there is nowhere left to say so); serving goes on."""

    __slots__ = ("__weakref__", "stream")  # structlog keeps a lock per file

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        try:
            self.stream.write(text)
        except (OSError, ValueError):  # ValueError: the stream was closed
            pass

    def flush(self) -> None:
        try:
            self.stream.flush()
        except (OSError, ValueError):
            pass


#: Bumped by every configure(): proxies re-bind when it moved.
_generation = 0
_stream: Any = None


def configure(level: str = "info", stream: Any = None) -> None:
    """Set up JSON logging at ``level`` to ``stream`` (default stderr)."""
    global _generation, _stream
    if level not in _LEVELS:
        raise ValueError(f"log level must be one of {', '.join(_LEVELS)}, not {level!r}")
    _stream = stream
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=True),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.WriteLoggerFactory(file=_Sink(stream or sys.stderr)),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
    _generation += 1


def set_level(level: str) -> None:
    """Log at ``level`` from now on, to the same stream; every logger from
    :func:`get_logger` follows, including module-level ones."""
    configure(level, _stream)


class _Logger:
    """A structlog logger for ``logger=name`` that follows :func:`configure`."""

    __slots__ = ("_bound", "_ctx", "_gen")

    def __init__(self, ctx: dict[str, Any]) -> None:
        self._ctx = ctx
        self._gen = -1
        self._bound: Any = None

    def __getattr__(self, attr: str) -> Any:  # info, debug, warning, error, ...
        if self._gen != _generation:
            self._bound = structlog.get_logger().bind(**self._ctx)
            self._gen = _generation
        return getattr(self._bound, attr)

    def bind(self, **values: Any) -> _Logger:
        return _Logger({**self._ctx, **values})


def get_logger(name: str = "kupd") -> Any:
    """A structlog logger carrying ``logger=name`` (at the current level, and
    at whatever level :func:`set_level` sets later)."""
    return _Logger({"logger": name})


def bind(**ids: Any) -> None:
    """Bind ids (device, channel, lease, request) to the current task's logs."""
    structlog.contextvars.bind_contextvars(**{k: v for k, v in ids.items() if v is not None})
