"""Offline evaluation of policies on labelled traffic (benchmarks format).

For every policy: knobs are fitted on the train split only (`router.tuning`),
then the fitted policy is replayed on every test query with `router.simulate`,
i.e. through `router.cascade.start/step`, the code the workers run. Every
reported number comes from those simulated outcomes (the vectorised search in
tuning only chooses knobs). Per policy:

- parity: knobs fitted to reach, on train, the train accuracy of the best single
  model on train (`Target.match_best`); its test accuracy, accuracy_delta (minus
  the test accuracy of the best single model on test), cost and cost_ratio (over
  that model's test cost); beside it random routing fitted on train to the same
  train cost ("random at matched cost").
- frontier: knobs fitted on train to `points` budgets from the cheapest to the
  most expensive single model's train cost (half evenly spaced, half
  geometrically spaced in between), each scored on test; aiq from those points;
  with cost = share of strong calls also apgr, cpt50, cpt80 (`router.metrics`).

Baselines in the same run: every single model, random routing at matched cost,
and the best two-tier threshold cascade. Files with only one split are scored by
k-fold cross-fitting (see `router.labelled`); the output says so.
"""
from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from threadpoolctl import threadpool_limits

from router.core.live_signals import CALLS_FOR
from router.core.policies import POLICIES, make_policy
from router.core.policy import tier_infos
from router.core.records import Record

from . import metrics
from .labelled import Labelled, Table, build_table, prepare
from .simulate import Outcome, TierModel, simulate
from .tuners import RISK_TUNERS, TUNERS, RiskSpec, confirm, make_tuner
from .tuners.auto import describe as describe_auto
from .tuning import NotApplicable, Target, TargetUnreachable, TuningError


@dataclass(frozen=True)
class Variant:
    name: str
    policy: str
    options: dict[str, Any]
    description: str
    baseline: bool = False


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("threshold", "threshold", {"min_tiers": 2, "max_tiers": 4},
                "threshold cascade; chain of 2-4 tiers and thresholds fitted on train"),
        Variant("threshold-3plus", "threshold", {"min_tiers": 3, "max_tiers": 4},
                "threshold cascade restricted to chains of 3-4 tiers"),
        Variant("threshold-2tier", "threshold", {"min_tiers": 2, "max_tiers": 2},
                "baseline: the best two-tier threshold cascade", baseline=True),
        Variant("random", "random", {}, "baseline: random routing between single models", baseline=True),
        Variant("single", "single", {}, "one model for every query, chosen on train"),
        Variant("auto", "auto", {}, "the policy family and its knobs chosen by nested cross-validation on the "
                                    "train rows alone (router/lab/tuners/auto.py)"),
        Variant("routellm-mf", "routellm", {"scorer": "mf"}, "RouteLLM matrix factorisation, N models"),
        Variant("routellm-sw", "routellm", {"scorer": "sw"}, "RouteLLM similarity-weighted ranking, N models"),
        Variant("routellm-classifier", "routellm", {"scorer": "linear"},
                "RouteLLM-style classifier on the query vector, N models"),
        # live signals (extra calls through the tier's backend; files that record them: data/local-bench)
        Variant("automix-threshold", "threshold", {"signal": "p_verify", "min_tiers": 2, "max_tiers": 4},
                "AutoMix, threshold meta-verifier on the k-sample self-verification probability (p_verify)"),
        Variant("automix-pomdp", "automix", {"signal": "p_verify"},
                "AutoMix, POMDP meta-verifier on the k-sample self-verification probability (p_verify)"),
        Variant("semantic-entropy", "threshold", {"signal": "neg_semantic_entropy", "min_tiers": 2, "max_tiers": 4},
                "Semantic-entropy routing: threshold cascade on minus the entropy of k samples' meaning clusters"),
        Variant("self-ref", "threshold", {"signal": "self_ref", "min_tiers": 2, "max_tiers": 4},
                "Self-REF (prompt-based): threshold cascade on P(certain) of the confidence token"),
    )
}
LIVE = ["automix-threshold", "automix-pomdp", "semantic-entropy", "self-ref"]
BASELINES = ("threshold-2tier", "random")
ROUTELLM = ["routellm-mf", "routellm-sw", "routellm-classifier"]


