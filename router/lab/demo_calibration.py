"""Calibrating the demo's cascade on measured calls, through the lab's own tools.

`cascade demo --calibrate` calls every model on a separate generated question set
and keeps, per call, whether it was right, its model time and its signals. Those
rows become records in the benchmarks format (model time as the cost, the question
text as the prompt), the policy's tuner searches its knobs for the least model time
that keeps `keep` x the last tier's accuracy, and `router.lab.simulate` replays the
choice with the workers' decision code: the figures reported are simulate's, not the
search's. Policies: `threshold` (chains and per-tier thresholds) and
`routed-threshold` (the same cascade behind a pre-call router on the question's
text, which sends questions it predicts the cheap tiers miss straight to a dearer
one; its router is fitted on these rows and its knobs chosen on out-of-fold
predictions).
"""
from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

from router.core.errors import UserError
from router.core.policies import make_policy
from router.core.policy import tier_infos
from router.core.records import Record, Response

from .labelled import build_table
from .simulate import TierModel, simulate
from .tuners import confirm
from .tuners.routed_threshold import RoutedThresholdTuner
from .tuners.threshold import ThresholdTuner
from .tuning import NotApplicable, Target, TargetUnreachable

SIGNALS = ("sum_logprob", "mean_logprob", "min_logprob", "first_token_prob")


@dataclass(frozen=True)
class Calibration:
    policy: str
    params: dict[str, Any]  # the policy's: signal, chain, thresholds (and router)
    accuracy: float  # of the cascade on the calibration set
    baseline_accuracy: float  # of the last tier alone
    time_ratio: float  # cascade model time / last tier alone
    accepted: dict[str, int]  # answers accepted per tier
    n: int
    # routed-threshold: (accuracy, time ratio) with out-of-fold router predictions, the
    # figures its knobs were chosen on (in-sample ones flatter a learned router)
    out_of_fold: tuple[float, float] | None = None

    @property
    def signal(self) -> str:
        return self.params["signal"]


def records_of(rows: Sequence[dict], tiers: Sequence[str], time: str = "call") -> list[Record]:
    """Measured calls, rows[i][tier] = {"ok", "ms", "sig", "text"} (and rows[i]["prompt"],
    the question), as benchmark records whose cost is the model time in seconds: the
    call's own (`time="call"`), or the median of the tier's calls (`"median"`: on a
    shared machine one call's time is mostly the load of that moment, and what a
    cascade saves is calls)."""
    if time not in ("call", "median"):
        raise UserError(f"time must be 'call' or 'median', got {time!r}")
    med = {t: statistics.median(r[t]["ms"] for r in rows) for t in tiers} if rows and time == "median" else {}
    out = []
    for r in rows:
        responses = {}
        for t in tiers:
            ms = med.get(t, r[t]["ms"])
            responses[t] = Response(text=r[t].get("text"), correct=float(bool(r[t]["ok"])), cost_usd=ms / 1000,
                                    latency_ms=ms, tokens_in=None, tokens_out=None, logprob=None, p_true=None,
                                    signals=dict(r[t]["sig"]))
        out.append(Record(str(r["id"]), str(r.get("prompt", "")), "train", None, None, responses))
    return out


POLICIES = ("threshold", "routed-threshold")


def calibrate(rows: Sequence[dict], tiers: Sequence[str], signals: Sequence[str] = SIGNALS,
              keep: float = 0.97, policy: str = "threshold", time: str = "call") -> Calibration:
    if not rows:
        raise UserError("calibration needs at least one measured question")
    if policy not in POLICIES:
        raise UserError(f"the demo calibrates {', '.join(POLICIES)}, not {policy!r}")
    records = records_of(rows, tiers, time)
    ladder = [TierModel(t, t) for t in tiers]
    table = build_table(records, ladder)
    infos = tier_infos(ladder)
    base_acc = float(table.accuracy()[-1])
    target = Target.accuracy(keep * base_acc)
    best = None
    for s in signals:
        if s not in table.conf:
            continue
        try:
            if policy == "threshold":
                tuner = ThresholdTuner(table, infos, signal=s, min_tiers=1, max_tiers=len(tiers), prune=False)
            else:
                tuner = RoutedThresholdTuner(table, infos, signal=s)
            fitted = confirm(tuner.select(target), records, ladder)
        except (TargetUnreachable, NotApplicable):
            continue
        if best is None or _chosen_on(fitted) < _chosen_on(best):
            best = fitted
    if best is None:
        raise UserError(f"no chain reaches {keep:.0%} of {tiers[-1]}'s accuracy on the calibration set")
    outcomes = simulate(make_policy(policy, infos, best.params), ladder, records)
    accepted = Counter(o.final_tier for o in outcomes)
    base_cost = float(table.mean_cost()[-1])
    oof = best.search.get("out_of_fold")
    return Calibration(policy, best.params, best.train_accuracy, base_acc, best.train_cost / base_cost,
                       {t: accepted.get(t, 0) for t in tiers}, len(rows),
                       None if oof is None else (oof["accuracy"], oof["cost"] / base_cost))


def _chosen_on(f) -> tuple[float, float]:
    # a learned router's own in-sample figures flatter it: compare what its knobs were chosen on
    oof = f.search.get("out_of_fold")
    acc, cost = (oof["accuracy"], oof["cost"]) if oof else (f.train_accuracy, f.train_cost)
    return cost, -acc
