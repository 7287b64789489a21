"""`cascade bench risk`: does the risk-controlled threshold tuner keep its promise?
router.lab.risk_check's coverage run (random train/test re-splits, the share whose
test loss against the reference exceeds the bound) on each labelled file."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from router.lab.risk_check import coverage
from router.lab.tuners import RiskSpec
from worker.bench.shared import benchmark_file

# the shared labelled files checked by default
DEFAULT_FILES = ("rc-mmlu.jsonl.gz", "rc-triviaqa.jsonl.gz", "rc-gsm8k.jsonl.gz")


@dataclass
class RiskBenchConfig:
    files: Sequence[Path] = ()  # default: DEFAULT_FILES in the shared folder
    risk_bound: float = 0.03
    delta: float = 0.1
    procedure: str = "fixed-sequence"
    resplits: int = 200
    train_rows: int | None = None  # default: the file's train split size, or half the rows
    seed: int = 0
    log: Callable[[str], None] = print


def run_risk_bench(cfg: RiskBenchConfig) -> list[dict[str, Any]]:
    """One coverage result per file (router.lab.risk_check.render prints them)."""
    paths = list(cfg.files) or [benchmark_file(name) for name in DEFAULT_FILES]
    spec = RiskSpec(cfg.risk_bound, cfg.delta, cfg.procedure)
    return [coverage(p, spec, resplits=cfg.resplits, train_rows=cfg.train_rows, seed=cfg.seed, progress=cfg.log)
            for p in paths]
