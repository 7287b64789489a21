"""Logging, configured once per process.

structlog renders every line, and the standard library's loggers (Celery, kombu,
SQLAlchemy, ...) are routed through the same renderer, so a process writes one
format: readable `key=value` lines on a terminal, one JSON object per line
otherwise (what log collectors parse). Context bound with `context(...)` (job,
batch, tier) lands on every line logged inside it, in that thread.
"""
from __future__ import annotations

import logging
import sys

import structlog
from structlog.contextvars import bound_contextvars

_SHARED = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]

context = bound_contextvars  # with context(job=..., batch=..., tier=...): ...


def configure_logging(json_lines: bool | None = None, level: str | int = "INFO") -> None:
    """Idempotent; `json_lines=None` picks JSON unless stderr is a terminal."""
    if json_lines is None:
        json_lines = not sys.stderr.isatty()
    renderer = structlog.processors.JSONRenderer() if json_lines else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[*_SHARED, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_SHARED,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper() if isinstance(level, str) else level)
