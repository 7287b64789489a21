"""Where things are: the repository, the shared data, and the machine's services."""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("CASCADE_SHARED", REPO.parent / "shared"))
BENCH = SHARED / "benchmarks"
PG_ADMIN = os.environ.get("CASCADE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("CASCADE_TEST_REDIS", "redis://127.0.0.1:6379/0")
