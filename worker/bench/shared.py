"""Where the benches find the shared data folder: $CASCADE_SHARED, else `shared` beside the
checkout (its benchmark files are replayed and re-split, its question sets read, in place)."""
from __future__ import annotations

import os
from pathlib import Path


def shared_dir() -> Path:
    shared = os.environ.get("CASCADE_SHARED")
    return Path(shared) if shared else Path(__file__).resolve().parents[2].parent / "shared"


def benchmark_file(name: str) -> Path:
    """A shared benchmark file by name, e.g. rc-mmlu.jsonl.gz."""
    return shared_dir() / "benchmarks" / name


def default_replay_data() -> Path:
    """What the pipeline and API benches replay unless told otherwise."""
    return benchmark_file("rc-mmlu.jsonl.gz")
