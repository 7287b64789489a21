"""Calibration: every tier's answer to a sample of traffic, as ordinary jobs.

No second pipeline: the user's portfolio is run with its policy replaced by
`every-tier` (router.core.policies.every_tier), which calls each tier in turn and
accepts the last. So the sample goes through `worker.queue.batch.run_batch` like any
batch: committed jobs, queues, retries, costs, progress, resume on re-run; every
tier's answer is an attempt row. This module draws the sample, estimates the
spend, finds top-tier answers already stored by a previous batch (so they are not
paid for twice), runs the batches, turns the finished jobs into rows of the
benchmarks format, labels them by agreement with the top tier (the lab's
`router.lab.pseudo_labels`) and writes them: `cascade calibrate`'s work.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from router.core.comparators import Comparator
from router.core.errors import UserError
from router.core.portfolio import Portfolio, Tier, parse_portfolio
from router.core.records import parse_record, record_json, write_records
from router.lab.pseudo_labels import PseudoReport, pseudo_label
from worker.config.settings import Settings
from worker.queue.batch import default_batch_id, prepare_database
from worker.queue.items import Item, read_items
from worker.queue.run import run_batch
from worker.store.batches import BatchStore
from worker.store.jobs import JobStore

# Spend estimate, on the safe side of a cap: a prompt token is taken as 2 characters
# (English prose tokenises at ~4, but short Q/A lines and digits at ~2.1-2.3: measured
# on the demo's few-shot prompts); output tokens are the tier's `max_tokens`, else this many.
CHARS_PER_TOKEN = 2
DEFAULT_OUTPUT_TOKENS = 512
CONFIDENCE_FIELDS = ("logprob", "p_true")  # the records' own fields; other signals go under `signals`


class CalibrationError(UserError):
    """A calibration that cannot run as asked."""


def calibration_portfolio(portfolio: Portfolio, tiers_called: Sequence[str] | None = None) -> Portfolio:
    """The same tiers and backends with the `every-tier` policy; it asks the backends
    for every signal the portfolio's own policy reads, so they are recorded."""
    if len(portfolio.tiers) < 2:
        raise CalibrationError(
            f"the portfolio has one tier ({portfolio.tiers[0].name!r}): calibration compares cheaper tiers with "
            f"the top one, so it needs at least two")
    policy = portfolio.built_policy
    signals = sorted({s for i in range(len(portfolio.tiers)) for s in policy.needs(i).signals})
    spec = portfolio.spec()
    spec["policy"] = {"name": "every-tier", "params": {"signals": signals, **(
        {"tiers_called": list(tiers_called)} if tiers_called is not None else {})}}
    return parse_portfolio(spec, where="calibration portfolio")


def draw_sample(items: Sequence[Item], n: int, seed: int) -> tuple[list[Item], list[Item]]:
    """N good items drawn without replacement (seeded, in input order), and the bad lines."""
    good = [it for it in items if it.error is None]
    bad = [it for it in items if it.error is not None]
    if n < 1:
        raise CalibrationError(f"--sample must be at least 1, got {n}")
    if n > len(good):
        extra = f" ({len(bad)} more lines are unusable, e.g. {bad[0].error})" if bad else ""
        raise CalibrationError(f"--sample {n} is larger than the traffic: {len(good)} usable requests{extra}")
    chosen = sorted(random.Random(seed).sample(range(len(good)), n))
    return [good[i] for i in chosen], bad


def estimate_tier(tier: Tier, prompts: Sequence[str]) -> float:
    """Upper-ish estimate of one tier's spend on `prompts` at its configured prices
    (a backend's prompt template, e.g. few-shot examples, is sent with every prompt)."""
    out = tier.backend.options.get("max_tokens") or DEFAULT_OUTPUT_TOKENS
    extra = len(str(tier.backend.options.get("prompt_template") or ""))
    return math.fsum(tier.price.cost(math.ceil((len(p) + extra) / CHARS_PER_TOKEN), int(out)) for p in prompts)


