"""`cascade serve` in a subprocess on a free port, for tests against the running service."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from helpers.env import REPO
from helpers.servers import free_port


class Serve:
    def __init__(self, env: dict[str, str | None], portfolio: Path, log: Path):
        """env: added to this process's environment; a None value removes the variable."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "serve", "--portfolio", str(portfolio), "--port", str(self.port)],
            env={k: v for k, v in {**os.environ, **env}.items() if v is not None}, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO)

    def wait_ready(self, timeout: float = 60) -> "Serve":
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cascade serve exited:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"cascade serve not ready after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
