"""Logging, configured once per process.

structlog renders every line, and the standard library's loggers (Celery, kombu,
SQLAlchemy, ...) are routed through the same renderer, so a process writes one
format: readable `key=value` lines on a terminal, one JSON object per line
otherwise (what log collectors parse). Context bound with `context(...)` (job,
batch, tier, tenant) lands on every line logged inside it, in that thread; a tier
worker also stamps its tier on every line of the process (`static`), Celery's too.

Prompts and answers stay out of logs: fields that carry content are dropped from
every line unless `content=True` (CASCADE_LOG_CONTENT=true, for debugging).
"""
from __future__ import annotations

import logging
import sys
from typing import Any

import structlog
from structlog.contextvars import bound_contextvars

from worker.config.credentials import redact_text


def _redact(_logger, _method, event: dict) -> dict:
    # any URL in a log line (an HTTP client's request line, an error naming a server
    # or the database) is shown without its credentials
    for k, v in event.items():
        if isinstance(v, str) and "://" in v:
            event[k] = redact_text(v)
    return event


_SHARED = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    _redact,
]

context = bound_contextvars  # with context(job=..., batch=..., tier=..., tenant=...): ...

# the field names that may hold a prompt or an answer
CONTENT_FIELDS = frozenset({"prompt", "input", "answer", "final_answer", "text", "completion", "messages", "output"})


def _drop_content(_logger, _name, event: dict) -> dict:
    for k in CONTENT_FIELDS & event.keys():
        event[k] = "[not logged: CASCADE_LOG_CONTENT is off]"
    return event


def _stamp(static: dict[str, Any]):
    def add(_logger, _name, event: dict) -> dict:
        for k, v in static.items():
            event.setdefault(k, v)
        return event
    return add


def configure_logging(json_lines: bool | None = None, level: str | int = "INFO", *, content: bool = False,
                      static: dict[str, Any] | None = None) -> None:
    """Idempotent; `json_lines=None` picks JSON unless stderr is a terminal; `static`
    fields land on every line that does not set them."""
    if json_lines is None:
        json_lines = not sys.stderr.isatty()
    renderer = structlog.processors.JSONRenderer() if json_lines else structlog.dev.ConsoleRenderer(colors=False)
    extra = ([_stamp(dict(static))] if static else []) + ([] if content else [_drop_content])
    structlog.configure(
        processors=[*_SHARED, *extra, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*_SHARED, *extra],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper() if isinstance(level, str) else level)