@dataclass
class Stored:
    """A top-tier answer a previous batch already paid for."""
    batch_id: str
    attempt: dict[str, Any]


def stored_answers(batches: BatchStore, store: JobStore, batch_ids: Sequence[str], top: Tier,
                   prompts: set[str]) -> dict[str, Stored]:
    """Answers of `prompts` by a tier configured exactly as `top` (same backend and
    price), from the named batches: prompt -> the stored successful attempt."""
    found: dict[str, Stored] = {}
    want = top.model_dump(mode="json", include={"backend", "price"})
    for batch_id in batch_ids:
        batch = batches.batch(batch_id)
        if batch is None:
            raise CalibrationError(f"--reuse-batch: no batch {batch_id!r} in the database")
        spec = store.portfolio_spec(batch["portfolio"])
        same = [t["name"] for t in spec["tiers"]
                if {"backend": t["backend"], "price": t.get("price", want["price"])} == want]
        if not same:
            raise CalibrationError(f"--reuse-batch {batch_id!r}: none of its tiers is configured as the top tier "
                                   f"{top.name!r} (same backend and price), so its answers are not the top tier's")
        jobs = {j["id"]: j for j in store.batch_jobs(batch_id)}
        for job_id, atts in store.attempts_of(list(jobs)).items():
            prompt = (jobs[job_id]["input"] or {}).get("prompt")
            if prompt not in prompts or prompt in found:
                continue
            for a in atts:
                if a["tier"] in same and a["error"] is None and a["answer"] is not None:
                    found[prompt] = Stored(batch_id, a)
                    break
    return found


def response_of(attempt: dict[str, Any] | None) -> dict[str, Any] | None:
    """A job's attempt as one model's response in the benchmarks format (`correct` to be filled)."""
    if attempt is None:
        return None
    signals = dict(attempt.get("signals") or {})
    return {
        "text": attempt["answer"], "correct": None, "cost_usd": attempt["cost_usd"],
        "latency_ms": attempt["latency_ms"], "tokens_in": attempt["tokens_in"], "tokens_out": attempt["tokens_out"],
        **{k: signals.pop(k, None) for k in CONFIDENCE_FIELDS},
        **({"signals": signals} if signals else {}),
    }


def calibration_rows(jobs: Sequence[dict], tiers: Sequence[str], stored: dict[str, Stored], *,
                     test_share: float, seed: int) -> list[dict[str, Any]]:
    """One benchmarks-format row per finished job: each tier's response (the top
    tier's from `stored` where the job did not call it), `correct` still null,
    split "test" for a seeded `test_share` of rows and "train" for the rest."""
    rng = random.Random(seed)
    rows = []
    for j in jobs:
        inp = j["input"] or {}
        by_tier = {a["tier"]: a for a in j["attempts"]}
        responses = {}
        for t in tiers:
            a = by_tier.get(t)
            if a is None and inp.get("prompt") in stored and t == tiers[-1]:
                a = stored[inp["prompt"]].attempt
            r = response_of(a)
            if r is not None:
                responses[t] = r
        rows.append({"id": j["id"], "split": "test" if rng.random() < test_share else "train",
                     "category": inp.get("category"), "prompt": inp.get("prompt", ""),
                     "gold": None if inp.get("gold") is None else str(inp["gold"]),  # kept, never used to label
                     "responses": responses, "job": j["job_id"], "status": j["status"]})
    return rows


@dataclass
class Draw:
    """A calibration's sample, the top-tier answers reused for it, and its estimated spend."""
    portfolio: Portfolio  # the user's
    full: Portfolio  # its tiers with the `every-tier` policy
    sample: list[Item]
    bad: list[Item]  # unusable lines, left out of the draw
    stored: dict[str, Stored]
    fresh: list[Item]  # called on every tier
    known: list[Item]  # a stored top-tier answer: called on the other tiers
    estimate: float
    saved: float  # what the stored answers would have cost

    def check_spend(self, max_spend: float | None) -> None:
        if max_spend is not None and self.estimate > max_spend:
            raise CalibrationError(f"estimated spend ${self.estimate:.4g} exceeds --max-spend ${max_spend:g}: "
                                   f"draw a smaller --sample or raise the cap")


