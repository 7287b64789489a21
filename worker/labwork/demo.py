"""The demo's work (`cascade demo`): three real local models, tiny -> small -> medium,
on a question set the project generates itself, through real Celery queues in the
embedded mode.

It runs the set twice through the same pipeline: once as the cascade (by default
a pre-call router on the question's text in front of a confidence-threshold
cascade, `routed-threshold`, fitted on a separate calibration set), once with the
last model alone ("always medium"); `demo_report` summarises per tier the calls,
accuracy, model time (the sum of the attempts' latencies, measured around the
model's own computation) and cost at configured per-token prices, and both runs'
wall times. `calibrate_policy` measures the models on a separate generated set and
fits the policy (see docs/local-models.md).
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml
from tqdm import tqdm

from router.core import signals as sig
from router.core.attempt import Query
from router.core.errors import UserError
from router.core.policy import Needs
from router.core.policyfile import TunedPolicy, read_policy_file, write_policy_file
from router.core.portfolio import Portfolio, parse_portfolio
from router.lab import demo_questions as dq
from router.lab.demo_calibration import Calibration
from router.lab.demo_calibration import calibrate as calibrate_demo
from worker.config.settings import Settings
from worker.labwork.demo_report import describe_policy, figures, grade_job, render, summarise
from worker.models import modelpack
from worker.models.backends import build_backend
from worker.queue.batch import BatchReport
from worker.queue.run import run_batch

TIERS = ("tiny", "small", "medium")
# Configured prices (USD per 1M tokens, input and output alike): plausible, not real.
PRICES = {"tiny": 0.02, "small": 0.08, "medium": 0.25}
# The default policy: written by `cascade demo --calibrate` on questions of another seed
# (the run is in docs/local-models.md), never on the demo's own.
DEFAULT_POLICY = Path(__file__).with_name("demo_policy.json")
# Thresholds for a chain the policy file does not cover (an earlier calibration, 200
# questions, seed 1000, keep 0.96).
SIGNAL = "min_logprob"
THRESHOLDS = {"tiny": -0.1999, "small": -0.592}
CALIBRATION_SEED = 1000

# Shares of the four difficulty levels in a generated set (dq.LEVEL_WEIGHTS is "standard").
MIXES = {
    "standard": dq.LEVEL_WEIGHTS,
    "easy": {1: 0.50, 2: 0.25, 3: 0.15, 4: 0.10},  # most requests easy, as much real traffic is
}


DEFAULT_MIX = "easy"


class DemoError(UserError):
    """A policy file or calibration rows the demo cannot use."""


def mix_text(name: str) -> str:
    return f"{name} mix, levels 1-4 " + "/".join(f"{100 * w:.0f}%" for _, w in sorted(MIXES[name].items()))


def tier_spec(name: str, threads: int) -> dict[str, Any]:
    # n_parallel 1: one job decoded at a time, so an attempt's latency is that model's own time and
    # "model time" (their sum) compares the two runs; decoded together, jobs' latencies overlap
    return {
        "name": name,
        "backend": {"kind": "llamacpp", "model": name, "n_ctx": 1024, "n_threads": threads, "max_tokens": 8,
                    "n_parallel": 1,
                    "stop": list(dq.STOP), "prompt_template": dq.FEW_SHOT_TINY if name == "tiny" else dq.FEW_SHOT},
        "price": {"input_per_mtok": PRICES[name], "output_per_mtok": PRICES[name]},
    }


def build_portfolio(chain: list[str], threads: int, signal: str, thresholds: dict[str, float],
                    router: dict[str, Any] | None = None):
    """The demo's tiers with a threshold cascade over `chain`, behind the pre-call
    `router` (routed-threshold) when one is given."""
    params: dict[str, Any] = {"signal": signal, "chain": list(chain),
                              "thresholds": {t: thresholds[t] for t in chain[:-1]}}
    if router is not None:
        params["router"] = router
    raw = {
        "tiers": [tier_spec(t, threads) for t in chain],
        "policy": {"name": "routed-threshold" if router is not None else "threshold", "params": params},
    }
    return parse_portfolio(raw, base=Path("."), where="demo portfolio")


def demo_policy(path: Path) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(policy name, params, fitted) of a demo policy file: threshold or routed-threshold."""
    tuned = read_policy_file(path)
    try:
        if tuned.name not in ("threshold", "routed-threshold"):
            raise KeyError(f"policy {tuned.name!r}, not threshold or routed-threshold")
        p = tuned.params
        if not isinstance(p["thresholds"], dict) or not isinstance(p["signal"], str):
            raise TypeError("signal and thresholds expected")
        if tuned.name == "routed-threshold" and not isinstance(p["router"], dict):
            raise TypeError("router expected")
    except (KeyError, TypeError) as e:
        raise DemoError(f"{path}: not a demo policy file ({e})") from None
    return tuned.name, p, tuned.fitted