def risk_variants(risk: RiskSpec) -> list[Variant]:
    """`<policy>-ltt`: the policy's knobs certified by Learn then Test at `risk`."""
    return [Variant(f"{p}-ltt", p, {"risk": risk},
                    f"{p}: knobs certified by Learn then Test: loss against the reference <= {risk.alpha:g} "
                    f"with probability >= {1 - risk.delta:g}") for p in RISK_TUNERS]


def variants_for(policy: str, risk: RiskSpec | None = None) -> list[Variant]:
    """The entries a `--policy` value evaluates, baselines appended; with `risk`,
    the risk-controlled variant of every policy that has one (for `all`, or that policy)."""
    if risk is not None:
        extra = [v for v in risk_variants(risk) if policy in ("all", v.policy, v.name)]
        if not extra:
            raise TuningError(f"policy {policy!r} has no risk-controlled tuner; those that have one: "
                              f"{', '.join(RISK_TUNERS)}")
        base = variants_for(extra[0].policy if policy == extra[0].name else policy)
        return [v for v in base if not v.baseline] + extra + [v for v in base if v.baseline]
    if policy == "all":
        skip = ("threshold", "single", "random", "every-tier")  # every-tier: calibration's job plan, not a router
        names = ["threshold", "threshold-3plus", "single"] + [p for p in POLICIES if p not in skip]
        names[names.index("routellm"):names.index("routellm") + 1] = ROUTELLM
        names[names.index("automix") + 1:names.index("automix") + 1] = LIVE
        names.append("auto")
    elif policy == "live":
        names = ["threshold", "single"] + LIVE
    elif policy == "threshold":
        names = ["threshold", "threshold-3plus"]
    elif policy == "routellm":
        names = list(ROUTELLM)
    elif policy in VARIANTS or policy in POLICIES:
        names = [policy]
    else:
        known = sorted(set(POLICIES) | set(VARIANTS))
        near = difflib.get_close_matches(policy, known, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise TuningError(f"unknown policy {policy!r}{hint}; known: all, {', '.join(known)}")
    names += [b for b in BASELINES if b not in names]
    return [VARIANTS.get(n) or Variant(n, n, {}, POLICIES[n].summary + ("" if n in TUNERS else " (generic grid tuning)"))
            for n in names]


def budgets(c_lo: float, c_hi: float, points: int) -> list[float]:
    """`points` budgets from c_lo to c_hi: half evenly spaced (ends included),
    half geometrically spaced strictly between (all even when c_lo <= 0)."""
    if points < 2:
        raise ValueError("need at least 2 frontier points")
    if c_lo <= 0 or c_hi <= c_lo:
        return [float(x) for x in np.linspace(c_lo, c_hi, points)]
    n_lin = points // 2
    lin = np.linspace(c_lo, c_hi, n_lin)
    geo = np.geomspace(c_lo, c_hi, points - n_lin + 2)[1:-1]
    return [float(x) for x in np.sort(np.concatenate([lin, geo]))]


@dataclass
class _Fold:
    tiers: list[TierModel]
    train_table: Table
    test_table: Table
    test: list[Record]
    budgets: list[float]
    best_train: tuple[str, float]
    strong: str | None
    singles: list[list[Outcome]]
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)


def _key(policy: str, params: dict[str, Any]) -> str:
    return policy + json.dumps(params, sort_keys=True)


