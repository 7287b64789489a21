"""The database's errors as the other layers catch them, so that only the store
imports the database library (the store's contract in .importlinter), and
`ride_out`: how a caller that must not give up waits an outage out."""
from __future__ import annotations

import time
from typing import Callable, TypeVar

import structlog
from sqlalchemy.exc import InterfaceError, OperationalError, StatementError

__all__ = ["InterfaceError", "OperationalError", "StatementError", "ride_out"]

T = TypeVar("T")
log = structlog.get_logger("cascade.store")


def ride_out(call: Callable[[], T], *, wait: float, what: str, first_delay: float = 0.5,
             max_delay: float = 5.0) -> T:
    """`call()`, tried again while the database is unreachable (OperationalError,
    InterfaceError: down, restarting, a dropped connection), with a doubling delay up to
    `max_delay`, for up to `wait` seconds; then the error is raised. A statement the
    database refuses (bad values) is raised at once. `call` must be safe to repeat: a
    transaction whose commit was lost with the connection may have taken effect."""
    started = time.monotonic()
    delay = first_delay
    failures = 0
    while True:
        try:
            result = call()
        except (OperationalError, InterfaceError) as e:
            if time.monotonic() - started + delay > wait:
                raise
            failures += 1
            if failures == 1 or delay >= max_delay:
                log.warning("database.unavailable", during=what, retry_in_s=delay,
                            error=str(e.orig or e).splitlines()[0][:200] if str(e.orig or e) else type(e).__name__)
            time.sleep(delay)
            delay = min(delay * 2, max_delay)
            continue
        if failures:
            log.warning("database.back", during=what, after_s=round(time.monotonic() - started, 1))
        return result
