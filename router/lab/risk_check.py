"""Does the risk-controlled tuner keep its promise? Re-split a labelled file many
times at random into train and test, tune on train with Learn then Test, and
count the re-splits whose test loss against the reference exceeds the bound:
that share should stay at or below delta (`cascade bench risk`).

Every row of the file (all its splits) is pooled; each re-split draws `train_rows`
of them for tuning (default: the size of the file's train split when it also has
a test split, else half) and scores the rest. The test loss is the mean of
max(0, reference - cascade) over the test rows, the reference being the tier the
tuner fixed on its learn part.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from router.core.policy import tier_infos
from router.lab.labelled import build_table, prepare
from router.lab.risk import RiskError
from router.lab.tuners.ltt import RiskSpec, losses_against, subtable
from router.lab.tuners.threshold_ltt import RiskControlledThreshold, threshold_rows
from router.lab.tuning import Target


def coverage(data: str | Path, spec: RiskSpec, *, resplits: int = 200, train_rows: int | None = None,
             seed: int = 0, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    L = prepare(data)
    if L.signal is None:
        raise RiskError(f"{L.name}: no confidence signal is recorded, so a threshold cascade cannot run")
    rows = L.records
    splits = {r.split for r in rows}
    if train_rows is None:
        train_rows = sum(r.split == "train" for r in rows) if {"train", "test"} <= splits else len(rows) // 2
    if not 0 < train_rows < len(rows):
        raise RiskError(f"{L.name}: train_rows must lie between 1 and {len(rows) - 1}, got {train_rows}")
    tiers = L.tiers(rows)
    infos = tier_infos(tiers)
    table = build_table(rows, tiers)
    rng = np.random.default_rng(seed)
    loss, ratio, delta_ref, delta_best, certified = [], [], [], [], []
    for b in range(resplits):
        perm = rng.permutation(len(rows))
        tr, te = subtable(table, np.sort(perm[:train_rows])), subtable(table, np.sort(perm[train_rows:]))
        tuner = RiskControlledThreshold(tr, infos, risk_spec=RiskSpec(spec.alpha, spec.delta, spec.procedure,
                                                                      spec.learn_fraction, spec.reference,
                                                                      seed=int(rng.integers(2**31)),
                                                                      steps=spec.steps),
                                        signal=L.signal)
        fitted = tuner.select(Target.match_best())
        names = {t.name: t.index for t in infos}
        chain = tuple(names[c] for c in fitted.params["chain"])
        th = tuple(fitted.params["thresholds"][infos[i].name] for i in chain[:-1])
        correct, cost = threshold_rows(te, L.signal, chain, th)
        ref = tuner.ref
        loss.append(float(losses_against(te.correct[ref], correct).mean()))
        ratio.append(float(cost.mean() / te.cost[ref].mean()))
        delta_ref.append(float(correct.mean() - te.correct[ref].mean()))
        delta_best.append(float(correct.mean() - te.accuracy().max()))
        certified.append(fitted.search["risk_control"]["chosen"] == "certified cascade")
        if progress and (b + 1) % 50 == 0:
            progress(f"{L.name}: {b + 1}/{resplits} re-splits")
    loss_a = np.array(loss)
    exceed = float(np.mean(loss_a > spec.alpha + 1e-12))
    cert = np.array(certified)
    return {
        "data": L.name, "rows": len(rows), "train_rows": train_rows, "test_rows": len(rows) - train_rows,
        "resplits": resplits, "alpha": spec.alpha, "delta": spec.delta, "procedure": spec.procedure,
        "exceed_share": exceed, "holds": exceed <= spec.delta,
        "certified_share": float(cert.mean()),
        "mean_test_loss": float(loss_a.mean()), "max_test_loss": float(loss_a.max()),
        "mean_cost_ratio": float(np.mean(ratio)),
        "mean_cost_ratio_certified": float(np.mean(np.array(ratio)[cert])) if cert.any() else None,
        "mean_accuracy_delta_vs_reference": float(np.mean(delta_ref)),
        "mean_accuracy_delta_vs_best_on_test": float(np.mean(delta_best)),
    }


def render(results: Sequence[dict[str, Any]]) -> str:
    head = (f"{'file':<22}{'bound':>7}{'delta':>7}{'exceed':>8}{'holds':>7}{'certified':>11}"
            f"{'test loss':>11}{'cost ratio':>12}{'acc d ref':>11}{'acc d best':>12}")
    lines = [head]
    for r in results:
        lines.append(
            f"{r['data']:<22}{r['alpha']:>7.3g}{r['delta']:>7.3g}{r['exceed_share']:>8.3f}"
            f"{'yes' if r['holds'] else 'NO':>7}{r['certified_share']:>11.3f}{r['mean_test_loss']:>11.4f}"
            f"{r['mean_cost_ratio']:>12.3f}{r['mean_accuracy_delta_vs_reference']:>11.4f}"
            f"{r['mean_accuracy_delta_vs_best_on_test']:>12.4f}")
    lines.append("exceed = share of re-splits whose test loss (reference right, cascade wrong) exceeds the bound; "
                 "it should stay <= delta. certified = share where a cascade (not the reference alone) was certified; "
                 "cost ratio = test cost over the reference's; acc d = test accuracy minus the reference's / the best "
                 "single model's on test (means over re-splits).")
    return "\n".join(lines)
