"""Fitting a policy's knobs on labelled data and writing them as a policy file (`cascade tune`).

The rows of one split (or all) are fitted to a target (a budget, an accuracy, the
best single model, or with a risk spec a certified loss bound against a reference
model) by the policy's tuner; the file records the knobs and what they were fitted
on, including the profile `cascade status --drift` compares live traffic with.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from router.core.policies import make_policy
from router.core.policy import tier_infos
from router.core.policyfile import TunedPolicy, write_policy_file

from . import drift
from .evaluate import VARIANTS
from .labelled import build_table, prepare
from .pseudo_labels import pseudo_reference
from .simulate import simulate
from .tuners import RiskSpec, confirm, make_tuner
from .tuners.auto import describe as describe_auto
from .tuning import Fitted, Target, TuningError

# the policies whose tuner searches chains: only they take a chain, its length bounds and pruning
CHAIN_SEARCH = ("threshold", "rational")


def policy_name(policy: str) -> str:
    """The policy a name or a variant (threshold-2tier, ...) tunes."""
    variant = VARIANTS.get(policy)
    return variant.policy if variant else policy


def rows_needed_line(rc: dict) -> str:
    """How many rows the bound needs, in words (shared with the evaluator's report)."""
    base = (f"rows: even a cascade with no loss needs {rc['zero_loss_rows']} calibration rows to certify "
            f"{rc['alpha']:g} at delta {rc['delta']:g}")
    need = rc.get("rows_needed")
    if need and need["calibration_rows"] is not None:
        return (base + f"; the cheapest tested cascade with loss rate {need['loss_rate']:.4f} would be certified "
                f"with about {need['calibration_rows']} calibration rows ({need['total_rows']} rows in all)")
    return base


@dataclass
class Tuned:
    """A policy fitted by `tune` and written to its file."""
    policy: TunedPolicy
    fitted: Fitted
    cost_unit: str
    best_single: tuple[str, float, float]  # on the fit rows: tier, accuracy, cost
    labels: str | None  # the rows' `labels` (pseudo-labels: agreement with a reference model)
    tier_names: dict[str, str] = field(default_factory=dict)  # model -> tier, as asked


def tune(data: str | Path, policy: str, target: Target, out: str | Path, *, fit_split: str = "train",
         models: Sequence[str] | None = None, signal: str | None = None, tier_names: dict[str, str] | None = None,
         chain: Sequence[str] | None = None, min_tiers: int | None = None, max_tiers: int | None = None,
         prune: bool = True, seed: int = 0, risk: RiskSpec | None = None, reference: str | None = None) -> Tuned:
    """Fit POLICY (a name or a variant) on the `fit_split` rows of DATA ("all": every
    row) to `target`, and write {"name", "params", "fitted"} to OUT."""
    names = dict(tier_names or {})
    L = prepare(data, models=list(models) if models is not None else None, signal=signal)
    unknown = [m for m in names if m not in L.models]
    if unknown:
        raise TuningError(f"--tier-names: model(s) {unknown} are not evaluated; models: {', '.join(L.models)}")
    if fit_split == "all":
        rows = list(L.records)
    else:
        rows = [r for r in L.records if r.split == fit_split]
        if not rows:
            present = sorted({str(r.split) for r in L.records})
            raise TuningError(
                f"{L.name} has no {fit_split!r} rows to fit on (splits: {', '.join(present)}); "
                f"use --fit-split with one of them, or --fit-split all to fit on every row")
    variant = VARIANTS.get(policy)
    name = variant.policy if variant else policy
    opts: dict = dict(variant.options) if variant else {}
    if name in CHAIN_SEARCH:
        if L.signal is not None:
            opts["signal"] = L.signal
        if chain is not None:
            opts = {"signal": opts.get("signal"), "chain": list(chain)}
        if min_tiers is not None:
            opts["min_tiers"] = min_tiers
        if max_tiers is not None:
            opts["max_tiers"] = max_tiers
        if not prune:
            opts["prune"] = False
    elif chain is not None or min_tiers is not None or max_tiers is not None or not prune:
        raise TuningError("--chain, --min-tiers, --max-tiers and --no-prune apply to the threshold policy")
    if name == "random":
        opts["seed"] = seed
    if name == "auto":  # the family and its knobs chosen by nested cross-validation (router.lab.tuners.auto)
        opts["seed"] = seed
        if reference and risk is None:
            opts["reference"] = names.get(reference, reference)
        if L.signal is not None:
            opts["signal"] = L.signal
    if risk is not None:
        opts["risk"] = risk
    tiers = L.tiers(rows, names)
    table = build_table(rows, tiers)
    labels = next((r.labels for r in rows if r.labels), None)
    try:
        fitted = confirm(make_tuner(name, table, tier_infos(tiers), **opts).select(target), rows, tiers)
    except TuningError as e:
        raise TuningError(f"{L.name}: {policy}: {e}") from None
    acc, cost = table.accuracy(), table.mean_cost()
    b = max(range(len(tiers)), key=lambda i: (acc[i], -cost[i]))
    # what the tuned tiers saw on these rows, for `cascade status --drift`
    replayed = simulate(make_policy(fitted.policy, tier_infos(tiers), fitted.params), tiers, rows)
    tuned = TunedPolicy(
        name=fitted.policy,
        params=fitted.params,
        fitted={
            "data": L.path,
            "target": target.as_json() | ({"resolved_accuracy": fitted.target_accuracy}
                                          if target.kind == "match_best" else {}),
            "split": fit_split,
            "train_rows": fitted.train_rows,
            "train_accuracy": fitted.train_accuracy,
            "train_cost": fitted.train_cost,
            "cost_unit": L.cost_unit,
            "best_single_train": {"tier": tiers[b].name, "accuracy": float(acc[b]), "cost": float(cost[b])},
            "tiers": {t.name: t.model for t in tiers},
            "signal": L.signal,
            **({"labels": labels} if labels else {}),
            **({"search": fitted.search} if fitted.search else {}),
            **({"note": fitted.note} if fitted.note else {}),
            "reference": drift.profile(replayed, table, L.signal),
        },
    )
    write_policy_file(out, tuned)
    return Tuned(tuned, fitted, L.cost_unit, (tiers[b].name, acc[b], cost[b]), labels, names)


def render(t: Tuned) -> str:
    """What `cascade tune` prints: the knobs, the fit, what the labels mean, and the
    guarantee a risk-controlled tuner certified."""
    fitted, names = t.fitted, t.tier_names
    best, best_acc, best_cost = t.best_single
    unit = "USD" if t.cost_unit == "usd" else "strong-call share"
    lines = [f"{fitted.policy}: {json.dumps(fitted.params)}",
             f"train ({fitted.train_rows} rows): accuracy {fitted.train_accuracy:.4f}, cost {fitted.train_cost:.6g} "
             f"{unit} per query; best single on train: {best} {best_acc:.4f} at {best_cost:.6g}"]
    if fitted.search and "auto" in fitted.search:
        lines.append(describe_auto(fitted.search["auto"]))
    top = pseudo_reference(t.labels)
    if t.labels:
        lines.append(f"labels: {t.labels}: every accuracy here is agreement with "
                     f"{names.get(top, top) if top else 'that model'}, not accuracy against the truth")
    rc = fitted.search.get("risk_control") if fitted.search else None
    if rc is not None:
        if top is not None and rc["reference"] == names.get(top, top) and "upper_bound" in rc:
            lines.append(f"guarantee: the cascade agrees with the top model {rc['reference']} on at least "
                         f"{1 - rc['alpha']:.4g} of traffic, with probability {1 - rc['delta']:g} (traffic "
                         f"exchangeable with the calibration rows)")
        lines.append(f"guarantee{' (as the tuner states it)' if top else ''}: {fitted.note}")
        lines.append(f"assumption: {rc['assumption']}")
        if "upper_bound" in rc:
            lines.append(f"calibration: {rc['calibration_losses']:g} losses in {rc['calibration_rows']} rows, "
                         f"p-value {rc['p_value']:.3g}, risk <= {rc['upper_bound']:.4f} at delta {rc['delta']:g}")
        lines.append(rows_needed_line(rc))
    return "\n".join(lines)