def _run_fold(L: Labelled, train: list[Record], test: list[Record], variants: Sequence[Variant],
              points: int, seed: int, tolerance: float = 0.005) -> _Fold:
    tiers = L.tiers(train)
    infos = tier_infos(tiers)
    train_table = build_table(train, tiers)
    test_table = build_table(test, tiers)
    live_tables: dict[str, Table] = {}
    cache: dict[str, list[Outcome]] = {}

    def run(policy: str, params: dict[str, Any]) -> list[Outcome]:
        k = _key(policy, params)
        if k not in cache:
            cache[k] = simulate(make_policy(policy, infos, params), tiers, test)
        return cache[k]

    singles = [run("single", {"tier": t.name}) for t in tiers]
    acc_tr, cost_tr = train_table.accuracy(), train_table.mean_cost()
    b = min(range(len(tiers)), key=lambda i: (-acc_tr[i], cost_tr[i], i))  # best on train; ties: cheaper
    strong = next((t.model for t in tiers if t.price.per_call > 0), None)
    fold = _Fold(tiers, train_table, test_table, test,
                 budgets(float(cost_tr.min()), float(cost_tr.max()), points),
                 (tiers[b].name, float(acc_tr[b])), strong, singles)
    rnd = make_tuner("random", train_table, infos, seed=seed)
    for v in variants:
        e: dict[str, Any] = {}
        fold.entries[v.name] = e
        try:
            opts = dict(v.options)
            if v.policy == "random":
                opts["seed"] = seed
            if v.policy in ("threshold", "rational", "auto") and L.signal is not None:
                opts.setdefault("signal", L.signal)
            if v.policy == "auto":
                opts.setdefault("seed", seed)
                opts.setdefault("tolerance", tolerance)
            table = train_table
            if opts.get("signal") in CALLS_FOR:
                # the search sees the extra calls' cost (on every tier: a little high for the last of a
                # chain, which makes none); the figures below are simulated, and exact
                sig = opts["signal"]
                if sig not in live_tables:
                    live_tables[sig] = build_table(train, tiers, signals=(sig,))
                table = live_tables[sig]
                if not np.isfinite(table.conf.get(sig, np.array([np.nan]))).any():
                    raise NotApplicable(f"no {sig} recorded (a live signal: record it with `cascade record`)")
            tuner = make_tuner(v.policy, table, infos, **opts)
        except NotApplicable as err:
            e["na"] = str(err)
            continue
        e["search"] = getattr(tuner, "search", None)
        try:
            fp = confirm(tuner.select(Target.match_best()), train, tiers)
            e["parity"] = (fp, run(fp.policy, fp.params))  # a risk tuner may fall back to another policy
            if v.policy != "random":
                fr = rnd.select(Target.budget(max(fp.train_cost, float(cost_tr.min()))))
                e["matched_random"] = (fr, run("random", fr.params))
        except TargetUnreachable as err:
            e["parity_unreachable"] = str(err)
        front = []
        for c in fold.budgets:
            try:
                f = tuner.select(Target.budget(c))
                front.append((f, run(f.policy, f.params)))
            except TargetUnreachable:
                front.append(None)
        e["frontier"] = front
    return fold


def round6(x: float | None, nd: int = 6) -> float | None:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return None
    return float(f"{x:.{nd}g}")


def _summary(outcomes: list[Outcome], tiers: Sequence[TierModel]) -> dict[str, Any]:
    s = metrics.summarize(outcomes, tiers)
    return {"accuracy": round6(s["accuracy"]), "cost": round6(s["cost"]), "latency_ms": round6(s["latency_ms"]),
            "latency_rows": s["latency_rows"], "calls": s["calls"], "rows": s["rows"], "failed": s["failed"],
            "_acc": s["accuracy"], "_cost": s["cost"]}


def _strip(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if not k.startswith("_")}


def evaluate(data: str | Path, policy: str = "all", **kw: Any) -> dict[str, Any]:
    """Evaluate `policy` (a name, a variant or "all") on a labelled file; returns the
    JSON-ready result (see docs/evaluation.md for every key).

    BLAS runs one thread here: the lab's matrices are small, and on a busy 2-core
    machine OpenBLAS threads spinning against each other made the solvers ten times
    slower (rc-mmlu, routellm-classifier: 85 s -> 23 s)."""
    with threadpool_limits(limits=1):
        return _evaluate(data, policy, **kw)


