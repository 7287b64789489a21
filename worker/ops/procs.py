"""Stopping the child processes a benchmark or a fault drill started."""
from __future__ import annotations

import subprocess
from typing import Iterable


def stop_all(procs: Iterable[subprocess.Popen], grace: float = 20) -> None:
    """SIGTERM every process still running, then wait for each; one that is still
    there after `grace` seconds is killed (a worker's warm shutdown can hang on a
    broker that went away)."""
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
