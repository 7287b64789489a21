"""Calibrating the demo's cascade on measured calls, through the lab's own tools.

`cascade demo --calibrate` calls every model on a separate generated question set
and keeps, per call, whether it was right, its model time and its signals. Those
rows become records in the benchmarks format (model time as the cost), the
threshold tuner searches chains and thresholds for the least model time that keeps
`keep` x the last tier's accuracy, and `router.lab.simulate` replays the choice with
the workers' decision code: the figures reported are simulate's, not the search's.
"""
from __future__ import annotations

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
from .tuners.threshold import ThresholdTuner
from .tuning import NotApplicable, Target, TargetUnreachable

SIGNALS = ("sum_logprob", "mean_logprob", "min_logprob", "first_token_prob")


@dataclass(frozen=True)
class Calibration:
    params: dict[str, Any]  # the threshold policy's: signal, chain, thresholds
    accuracy: float  # of the cascade on the calibration set
    baseline_accuracy: float  # of the last tier alone
    time_ratio: float  # cascade model time / last tier alone
    accepted: dict[str, int]  # answers accepted per tier
    n: int

    @property
    def signal(self) -> str:
        return self.params["signal"]


def records_of(rows: Sequence[dict], tiers: Sequence[str]) -> list[Record]:
    """Measured calls, rows[i][tier] = {"ok", "ms", "sig", "text"}, as benchmark records
    whose cost is the call's model time in seconds."""
    out = []
    for r in rows:
        responses = {t: Response(text=r[t].get("text"), correct=float(bool(r[t]["ok"])), cost_usd=r[t]["ms"] / 1000,
                                 latency_ms=r[t]["ms"], tokens_in=None, tokens_out=None, logprob=None, p_true=None,
                                 signals=dict(r[t]["sig"]))
                     for t in tiers}
        out.append(Record(str(r["id"]), "", "train", None, None, responses))
    return out


def calibrate(rows: Sequence[dict], tiers: Sequence[str], signals: Sequence[str] = SIGNALS,
              keep: float = 0.97) -> Calibration:
    if not rows:
        raise UserError("calibration needs at least one measured question")
    records = records_of(rows, tiers)
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
            tuner = ThresholdTuner(table, infos, signal=s, min_tiers=1, max_tiers=len(tiers), prune=False)
            fitted = confirm(tuner.select(target), records, ladder)
        except (TargetUnreachable, NotApplicable):
            continue
        if best is None or (fitted.train_cost, -fitted.train_accuracy) < (best.train_cost, -best.train_accuracy):
            best = fitted
    if best is None:
        raise UserError(f"no chain reaches {keep:.0%} of {tiers[-1]}'s accuracy on the calibration set")
    outcomes = simulate(make_policy("threshold", infos, best.params), ladder, records)
    accepted = Counter(o.final_tier for o in outcomes)
    return Calibration(best.params, best.train_accuracy, base_acc, best.train_cost / float(table.mean_cost()[-1]),
                       {t: accepted.get(t, 0) for t in tiers}, len(rows))
