"""Tier worker processes for tests of the distributed mode."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from helpers.env import REPO


class Workers:
    """`cascade worker --tier NAME` processes, stopped (or killed) by the test."""

    def __init__(self, env: dict[str, str], portfolio: Path, logdir: Path):
        self.env = {**os.environ, **env}
        self.portfolio = portfolio
        self.logdir = logdir
        self.procs: dict[str, list[subprocess.Popen]] = {}

    def start(self, tier: str, *extra: str) -> subprocess.Popen:
        n = sum(len(v) for v in self.procs.values())
        log = open(self.logdir / f"worker-{tier}-{n}.log", "wb")
        p = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "worker", "--tier", tier, "--portfolio", str(self.portfolio),
             "-l", "WARNING", *extra],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
        )
        self.procs.setdefault(tier, []).append(p)
        return p

    def stop(self, tier: str) -> None:
        """Stop the tier's processes (the others go on)."""
        self._stop(self.procs.get(tier, []))

    def stop_all(self) -> None:
        self._stop([p for ps in self.procs.values() for p in ps])

    def kill_all(self) -> None:
        """SIGKILL every process, for a test's cleanup: nothing is asserted on a worker's
        shutdown there, and the warm one takes a second or two."""
        for ps in self.procs.values():
            for p in ps:
                if p.poll() is None:
                    p.kill()
        for ps in self.procs.values():
            for p in ps:
                p.wait()

    def _stop(self, procs: list[subprocess.Popen]) -> None:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.time() + 20
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def logs(self) -> str:
        return "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-3000:]}" for f in sorted(self.logdir.glob("worker-*.log")))
