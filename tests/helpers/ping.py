"""Wait until a `cascade worker --tier NAME` process consumes (answers a ping)."""
from __future__ import annotations

import socket
import time

from worker.queue.tasks import make_app


def wait_ready(settings, tier: str, timeout: float = 60) -> None:
    app = make_app(settings)
    end = time.time() + timeout
    while time.time() < end:
        if app.control.ping(destination=[f"{tier}@{socket.gethostname()}"], timeout=1):
            return
    raise AssertionError(f"worker {tier} did not answer a ping in {timeout}s")
