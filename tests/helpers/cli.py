"""Running the `cascade` command as a user would: a subprocess with its own state folder."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers.env import REPO


def cascade(*args, home: Path, check=True, timeout=300, env: dict[str, str] | None = None):
    full = {k: v for k, v in os.environ.items() if not k.startswith("CASCADE_") or k == "CASCADE_SHARED"}
    full["CASCADE_HOME"] = str(home)
    full.update(env or {})
    p = subprocess.run([sys.executable, "-m", "worker.cli", *args], env=full, cwd=REPO, capture_output=True,
                       text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"cascade {' '.join(args)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p