def check_models(names) -> None:
    for n in names:
        modelpack.resolve(n)  # an error naming the file and `cascade models prepare`


@dataclass
class Setup:
    """The cascade a demo runs: its chain, the models' threads, and the policy's knobs
    (the policy file's, as the command's options override them)."""
    chain: list[str]
    threads: int
    signal: str
    thresholds: dict[str, float]
    router: dict[str, Any] | None = None

    def portfolio(self) -> Portfolio:
        return build_portfolio(self.chain, self.threads, self.signal, self.thresholds, self.router)

    def describe(self) -> str:
        return describe_policy(self.chain, self.signal, self.thresholds, self.router)


def _question_set(setup: Setup, n: int, seed: int, mix: str) -> tuple[list[dict], Portfolio]:
    check_models(setup.chain)
    qs = dq.generate(n, seed=seed, weights=MIXES[mix], part="demo")
    return [q.item() for q in qs], setup.portfolio()


def export(setup: Setup, n: int, seed: int, mix: str, out_dir: Path) -> tuple[Path, Path]:
    """The question set as traffic (DIR/traffic.jsonl: id, prompt, and the gold answer,
    which `cascade calibrate` ignores) and the demo's portfolio (DIR/portfolio.yaml)."""
    items, pf = _question_set(setup, n, seed, mix)
    out_dir.mkdir(parents=True, exist_ok=True)
    traffic, portfolio = out_dir / "traffic.jsonl", out_dir / "portfolio.yaml"
    traffic.write_text("".join(json.dumps(it) + "\n" for it in items))
    portfolio.write_text(yaml.safe_dump(pf.spec(), sort_keys=False))
    return traffic, portfolio


@dataclass
class DemoRun:
    """Both runs of a demo: the cascade's and (with the baseline) the last tier's alone."""
    setup: Setup
    report: BatchReport | None
    top_report: BatchReport | None
    wall: dict[str, dict[str, float]]
    cascade: dict[str, Any]  # summarise()'d
    top: dict[str, Any] | None
    text: str  # the table
    jobs: dict[str, list[dict] | None] | None = None  # the cluster demo's jobs, read through the task API
    batch: dict[str, Any] | None = None  # the cluster demo's OpenAI batch object (the cascade's)

    def figures(self) -> dict[str, Any]:
        return figures(self.cascade, self.top, self.wall)

    def save(self, table_path: Path) -> Path:
        """Write the table to `table_path` and every job of both runs, graded, beside it."""
        chain = self.setup.chain
        table_path.parent.mkdir(parents=True, exist_ok=True)
        table_path.write_text(self.text + "\n")
        results = table_path.with_suffix(".jobs.jsonl")
        with open(results, "w") as f:
            runs = self.jobs or {"cascade": self.report.jobs if self.report else None,
                                 "top": self.top_report.jobs if self.top_report else None}
            for run, jobs in (("cascade", runs["cascade"]), ("always-" + chain[-1], runs["top"])):
                for j in (jobs or []):
                    f.write(json.dumps({"run": run, **{k: v for k, v in j.items()},
                                        "correct": grade_job(j)}, default=str) + "\n")
        return results