def _evaluate(
    data: str | Path,
    policy: str = "all",
    *,
    folds: int = 5,
    seed: int = 0,
    points: int = 24,
    models: Sequence[str] | None = None,
    signal: str | None = None,
    risk: RiskSpec | None = None,
    tolerance: float = 0.005,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    L = prepare(data, models=models, signal=signal)
    variants = variants_for(policy, risk)
    if L.split_mode() == "train/test":
        train, test = L.train_test()
        splits = [(train, test)]
        other = len(L.records) - len(train) - len(test)
        split: dict[str, Any] = {"mode": "train/test", "train": len(train), "test": len(test)}
        if other:
            split["ignored_rows"] = other
            split["note"] = f"{other} rows in other splits are ignored"
    else:
        splits = L.folds(folds, seed)
        split = {"mode": f"{folds}-fold cross-fitting", "folds": folds, "rows": len(L.records), "seed": seed,
                 "note": f"{L.split_note()}: knobs fitted on {folds - 1} folds, scored on the held-out fold, "
                         f"every row scored once"}
    fold_runs = []
    for i, (tr, te) in enumerate(splits):
        if progress:
            progress(f"fold {i + 1}/{len(splits)}" if len(splits) > 1 else "train/test")
        fold_runs.append(_run_fold(L, tr, te, variants, points, seed, tolerance))
    crossfit = len(fold_runs) > 1
    tiers0 = fold_runs[0].tiers

    # -- single models, oracle, best single (test) ------------------------------
    singles = []
    for m in range(len(L.models)):
        outs = [o for f in fold_runs for o in f.singles[m]]
        s = _summary(outs, tiers0)
        singles.append({"name": L.models[m], **s})
    best = metrics.best_single([{"name": s["name"], "accuracy": s["_acc"], "cost": s["_cost"]} for s in singles])
    correct = np.concatenate([f.test_table.correct for f in fold_runs], axis=1)
    cost = np.concatenate([f.test_table.cost for f in fold_runs], axis=1)
    orc = metrics.oracle(correct, cost)
    c_lo = min(s["_cost"] for s in singles)
    c_hi = max(s["_cost"] for s in singles)
    best_train = [f.best_train for f in fold_runs]
    # the deployable reference: the model the train rows pick (per fold under cross-fitting), scored on test
    dep_outs = []
    for f in fold_runs:
        dep_outs += f.singles[[t.name for t in f.tiers].index(f.best_train[0])]
    dep_s = _summary(dep_outs, tiers0)
    names_dep = list(dict.fromkeys(n for n, _ in best_train))
    deployable = {"name": names_dep[0] if len(names_dep) == 1 else names_dep,
                  "accuracy": dep_s["_acc"], "cost": dep_s["_cost"]}

    strong_names = {f.strong for f in fold_runs}
    rl: dict[str, Any] | None = None
    if L.cost_unit == "strong_calls":
        if len(strong_names) == 1:
            strong = strong_names.pop()
            acc_of = {s["name"]: s["_acc"] for s in singles}
            weak = max((m for m in L.models if m != strong), key=lambda m: acc_of[m], default=None)
            rl = {"strong": strong, "weak": weak, "acc_strong": acc_of[strong],
                  "acc_weak": acc_of[weak] if weak is not None else None}
        else:
            rl = {"note": f"the strongest model differs between folds ({sorted(strong_names)}): apgr undefined"}

    entries = []
    for v in variants:
        per = [f.entries[v.name] for f in fold_runs]
        entry: dict[str, Any] = {"name": v.name, "policy": v.policy, "baseline": v.baseline,
                                 "description": v.description}
        na = next((p["na"] for p in per if "na" in p), None)
        if na is not None:
            entry.update({"applicable": False, "reason": na, "parity": None, "aiq": None, "frontier": []})
            if rl is not None:
                entry.update({"apgr": None, "cpt50": None, "cpt80": None})
            entries.append(entry)
            continue
        entry["applicable"] = True
        search = per[0].get("search")
        if search:
            entry["search"] = search if not crossfit else {**search, "note": "fold 1 of the cross-fitting"}
        # parity
        if crossfit:
            # the knobs each fold chose (None: target not reachable on that fold's tuning rows)
            entry["fold_knobs"] = [
                {"parity": p["parity"][0].params if "parity" in p else None,
                 "frontier": [c[0].params if c is not None else None for c in p["frontier"]]}
                for p in per
            ]
        unreach = next(((f"fold {i + 1}: " if crossfit else "") + p["parity_unreachable"]
                        for i, p in enumerate(per) if "parity_unreachable" in p), None)
        if unreach is not None:
            entry["parity"] = {"reachable": False, "reason": unreach,
                               "target_accuracy": round6(best_train[0][1]) if not crossfit else None}
        else:
            outs = [o for p in per for o in p["parity"][1]]
            s = _summary(outs, tiers0)
            fits = [p["parity"][0] for p in per]
            par: dict[str, Any] = {
                "reachable": True,
                "accuracy": s["accuracy"],
                "accuracy_delta": round6(s["_acc"] - best["accuracy"]),
                "cost": s["cost"],
                "cost_ratio": round6(s["_cost"] / best["cost"]) if best["cost"] > 0 else None,
                "latency_ms": s["latency_ms"],
                "calls": s["calls"],
                "target_accuracy": round6(float(np.mean([f.target_accuracy for f in fits]))),
                "train_accuracy": round6(float(np.mean([f.train_accuracy for f in fits]))),
                "train_cost": round6(float(np.mean([f.train_cost for f in fits]))),
            }
            if best["cost"] <= 0:
                par["cost_ratio_note"] = "undefined: the best single model costs 0"
            par["vs_deployable"] = _against(s, deployable, tolerance)
            par["vs_hindsight"] = _against(s, best, tolerance)
            if crossfit:
                par["params_per_fold"] = [f.params for f in fits]
            else:
                par["params"] = fits[0].params
            if v.policy == "auto":
                par["policy_chosen"] = [f.policy for f in fits] if crossfit else fits[0].policy
                entry["auto"] = [f.search.get("auto") for f in fits]
            if all("matched_random" in p for p in per):
                ro = [o for p in per for o in p["matched_random"][1]]
                rs = _summary(ro, tiers0)
                par["random_at_matched_cost"] = {"accuracy": rs["accuracy"], "cost": rs["cost"],
                                                 "accuracy_delta": round6(rs["_acc"] - best["accuracy"])}
            entry["parity"] = par
            if "risk" in v.options:
                entry["risk"] = _risk_on_test(v.options["risk"], fits, [p["parity"][1] for p in per], fold_runs)
        # frontier
        front = []
        skipped = 0
        for j in range(points):
            cells = [p["frontier"][j] for p in per]
            if any(c is None for c in cells):
                skipped += 1
                continue
            outs = [o for c in cells for o in c[1]]
            s = _summary(outs, tiers0)
            pt: dict[str, Any] = {
                "target_cost": round6(float(np.mean([f.budgets[j] for f in fold_runs]))),
                "cost": s["cost"], "accuracy": s["accuracy"], "calls": s["calls"],
                "_acc": s["_acc"], "_cost": s["_cost"],
            }
            if not crossfit:
                pt["params"] = cells[0][0].params
            front.append(pt)
        pts = [(p["_cost"], p["_acc"]) for p in front]
        entry["frontier"] = [_strip(p) for p in front]
        if skipped:
            entry["frontier_note"] = (f"{skipped} of {points} budgets are below this policy's cheapest configuration"
                                      + (" in at least one fold" if crossfit else ""))
        if pts and c_hi > c_lo:
            entry["aiq"] = round6(metrics.aiq(pts, c_lo, c_hi))
        else:
            entry["aiq"] = None
            entry["aiq_note"] = "no frontier point" if not pts else "the single models' costs span no range"
        if rl is not None:
            if "strong" in rl and rl["weak"] is not None and pts:
                m = metrics.routellm(pts, rl["acc_weak"], rl["acc_strong"])
                entry.update({k: (round6(v) if isinstance(v, float) else v) for k, v in m.items()})
            else:
                entry.update({"apgr": None, "cpt50": None, "cpt80": None,
                              "note": rl.get("note", "needs two models and frontier points")})
        entries.append(entry)

    out: dict[str, Any] = {
        "data": L.name,
        "path": L.path,
        "split": split,
        "cost_unit": L.cost_unit,
        "signal": L.signal,
        "labels": next((r.labels for r in L.records if r.labels), None),
        "rows": {"file": L.total_rows, "scored": len(L.records), "dropped": L.dropped["rows"],
                 "dropped_reasons": L.dropped["reasons"]},
        "confidence_missing": L.signal_missing,
        "points": points,
        "best_single": {"name": best["name"], "accuracy": round6(best["accuracy"]), "cost": round6(best["cost"])},
        "best_single_train": [{"name": n, "accuracy": round6(a)} for n, a in best_train],
        "references": {
            "tolerance": tolerance,
            "deployable": {"name": deployable["name"], "accuracy": round6(deployable["accuracy"]),
                           "cost": round6(deployable["cost"]),
                           "how": "the best single model on the train rows" + (" of each fold" if crossfit else "")
                                  + " (what a user would deploy without routing), scored on test"},
            "hindsight": {"name": best["name"], "accuracy": round6(best["accuracy"]), "cost": round6(best["cost"]),
                          "how": "the best single model on the test rows (known only after the fact)"},
        },
        "at_parity": {ref: _cheapest_at_parity(entries, key) for ref, key in
                      (("deployable", "vs_deployable"), ("hindsight", "vs_hindsight"))},
        "oracle": {"accuracy": round6(orc["accuracy"]), "cost": round6(orc["cost"])},
        "singles": [_strip(s) for s in singles],
        "policies": entries,
    }
    if L.signal_note:
        out["signal_note"] = L.signal_note
    if rl is not None:
        out["routellm"] = {k: (round6(v) if isinstance(v, float) else v) for k, v in rl.items()}
    return out


def _against(s: dict[str, Any], ref: dict[str, Any], tolerance: float) -> dict[str, Any]:
    """A parity point against a reference model's test accuracy and cost."""
    delta = s["_acc"] - ref["accuracy"]
    return {"accuracy_delta": round6(delta),
            "cost_ratio": round6(s["_cost"] / ref["cost"]) if ref["cost"] > 0 else None,
            "at_parity": bool(delta >= -tolerance - 1e-12)}


def _cheapest_at_parity(entries: Sequence[dict[str, Any]], key: str) -> dict[str, Any]:
    """Which policies' parity points are within the tolerance of the reference on test; the
    cheapest of them other than auto, and auto's own standing against it."""
    ok = [e for e in entries if e.get("applicable") and (e.get("parity") or {}).get("reachable")
          and e["parity"][key]["at_parity"] and e["parity"][key]["cost_ratio"] is not None]
    others = [e for e in ok if e["policy"] != "auto"]
    out: dict[str, Any] = {"policies": [e["name"] for e in ok]}
    if others:
        best = min(others, key=lambda e: (e["parity"][key]["cost_ratio"], -e["parity"][key]["accuracy_delta"]))
        out["cheapest_other"] = {"policy": best["name"], "cost_ratio": best["parity"][key]["cost_ratio"],
                                 "accuracy_delta": best["parity"][key]["accuracy_delta"]}
    else:
        out["cheapest_other"] = None
    auto = next((e for e in entries if e["policy"] == "auto"), None)
    if auto is not None and (auto.get("parity") or {}).get("reachable"):
        a = auto["parity"][key]
        out["auto"] = {"at_parity": a["at_parity"], "cost_ratio": a["cost_ratio"],
                       "accuracy_delta": a["accuracy_delta"],
                       "within_0.05_of_cheapest_other": (a["at_parity"] and a["cost_ratio"] is not None and (
                           out["cheapest_other"] is None or a["cost_ratio"] <= out["cheapest_other"]["cost_ratio"] + 0.05))}
    return out


def _risk_on_test(spec: RiskSpec, fits: Sequence[Any], outcomes: Sequence[list[Outcome]],
                  folds: Sequence[_Fold]) -> dict[str, Any]:
    """The certified bound beside the loss against the reference measured on test."""
    losses, refs, certified = [], [], []
    for f, outs, fold in zip(fits, outcomes, folds):
        rc = f.search["risk_control"]
        ref = [t.name for t in fold.tiers].index(rc["reference"])
        got = np.array([o.correct if o.correct is not None else 0.0 for o in outs])
        losses.append(np.clip(fold.test_table.correct[ref] - got, 0.0, 1.0))
        refs.append(rc["reference"])
        certified.append(rc["chosen"] == "certified cascade")
    loss = float(np.concatenate(losses).mean())
    return {"alpha": spec.alpha, "delta": spec.delta, "procedure": spec.procedure, "reference": refs[0] if
            len(set(refs)) == 1 else refs, "certified": all(certified), "test_loss": round6(loss),
            "within_bound": loss <= spec.alpha, "guarantee": fits[0].note,
            "calibration": {k: fits[0].search["risk_control"].get(k) for k in
                            ("calibration_rows", "calibration_losses", "p_value", "upper_bound", "zero_loss_rows",
                             "rows_needed")}}


# -- text rendering -----------------------------------------------------------
def _f(x: Any, spec: str, width: int) -> str:
    if x is None:
        return "-".rjust(width)
    return format(x, spec).rjust(width)


def auto_line(entry: dict[str, Any]) -> str:
    """What auto chose on each fold's train rows, why, what nested CV estimated and what it took."""
    out = []
    folds = entry["auto"]
    if len(folds) == 1 and folds[0]:
        return describe_auto(folds[0])
    for i, a in enumerate(folds):
        if not a:
            continue
        est = a.get("estimate") or {}
        head = f"auto{f' (fold {i + 1})' if len(folds) > 1 else ''}: {a['chosen']} at {a['operating_point']}"
        line = head + f". Why: {a['why']}."
        if est:
            line += (f" Outer-fold estimate of the whole procedure: accuracy {est['accuracy_delta']:+.4f} vs the "
                     f"reference, cost ratio {est['cost_ratio'] if est['cost_ratio'] is None else format(est['cost_ratio'], '.3f')}"
                     f" (chosen per outer fold: {', '.join(str(x) for x in est['chosen_per_outer_fold'])}).")
        sec = a.get("seconds") or {}
        line += (f" Nested CV: {a['cross_validation']['folds']} folds over {a['cross_validation']['rows']} rows, "
                 f"{sec.get('cross_validation', 0) + sec.get('select', 0):.0f} s.")
        out.append(line)
    return "\n".join(out)


def _knobs(entry: dict[str, Any]) -> str:
    par = entry.get("parity") or {}
    if entry["policy"] == "auto" and par.get("policy_chosen"):
        chosen = par["policy_chosen"]
        fams = chosen if isinstance(chosen, list) else [chosen]
        inner = _knobs({"policy": fams[0], "parity": par})
        return (f"{fams[0]}: {inner}" if len(set(fams)) == 1
                else f"per fold {'/'.join(fams)}; fold 1 {fams[0]}: {inner}")
    p = par.get("params") or (par.get("params_per_fold") or [None])[0]
    if not p:
        return ""
    if set(p) == {"tier"}:
        return p["tier"]
    if entry["policy"] in ("threshold", "rational"):
        ths = p["thresholds"]
        return " > ".join(f"{t}" + (f"@{ths[t]:.3g}" if t in ths else "") for t in p["chain"])
    if entry["policy"] == "random":
        return " + ".join(f"{w:.2f} {t}" for t, w in p["weights"].items())
    if entry["policy"] == "single":
        return p["tier"]
    if hasattr(POLICIES.get(entry["policy"]), "brief"):
        return POLICIES[entry["policy"]].brief(p)
    return json.dumps(p, sort_keys=True)


def render(res: dict[str, Any]) -> str:
    usd = res["cost_unit"] == "usd"
    cfmt, cw = (".3e", 11) if usd else (".4f", 11)
    L: list[str] = []
    sp = res["split"]
    L.append(f"data: {res['data']}   ({res['rows']['scored']} of {res['rows']['file']} rows scored)")
    if sp["mode"] == "train/test":
        L.append(f"split: knobs fitted on train ({sp['train']} rows), scored on test ({sp['test']} rows)"
                 + (f"; {sp['note']}" if sp.get("note") else ""))
    else:
        L.append(f"split: {sp['mode']} over {sp['rows']} rows ({sp['note']})")
    L.append("cost: " + ("USD per query" if usd else
                         f"share of queries that call the strongest model ({res.get('routellm', {}).get('strong', '?')}); "
                         "the file records no costs"))
    L.append("confidence signal: " + (res["signal"] or f"none ({res.get('signal_note', '')})"))
    if res.get("labels"):
        L.append(f"labels: {res['labels']}: every accuracy below is agreement with that model, not accuracy "
                 f"against the truth")
    if res["rows"]["dropped"]:
        for reason, d in res["rows"]["dropped_reasons"].items():
            L.append(f"rows dropped: {d['rows']} ({reason}; first on line {d['first_line']})")
    if res["confidence_missing"]:
        L.append("confidence absent/NaN/inf (the cascade escalates): "
                 + ", ".join(f"{m} {n}" for m, n in res["confidence_missing"].items()))
    L.append("")
    L.append(f"{'test':<34}{'accuracy':>9}{'cost/query':>{cw + 1}}{'latency ms':>12}")
    for s in res["singles"]:
        L.append(f"  {s['name']:<32}{_f(s['accuracy'], '.4f', 9)} {_f(s['cost'], cfmt, cw)}{_f(s['latency_ms'], '.0f', 12)}")
    o, b = res["oracle"], res["best_single"]
    L.append(f"  {'oracle (cheapest correct)':<32}{_f(o['accuracy'], '.4f', 9)} {_f(o['cost'], cfmt, cw)}")
    L.append(f"  {'best single: ' + b['name']:<32}{_f(b['accuracy'], '.4f', 9)} {_f(b['cost'], cfmt, cw)}")
    L.append("")
    bt = res["best_single_train"]
    tgt = (f"{bt[0]['accuracy']:.4f}, {bt[0]['name']} on train" if len(bt) == 1
           else "per fold: " + ", ".join(f"{x['accuracy']:.4f}" for x in bt))
    refs = res.get("references")
    if refs:
        d, h = refs["deployable"], refs["hindsight"]
        dn = d["name"] if isinstance(d["name"], str) else "per fold " + "/".join(d["name"])
        L.append(f"references: deployable = best single on train ({dn}): test accuracy {d['accuracy']:.4f}, "
                 f"cost {format(d['cost'], cfmt)}; hindsight = best single on test ({h['name']}): "
                 f"{h['accuracy']:.4f}, {format(h['cost'], cfmt)}")
    L.append(f"parity: knobs fitted on train to the best single model's train accuracy ({tgt}); scored on test")
    rl = "routellm" in res
    head = (f"{'policy':<18}{'accuracy':>9}{'cost/query':>{cw + 1}}{'Δ deploy':>9}{'ratio':>7}"
            f"{'Δ hind':>9}{'ratio':>7}{'random@cost':>12}{'AIQ':>8}")
    if rl:
        head += f"{'APGR':>8}{'CPT50':>7}{'CPT80':>7}"
    L.append(head + "   parity knobs")
    for e in res["policies"]:
        name = e["name"] + ("*" if e["baseline"] else "")
        if not e["applicable"]:
            L.append(f"{name:<18}not applicable: {e['reason']}")
            continue
        p = e["parity"]
        if not p["reachable"]:
            row = f"{name:<18}{'parity not reachable on train':>52}{'':>12}{_f(e['aiq'], '.4f', 8)}"
            if rl:
                row += f"{_f(e.get('apgr'), '.4f', 8)}{_f(e.get('cpt50'), '.3f', 7)}{_f(e.get('cpt80'), '.3f', 7)}"
            L.append(row + f"   ({p['reason']})")
            continue
        r = p.get("random_at_matched_cost")
        vd = p.get("vs_deployable") or {"accuracy_delta": None, "cost_ratio": None, "at_parity": False}
        vh = p.get("vs_hindsight") or {"accuracy_delta": p["accuracy_delta"], "cost_ratio": p["cost_ratio"],
                                       "at_parity": False}
        row = (f"{name:<18}{_f(p['accuracy'], '.4f', 9)} {_f(p['cost'], cfmt, cw)}"
               f"{_f(vd['accuracy_delta'], '+.4f', 8)}{'=' if vd['at_parity'] else ' '}{_f(vd['cost_ratio'], '.3f', 7)}"
               f"{_f(vh['accuracy_delta'], '+.4f', 8)}{'=' if vh['at_parity'] else ' '}{_f(vh['cost_ratio'], '.3f', 7)}"
               f"{_f(r['accuracy'] if r else None, '.4f', 12)}{_f(e['aiq'], '.4f', 8)}")
        if rl:
            row += f"{_f(e.get('apgr'), '.4f', 8)}{_f(e.get('cpt50'), '.3f', 7)}{_f(e.get('cpt80'), '.3f', 7)}"
        L.append(row + "   " + _knobs(e))
    for e in res["policies"]:
        if e.get("auto"):
            L.append(auto_line(e))
    for e in res["policies"]:
        rk = e.get("risk")
        if rk:
            L.append(f"{e['name']}: loss against {rk['reference']} on test {rk['test_loss']:.4f} "
                     f"({'within' if rk['within_bound'] else 'ABOVE'} the bound {rk['alpha']:g}); {rk['guarantee']}")
    ap = res.get("at_parity")
    if ap:
        tol = res["references"]["tolerance"]
        for ref in ("deployable", "hindsight"):
            c = ap[ref]["cheapest_other"]
            line = (f"at parity with the {ref} reference (test accuracy within {tol * 100:g} point of it): "
                    + (f"cheapest {c['policy']} (ratio {c['cost_ratio']:.3f})" if c else "no policy"))
            a = ap[ref].get("auto")
            if a:
                line += (f"; auto {'at parity' if a['at_parity'] else 'NOT at parity'} "
                         f"({a['accuracy_delta']:+.4f}, ratio {a['cost_ratio']:.3f})")
            L.append(line)
    L.append("* baseline.  Δ deploy / Δ hind = test accuracy minus the deployable / hindsight reference's, and")
    L.append("  ratio = test cost over that reference's ('=' marks parity: within the tolerance of the reference);")
    L.append("  random@cost = test accuracy of random routing fitted to the same train cost;")
    L.append(f"  AIQ = mean accuracy of the test frontier ({res['points']} budgets fitted on train) over the "
             "cost range cheapest..dearest single model" + ("; APGR/CPT as RouteLLM (cost = share of strong calls)" if rl else ""))
    return "\n".join(L)