def draw(portfolio: Portfolio, input_path: str | Path, n: int, seed: int, reuse: Sequence[str],
         settings: Settings, *, log: Callable[[str], None] = print) -> Draw:
    """Draw `n` requests of the traffic, find the top-tier answers the `reuse` batches
    already paid for, and estimate the spend of the rest."""
    full_pf = calibration_portfolio(portfolio)
    top = portfolio.tiers[-1]
    sample, bad = draw_sample(read_items(input_path), n, seed)
    if bad:
        log(f"{len(bad)} unusable lines of {input_path} left out of the draw (first: {bad[0].error})")
    stored = {}
    if reuse:
        prepare_database(settings)
        stored = stored_answers(BatchStore(settings.db_url), JobStore(settings.db_url), reuse, top, {it.data["prompt"] for it in sample})
    fresh = [it for it in sample if it.data["prompt"] not in stored]
    known = [it for it in sample if it.data["prompt"] in stored]
    estimate = math.fsum(estimate_tier(t, [it.data["prompt"] for it in fresh]) for t in portfolio.tiers)
    estimate += math.fsum(estimate_tier(t, [it.data["prompt"] for it in known]) for t in portfolio.tiers[:-1])
    saved = estimate_tier(top, [it.data["prompt"] for it in known])
    return Draw(portfolio, full_pf, sample, bad, stored, fresh, known, estimate, saved)


@dataclass
class Calibrated:
    """A finished calibration: its jobs, what they cost, and the labelling's report."""
    jobs: list[dict]
    spent: float
    report: PseudoReport
    errors: dict[str, int]  # failed calls per tier


def run_calibration(d: Draw, comparator: Comparator, out_path: str | Path, *, input_path: str | Path, n: int,
                    seed: int, test_share: float, unparsed: str, settings: Settings, batch_id: str | None = None,
                    max_spend: float | None = None, timeout: float | None = None, progress: bool = True,
                    say: Callable[[str], None] = print) -> Calibrated:
    """Run the draw as batches (the reused part on the tiers below the top), label every
    row by agreement with the top tier, and write the labelled file to `out_path`."""
    portfolio = d.portfolio
    names = portfolio.tier_names
    base = batch_id or default_batch_id(input_path, d.full, f"calibrate sample={n} seed={seed}")
    jobs, spent = [], 0.0
    for part, pf, bid in ((d.fresh, d.full, base),
                          (d.known, calibration_portfolio(portfolio, names[:-1]), f"{base}-reuse")):
        if not part:
            continue
        report = run_batch(part, pf, settings=settings, batch_id=bid, source=str(input_path),
                           progress=progress, timeout=timeout,
                           max_cost=None if max_spend is None else max_spend - spent)
        jobs += report.jobs
        spent += math.fsum(j["cost_usd"] for j in report.jobs)
        say(f"batch {bid}: {len(report.jobs)} jobs, cost ${math.fsum(j['cost_usd'] for j in report.jobs):.6g}")
    rows = calibration_rows(jobs, names, d.stored, test_share=test_share, seed=seed)
    records = [parse_record(r, f"calibration job {r['job']}") for r in rows]
    labelled, rep = pseudo_label(records, portfolio.tiers[-1].name, comparator, models=names, unparsed=unparsed)
    errors = {t: sum(1 for j in jobs for a in j["attempts"] if a["tier"] == t and a["error"]) for t in names}
    write_records(out_path, [record_json(r, {"job": row["job"]}) for r, row in zip(labelled, rows)])
    return Calibrated(jobs, spent, rep, errors)