def run_demo(setup: Setup, n: int, seed: int, mix: str, *, base: Settings, baseline: bool = True,
             progress: bool = True, log: Callable[[str], None] = print) -> DemoRun:
    """N generated questions through the cascade, then (with `baseline`) through the
    last tier alone, in embedded Celery workers; the table of both."""
    chain, threads = setup.chain, setup.threads
    items, cascade_pf = _question_set(setup, n, seed, mix)
    models = {t: modelpack.spec(t).model for t in TIERS}
    medium_pf = build_portfolio(chain[-1:], threads, setup.signal, setup.thresholds)
    wall: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="cascade-demo-") as tmp:
        # always embedded, in a throwaway SQLite: the demo never touches a configured broker or database
        settings = Settings(broker_url=None, database_url=None, home=Path(tmp),
                            model_cache=base.model_cache, model_threads=threads,
                            worker_concurrency=1, chunk_size=4)
        log(f"cascade: {n} questions through {' -> '.join(chain)} (embedded Celery workers)")
        rep = run_batch(items, cascade_pf, settings=settings, batch_id="demo-cascade", progress=progress)
        wall["cascade"] = dict(rep.timing)
        med_rep = None
        if baseline and len(chain) > 1:
            log(f"always {chain[-1]}: the same {n} questions")
            med_rep = run_batch(items, medium_pf, settings=settings, batch_id="demo-always-medium",
                                progress=progress)
            wall["top"] = dict(med_rep.timing)
    c_sum = summarise(rep.jobs, chain)
    m_sum = summarise(med_rep.jobs, chain[-1:]) if med_rep is not None else None
    text = render(c_sum, m_sum, chain=chain, models=models, policy=setup.describe(), n=n, seed=seed,
                  mix=mix_text(mix), wall=wall, threads=threads, prices=PRICES)
    return DemoRun(setup, rep, med_rep, wall, c_sum, m_sum, text)


# -- calibration ---------------------------------------------------------------------------

def measure(questions, chain: list[str], threads: int, progress: bool) -> list[dict]:
    """Every question on every tier, called directly (no queue): the rows `calibrate` replays."""

    portfolio = build_portfolio(chain, threads, SIGNAL, {t: 0.0 for t in chain})
    rows: list[dict] = [{"id": q.id, "prompt": q.prompt, "level": q.level, "family": q.family} for q in questions]
    for tier in portfolio.tiers:
        b = build_backend(tier)
        try:
            for q, row in zip(questions, tqdm(rows, desc=f"calibrate {tier.name}", disable=not progress)):
                r = b.generate(Query(q.id, q.prompt), Needs())
                row[tier.name] = {"ok": dq.grade(r.text, q.answer, q.kind), "ms": r.latency_ms,
                                  "sig": sig.from_tokens(r.tokens or [], r.stop), "text": r.text}
        finally:
            b.close()
    return rows


@dataclass
class DemoCalibration:
    """A policy fitted by `calibrate_policy`, the rows it was fitted on, and where both went."""
    calibration: Calibration
    rows: list[dict]
    policy_path: Path
    rows_path: Path


def calibrate_policy(chain: list[str], threads: int, table_path: Path, n: int, seed: int, rows_file: Path | None,
                     policy: str, time: str, keep: float, mix: str, *, progress: bool = True,
                     log: Callable[[str], None] = print) -> DemoCalibration:
    """Measure the models on `n` generated calibration questions (or read rows a previous
    calibration measured), fit `policy` to keep `keep` x the last tier's accuracy, and
    write the policy file and its rows beside `table_path`."""
    if rows_file is not None:
        rows = [json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()]
        missing = [t for t in chain if rows and t not in rows[0]]
        if missing or any("prompt" not in r for r in rows):
            raise DemoError(f"{rows_file}: no question texts or no measured calls of tier(s) "
                            f"{', '.join(missing) or '-'}")
        kept = [r for r in rows if dq.part_of(r["prompt"]) == "calibration"]
        log(f"calibration: {len(rows)} measured questions from {rows_file}, {len(kept)} of them in the "
            f"calibration part (the demo asks only questions of the other)")
        rows = kept
    else:
        check_models(chain)
        qs = dq.generate(n, seed=seed, prefix="c", weights=MIXES[mix], part="calibration")
        log(f"calibration: {n} questions (seed {seed}, {mix_text(mix)}) on {', '.join(chain)}, "
            f"{threads} threads")
        rows = measure(qs, chain, threads, progress)
    cal = calibrate_demo(rows, chain, keep=keep, policy=policy, time=time)
    policy_path = table_path.with_name(f"demo-policy-seed{seed}.json")
    info = {"n": cal.n, "seed": seed, "mix": mix, "keep": keep, "time": time, "accuracy": cal.accuracy,
            "baseline_accuracy": cal.baseline_accuracy, "time_ratio": cal.time_ratio, "accepted": cal.accepted}
    if cal.out_of_fold is not None:
        info["out_of_fold"] = {"accuracy": cal.out_of_fold[0], "time_ratio": cal.out_of_fold[1]}
    write_policy_file(policy_path, TunedPolicy(cal.policy, cal.params, fitted={"calibration": info}))
    rows_path = policy_path.with_suffix(".rows.jsonl")
    if rows_file is None or rows_file.resolve() != rows_path.resolve():
        rows_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return DemoCalibration(cal, rows, policy_path, rows_path)
