"""Does tuning on pseudo-labels give the cascade that tuning on real grades gives?

For a labelled file: on each train part, replace `correct` by agreement with the
reference model (the most accurate on that train part, or the one named), fit a
policy to a target on those pseudo-labels, and fit the same policy to the same
target on the real grades; replay both on the test part and score them with the
REAL grades. Train/test files use their split; a file with one split is
cross-fitted (k folds; each test row scored once, by knobs that never saw it).

Targets: budgets between the cheapest single model's and the reference's train
cost (the same for both fits), and, for a policy with a risk-controlled tuner,
the Learn-then-Test bound: with real grades it certifies "the cascade is wrong
where the reference is right on at most alpha of traffic"; with pseudo-labels
"the cascade disagrees with the reference on at most alpha of traffic".
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from router.core.comparators import Comparator
from router.core.policies import make_policy
from router.core.policy import tier_infos
from router.core.records import Dataset, Record, load_dataset

from .evaluate import VARIANTS
from .labelled import Labelled, build_table, prepare
from .metrics import summarize
from .pseudo_labels import PseudoReport, most_accurate, pseudo_label
from .simulate import Outcome, TierModel, simulate
from .tuners import RISK_TUNERS, RiskSpec, fit
from .tuning import NotApplicable, Target, TuningError

BUDGET_FRACTIONS = (0.25, 0.5, 0.75)
AIM_POINTS, AIM_COST_RATIO = 0.01, 1.1


@dataclass
class _Run:
    outcomes: dict[str, list[Outcome]]  # "real" | "pseudo" -> test outcomes over every fold
    errors: dict[str, str]


def _options(policy: str, L: Labelled) -> tuple[str, dict[str, Any]]:
    variant = VARIANTS.get(policy)
    name = variant.policy if variant else policy
    opts = dict(variant.options) if variant else {}
    if name in ("threshold", "rational") and L.signal is not None:
        opts["signal"] = L.signal
    return name, opts


def _targets(policy: str, train: Sequence[Record], tiers: Sequence[TierModel], reference: str,
             risk: RiskSpec | None, fractions: Sequence[float]) -> list[tuple[str, Target, dict[str, Any]]]:
    cost = build_table(train, tiers).mean_cost()
    c_lo = float(cost.min())
    c_ref = float(cost[[t.model for t in tiers].index(reference)])
    out = [(f"budget {f:.0%} of the way to the reference's cost", Target.budget(c_lo + f * (c_ref - c_lo)), {})
           for f in fractions]
    name = VARIANTS[policy].policy if policy in VARIANTS else policy
    if risk is not None and name in RISK_TUNERS:
        spec = RiskSpec(risk.alpha, risk.delta, risk.procedure, risk.learn_fraction, reference, risk.seed)
        out.append((f"risk bound {risk.alpha:g} at delta {risk.delta:g} (Learn then Test)", Target.match_best(),
                    {"risk": spec}))
    return out


def _parts(L: Labelled, k: int, seed: int) -> list[tuple[list[Record], list[Record]]]:
    return [L.train_test()] if L.split_mode() == "train/test" else L.folds(k, seed)


def compare(data: str | Path | Dataset, comparator: Comparator, *, policies: Sequence[str] = ("threshold",),
            risk: RiskSpec | None = RiskSpec(0.05, 0.1), fractions: Sequence[float] = BUDGET_FRACTIONS,
            reference: str | None = None, models: Sequence[str] | None = None, unparsed: str = "disagree",
            k: int = 5, seed: int = 0) -> dict[str, Any]:
    ds = data if isinstance(data, Dataset) else load_dataset(data)
    L = prepare(ds, models=models)
    parts = _parts(L, k, seed)
    runs: dict[tuple[str, str], _Run] = {}
    reports: list[PseudoReport] = []
    for train, test in parts:
        ref = reference or most_accurate(train, L.models)
        tiers = L.tiers(train)
        relabelled, rep = pseudo_label(train, ref, comparator, models=L.models, unparsed=unparsed)
        reports.append(rep)
        pseudo_rows = prepare(Dataset(ds.path, relabelled, ds.models), models=L.models, signal=L.signal).records
        for policy in policies:
            name, opts = _options(policy, L)
            for label, target, extra in _targets(policy, train, tiers, ref, risk, fractions):
                run = runs.setdefault((policy, label), _Run({"real": [], "pseudo": []}, {}))
                for kind, rows in (("real", train), ("pseudo", pseudo_rows)):
                    if kind in run.errors:
                        continue
                    try:
                        fitted = fit(name, rows, tiers, target, **opts, **extra)
                    except (NotApplicable, TuningError) as e:
                        run.errors[kind] = str(e)
                        continue
                    run.outcomes[kind] += simulate(make_policy(fitted.policy, tier_infos(tiers), fitted.params),
                                                   tiers, test)
    rows = []
    for (policy, label), run in runs.items():
        row: dict[str, Any] = {"policy": policy, "target": label}
        for kind in ("real", "pseudo"):
            if kind in run.errors:
                row[kind] = {"error": run.errors[kind]}
            else:
                s = summarize(run.outcomes[kind])
                row[kind] = {"accuracy": s["accuracy"], "cost": s["cost"], "rows": s["rows"]}
        if "accuracy" in row["real"] and "accuracy" in row["pseudo"]:
            gap = row["pseudo"]["accuracy"] - row["real"]["accuracy"]
            ratio = row["pseudo"]["cost"] / row["real"]["cost"] if row["real"]["cost"] > 0 else None
            row["accuracy_gap"] = gap
            row["cost_ratio"] = ratio
            row["aim_met"] = gap >= -AIM_POINTS and (ratio is None or ratio <= AIM_COST_RATIO)
        rows.append(row)
    return {"file": L.name, "split": L.split_mode() if len(parts) == 1 else f"{len(parts)}-fold cross-fit",
            "cost_unit": L.cost_unit, "signal": L.signal, "pseudo_labels": [r.as_json() for r in reports],
            "results": rows}


def render(res: dict[str, Any]) -> str:
    refs = sorted({r["reference"] for r in res["pseudo_labels"]})
    rep = res["pseudo_labels"][0]
    lines = [f"{res['file']} ({res['split']}; cost in {res['cost_unit']}; signal {res['signal']}): "
             f"pseudo-labels = agreement with {', '.join(refs)} ({rep['comparator']}), "
             f"scored on the real grades of the test rows"]
    for r in res["pseudo_labels"]:
        unread = sum(r["unparsed"].values())
        lines.append(f"  pseudo-labelled {r['labelled_rows']}/{r['rows']} train rows; reference unreadable on "
                     f"{r['reference_unreadable']}; {unread} unreadable candidate answers "
                     f"({'graded as disagreement' if r['unparsed_mode'] == 'disagree' else 'skipped'})")
    lines.append(f"  {'policy':<14} {'target':<52} {'real: acc':>9} {'cost':>10} {'pseudo: acc':>11} {'cost':>10} "
                 f"{'gap pts':>8} {'cost x':>7}  aim")
    for r in res["results"]:
        def cell(d: dict) -> str:
            return f"{d['accuracy']:>9.4f} {d['cost']:>10.4g}" if "accuracy" in d else f"{'n/a':>9} {'':>10}"
        gap = f"{100 * r['accuracy_gap']:>+8.2f}" if "accuracy_gap" in r else f"{'':>8}"
        ratio = f"{r['cost_ratio']:>7.3f}" if r.get("cost_ratio") is not None else f"{'':>7}"
        aim = ("met" if r["aim_met"] else "NOT met") if "aim_met" in r else "-"
        lines.append(f"  {r['policy']:<14} {r['target']:<52} {cell(r['real'])} {cell(r['pseudo']):>22} {gap} {ratio}  {aim}")
        for kind in ("real", "pseudo"):
            if "error" in r[kind]:
                lines.append(f"    {kind}: {r[kind]['error']}")
    lines.append(f"  aim: pseudo-label tuning within {100 * AIM_POINTS:g} point of accuracy of real-grade tuning at "
                 f"no more than {AIM_COST_RATIO:g}x its cost (both scored on real test grades)")
    return "\n".join(lines)
