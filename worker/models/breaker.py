"""A circuit breaker per backend, per worker process.

Once a call to a tier's backend has exhausted its retries on transient errors
(the server is down, hangs or keeps answering 5xx), the following calls to it in
this process are not made for `cooldown` seconds: each such attempt fails at once,
naming the last error, and its job falls back to the next tier without waiting out
timeouts and backoff. The first call after the cooldown is a normal one (a probe):
a success closes the breaker, a give-up opens it again.
"""
from __future__ import annotations

import threading
import time
import weakref


class Breaker:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.open_until = 0.0
        self.last_error = ""

    def blocked(self) -> str | None:
        """Why a call must not be made now, or None."""
        with self._lock:
            left = self.open_until - time.monotonic()
            if left <= 0:
                return None
            return f"not called: the backend gave up on its last call ({self.last_error}); next try in {left:.0f}s"

    def trip(self, error: str, cooldown: float) -> None:
        with self._lock:
            self.open_until = time.monotonic() + cooldown
            self.last_error = error

    def close(self) -> None:
        with self._lock:
            self.open_until = 0.0


_breakers: "weakref.WeakKeyDictionary[object, Breaker]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def breaker_of(backend: object) -> Breaker:
    with _lock:
        b = _breakers.get(backend)
        if b is None:
            b = _breakers[backend] = Breaker()
        return b
