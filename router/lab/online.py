"""Prequential ("test then train") evaluation: a labelled file replayed as a stream.

What a team sees in its first weeks with a router: the rows of the file (every
scorable row, whatever its split) arrive in a seeded order; each row is first
answered by the policy in force (replayed with `router.lab.simulate`, through the
workers' decision code) and only then does its label join the labelled rows. Every
`every` rows the policy is re-tuned on all the rows labelled so far (the given
policy, `auto` by default, to the parity target). Before the first re-tune, and
while fewer than `min_rows` rows are labelled, the team runs the reference below.

The reference at each moment is the model a team without routing would deploy
given what it knows then: the best single model on the rows labelled so far; with
no labels, the dearest model (the one a team trusts before any evidence). Both the
policy and this reference are scored on every row as it arrives; the result has
their cumulative accuracy and cost along the stream (`points`, one per block),
each block's policy and its re-tune time, and the same figures for the best
single model of the whole file in hindsight.

`start` rows of the stream can be labelled before it begins (a seed set: they are
tuned on, never scored).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from threadpoolctl import threadpool_limits

from router.core.policies import POLICIES, make_policy
from router.core.policy import tier_infos
from router.core.records import Record

from .labelled import DataError, Labelled, build_table, prepare
from .simulate import TierModel, simulate
from .tuners import confirm, make_tuner
from .tuning import NotApplicable, Target, TuningError


def _outcomes(policy: str, params: dict[str, Any], tiers: Sequence[TierModel],
              rows: Sequence[Record]) -> tuple[np.ndarray, np.ndarray]:
    outs = simulate(make_policy(policy, tier_infos(tiers), params), tiers, rows)
    return (np.array([o.correct if o.status == "succeeded" and o.correct is not None else 0.0 for o in outs]),
            np.array([o.cost_usd for o in outs]))


def _reference(labelled: Sequence[Record], L: Labelled, tiers: Sequence[TierModel]) -> str:
    """The best single model on the labelled rows (ties: the cheaper); none yet: the dearest."""
    if not labelled:
        return _dearest(L, tiers)
    tb = build_table(labelled, tiers)
    acc, cost = tb.accuracy(), tb.mean_cost()
    return tiers[min(range(len(tiers)), key=lambda i: (-acc[i], cost[i], i))].name


def _dearest(L: Labelled, tiers: Sequence[TierModel]) -> str:
    if L.cost_unit == "strong_calls":
        return next((t.name for t in tiers if t.price.per_call > 0), tiers[-1].name)
    cost = build_table(L.records, tiers).mean_cost()
    return tiers[int(np.argmax(cost))].name


def prequential(data: str | Path, policy: str = "auto", *, start: int = 0, every: int = 100, min_rows: int = 40,
                seed: int = 0, models: Sequence[str] | None = None, signal: str | None = None,
                tolerance: float = 0.005, options: dict[str, Any] | None = None,
                progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    with threadpool_limits(limits=1):
        return _prequential(data, policy, start=start, every=every, min_rows=min_rows, seed=seed, models=models,
                            signal=signal, tolerance=tolerance, options=options or {}, progress=progress)


def _prequential(data: str | Path, policy: str, *, start: int, every: int, min_rows: int, seed: int,
                 models: Sequence[str] | None, signal: str | None, tolerance: float, options: dict[str, Any],
                 progress: Callable[[str], None] | None) -> dict[str, Any]:
    from .evaluate import VARIANTS  # deferred: evaluate imports this module (--online), a cycle at the top

    if every < 1:
        raise DataError("--retune-every must be at least 1")
    L = prepare(data, models=models, signal=signal)
    n = len(L.records)
    if not 0 <= start < n:
        raise DataError(f"{L.name}: --start-labels must be in 0..{n - 1}, got {start}")
    order = np.random.default_rng(seed).permutation(n)
    rows = [L.records[i] for i in order]
    seen, stream = list(rows[:start]), rows[start:]
    # prices: in strong_calls mode the strong model is the most accurate on the whole file (the cost unit
    # must not move along the stream; the choice of it uses no policy's knobs)
    tiers = L.tiers(L.records)
    variant = VARIANTS.get(policy)
    fam = variant.policy if variant else policy
    if fam not in POLICIES and fam != "auto":
        raise TuningError(f"unknown policy {policy!r}")
    opts = dict(variant.options) if variant else {}
    if fam in ("threshold", "rational", "auto") and L.signal is not None:
        opts.setdefault("signal", L.signal)
    if fam == "auto":
        opts.setdefault("seed", seed)
        opts.setdefault("tolerance", tolerance)
    opts.update(options)

    all_tb = build_table(L.records, tiers)
    acc_all, cost_all = all_tb.accuracy(), all_tb.mean_cost()
    hind = tiers[min(range(len(tiers)), key=lambda i: (-acc_all[i], cost_all[i], i))].name

    pc, pk, rc, rk, hc, hk = [], [], [], [], [], []
    points, blocks = [], []
    t_total = time.perf_counter()
    for b0 in range(0, len(stream), every):
        block = stream[b0:b0 + every]
        ref = _reference(seen, L, tiers)
        t0 = time.perf_counter()
        chosen: dict[str, Any]
        if len(seen) < min_rows:
            fam_now, params = "single", {"tier": ref}
            chosen = {"policy": "single", "label": f"{ref} (reference)",
                      "why": (f"{len(seen)} labelled rows (< {min_rows}): the reference alone"
                              if seen else "no labels yet: the dearest model")}
        else:
            try:
                table = build_table(seen, tiers)
                fitted = confirm(make_tuner(fam, table, tier_infos(tiers), **opts).select(Target.match_best()),
                                 seen, tiers)
                fam_now, params = fitted.policy, fitted.params
                a = fitted.search.get("auto") if fitted.search else None
                chosen = {"policy": fam_now, "train_accuracy": round(fitted.train_accuracy, 6),
                          "train_cost": float(f"{fitted.train_cost:.6g}")}
                chosen["label"] = (a["chosen"] if a else policy) + (f" {params['tier']}" if fam_now == "single" else "")
                if a:
                    chosen.update({"auto": a["chosen"], "operating_point": a["operating_point"], "why": a["why"]})
            except (NotApplicable, TuningError) as e:
                fam_now, params = "single", {"tier": ref}
                chosen = {"policy": "single", "label": f"{ref} (reference)",
                          "why": f"{policy} could not be tuned on {len(seen)} rows ({e}): "
                                                     "the reference alone"}
        secs = time.perf_counter() - t0
        a, c = _outcomes(fam_now, params, tiers, block)
        ra, rcost = _outcomes("single", {"tier": ref}, tiers, block)
        ha, hcost = _outcomes("single", {"tier": hind}, tiers, block)
        pc.append(a)
        pk.append(c)
        rc.append(ra)
        rk.append(rcost)
        hc.append(ha)
        hk.append(hcost)
        seen += block  # the block's labels arrive after it was answered
        P, K, R, RK, H, HK = map(np.concatenate, (pc, pk, rc, rk, hc, hk))
        m = len(P)
        blocks.append({"rows": [start + b0 + 1, start + b0 + len(block)], "labelled_before": len(seen) - len(block),
                       "reference": ref, "tune_seconds": round(secs, 2), **chosen,
                       "block_accuracy": _r(a.mean()), "block_cost": _r(c.mean()),
                       "block_reference_accuracy": _r(ra.mean()), "block_reference_cost": _r(rcost.mean())})
        points.append({"rows": m, "accuracy": _r(P.mean()), "cost": _r(K.mean()),
                       "reference_accuracy": _r(R.mean()), "reference_cost": _r(RK.mean()),
                       "accuracy_delta": _r(P.mean() - R.mean()),
                       "cost_ratio": _r(K.mean() / RK.mean()) if RK.mean() > 0 else None,
                       "hindsight_accuracy": _r(H.mean()), "hindsight_cost": _r(HK.mean())})
        if progress:
            progress(f"online: {m} of {len(stream)} rows, {chosen['policy']}")
    return {
        "data": L.name, "path": L.path, "mode": "online", "policy": policy, "cost_unit": L.cost_unit,
        "signal": L.signal, "seed": seed, "start_labels": start, "retune_every": every, "min_rows": min_rows,
        "stream_rows": len(stream), "rows": {"file": L.total_rows, "scored": n, "dropped": L.dropped["rows"]},
        "hindsight": {"name": hind, "accuracy": _r(acc_all[tiers.index(next(t for t in tiers if t.name == hind))]),
                      "note": "the best single model over every row of the file, known only after the fact"},
        "points": points, "blocks": blocks, "seconds": round(time.perf_counter() - t_total, 1),
    }


def _r(x: float) -> float:
    return float(f"{float(x):.6g}")


def render(res: dict[str, Any]) -> str:
    usd = res["cost_unit"] == "usd"
    cfmt = ".3e" if usd else ".4f"
    L = [f"data: {res['data']}   online (prequential): {res['stream_rows']} rows in a seeded order (seed "
         f"{res['seed']}), {res['start_labels']} labelled before the stream; {res['policy']} re-tuned every "
         f"{res['retune_every']} rows on the rows labelled so far (the reference alone below {res['min_rows']})",
         "reference = the best single model on the rows labelled so far (no labels: the dearest model); every "
         "row is answered before its label is used",
         "",
         f"{'rows':>6}{'labelled':>9}  {'policy in force':<34}{'cum acc':>8}{'ref acc':>8}{'Δacc':>8}"
         f"{'cum cost':>11}{'ratio':>7}{'tune s':>8}"]
    for p, b in zip(res["points"], res["blocks"]):
        what = b["label"]
        L.append(f"{p['rows']:>6}{b['labelled_before']:>9}  {what[:33]:<34}{p['accuracy']:>8.4f}"
                 f"{p['reference_accuracy']:>8.4f}{p['accuracy_delta']:>+8.4f}{format(p['cost'], cfmt):>11}"
                 f"{(p['cost_ratio'] if p['cost_ratio'] is not None else float('nan')):>7.3f}{b['tune_seconds']:>8.1f}")
    h = res["hindsight"]
    last = res["points"][-1]
    L.append(f"hindsight: {h['name']} over the whole stream {last['hindsight_accuracy']:.4f} at "
             f"{format(last['hindsight_cost'], cfmt)} per query; the whole replay took {res['seconds']:.0f} s")
    L.append("cum acc / cum cost: over every row answered so far; ratio = cum cost / the reference's on the same rows")
    return "\n".join(L)
