"""Calibration: every tier's answer to a sample of traffic, as ordinary jobs.

No second pipeline: the user's portfolio is run with its policy replaced by
`every-tier` (router.core.policies.every_tier), which calls each tier in turn and
accepts the last. So the sample goes through `worker.queue.batch.run_batch` like any
batch: committed jobs, queues, retries, costs, progress, resume on re-run; every
tier's answer is an attempt row. This module draws the sample, estimates the
spend, finds top-tier answers already stored by a previous batch (so they are not
paid for twice), and turns the finished jobs into rows of the benchmarks format.
Labelling those rows (agreement with the top tier) is the lab's
`router.lab.pseudo_labels`, done by the `cascade calibrate` command.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Sequence

from router.core.errors import UserError
from router.core.portfolio import Portfolio, Tier, parse_portfolio
from worker.queue.items import Item
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
