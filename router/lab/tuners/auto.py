"""`--policy auto`: choose the policy family and its knobs from the train rows alone.

Nested cross-validation over the train rows (never anything else):

- The rows are dealt into K folds (`folds`, default 4; a seeded permutation). Every
  candidate family (`CANDIDATES`: a policy and its tuning options) is fitted by its
  own tuner on rows with one fold left out (K fits) and on rows with two folds left
  out (K(K-1)/2 fits); each fit gives the knobs of every *operating point* (below)
  and those knobs are replayed with `router.lab.simulate` on the fold(s) it left out.
- **Inner folds choose.** To choose for the whole train set, each (family, operating
  point) is scored on the K one-fold-out fits' held-out folds (ordinary K-fold CV);
  the rule below picks one; the family is then fitted on every train row and the
  chosen operating point gives the knobs.
- **Outer folds estimate.** For outer fold o, the same rule chooses from the
  two-folds-out fits scored on the other K-1 folds (the CV of the rows without o),
  and the choice's one-fold-out fit is scored on o, which nothing in that choice saw.
  Pooled over o this estimates the accuracy and cost of the whole procedure, choice
  included (`search.auto.estimate`), and shows how stable the choice is.

Operating points, per fit on rows S, with ref_S the best single model on S (the
model a user would deploy without routing; ties: the cheaper):
`Target.accuracy(acc(ref_S) + m)` for m in ACC_MARGINS and `Target.budget(r *
cost(ref_S))` for r in BUDGET_RATIOS (for an accuracy target a: a + m instead of
acc(ref_S) + m). A point a fit cannot reach is skipped; a point counts only if
every fold's fit reaches it.

The rule for parity (`Target.match_best()`, the default): a (family, point)
qualifies when the lower confidence bound of its held-out accuracy difference with
the reference on the same rows, mean - `confidence` x its paired standard error
(default 0.5: a one-sided bound at about 69%), is at least minus `tolerance`
(default half a point) plus `margin`. Why the bound: the cheapest qualifying pair,
picked from a hundred-odd, tends to be one whose held-out accuracy was lucky (a
selection effect whose size follows the standard error); the bound scales with it,
so with a few hundred rows (a standard error near a point) it asks for a clear
margin and with thousands (a few tenths) it is nearly the plain mean. Among
qualifying points the cheapest held-out cost wins, except that a simpler family
(`Candidate.simplicity`: the reference alone < one or two knobs < per-tier
thresholds < learned predictors) whose cost is within one standard error (paired,
per row) of the cheapest is preferred: with few rows the standard error is large
and the simpler family wins, with many it is small and the cheapest does. The
reference is always a candidate (it qualifies against itself), so where nothing
saves, auto deploys the reference. For an accuracy target a: held-out accuracy -
`confidence` x its standard error >= a. For a budget: the family whose
cross-validated points are most accurate within the budget, then fitted on every
row to that budget. For a risk bound (Learn then Test): every family with a
risk-controlled tuner is certified at delta / F (F families: a union bound, so
the chosen one keeps the guarantee at delta), and the cheapest certified wins.

Cost: every candidate is fitted K + K(K-1)/2 times (10 with K = 4) on 1/2 to 3/4 of
the rows, plus once on all rows for the winner; `search.auto.seconds` records the
wall time. Above `max_rows` rows the cross-validation runs on a seeded sample of
`max_rows` rows (the winner is still fitted on every row).
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from router.core.errors import UserError
from router.core.policies import make_policy
from router.core.policy import TierInfo
from router.lab.labelled import Table
from router.lab.simulate import simulate
from router.lab.tuning import Fitted, NotApplicable, Target, TargetUnreachable, Tuner, TuningError

ACC_MARGINS = (-0.01, -0.005, 0.0, 0.005, 0.01, 0.02)
BUDGET_RATIOS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
MARGINS = (0.0, 0.0025, 0.005, 0.01, 0.02)  # margin="outer": the margins whose outer-fold estimates are compared
MIN_ROWS = 40  # below this, no cross-validation: the reference alone


@dataclass(frozen=True)
class Candidate:
    name: str
    policy: str
    options: dict[str, Any]
    simplicity: int  # 0 the reference alone, 1 one or two knobs, 2 per-tier thresholds, 3 learned predictors
    signal: bool = False  # takes the file's confidence signal as the `signal` option


CANDIDATES: tuple[Candidate, ...] = (
    Candidate("single", "single", {}, 0),
    Candidate("threshold-2tier", "threshold", {"min_tiers": 2, "max_tiers": 2}, 1, signal=True),
    Candidate("gatekeeper", "gatekeeper", {}, 1),
    Candidate("agreement", "agreement", {}, 1),
    Candidate("threshold", "threshold", {"min_tiers": 2, "max_tiers": 4}, 2, signal=True),
    Candidate("rational", "rational", {}, 2, signal=True),
    Candidate("automix", "automix", {}, 2),
    Candidate("select-then-route", "select-then-route", {}, 2),
    Candidate("cascade-routing", "cascade-routing", {}, 3),
    Candidate("logistic-router", "logistic-router", {}, 3),
    Candidate("routellm-classifier", "routellm", {"scorer": "linear"}, 3),
    Candidate("hybrid-llm", "hybrid-llm", {}, 3),
    Candidate("frugalgpt", "frugalgpt", {"text": []}, 3),  # answer form, agreement, confidences; no embeddings
    # the same cascade whose scorer also reads the query's hashed words and the answer's
    # arithmetic (router.core.worked); only on worked numeric answers (the words alone won
    # nowhere in the cross-validation of the other files); two tiers, for time
    Candidate("frugalgpt-checked", "frugalgpt",
              {"text": [], "words": 4096, "checks": None, "require_checks": True, "max_tiers": 2,
               "Cs": (0.1, 1.0, 10.0)}, 3),
)
SIMPLICITY_WORDS = {0: "the reference alone", 1: "one or two knobs", 2: "per-tier thresholds or shortlists",
                    3: "a learned predictor"}


def sub_table(table: Table, idx: Sequence[int]) -> Table:
    """The rows `idx` of a table (arrays sliced, records kept in the same order)."""
    ix = np.asarray(idx, dtype=int)
    return Table([table.ids[i] for i in ix], list(table.tiers), table.correct[:, ix], table.cost[:, ix],
                 {s: v[:, ix] for s, v in table.conf.items()}, table.latency[:, ix],
                 [table.records[i] for i in ix])


def _key(policy: str, params: dict[str, Any]) -> str:
    return policy + json.dumps(params, sort_keys=True, default=str)


@dataclass
class _Fit:
    """One candidate fitted on the rows without `out` (fold ids)."""
    out: tuple[int, ...]
    tuner: Tuner | None
    error: str | None = None
    seconds: float = 0.0
    params: dict[int, tuple[str, dict[str, Any]] | None] = field(default_factory=dict)  # point -> knobs


@dataclass
class _Scored:
    """Held-out correct / cost per row of one (candidate or reference, point) over some folds."""
    correct: np.ndarray
    cost: np.ndarray
    ref_correct: np.ndarray
    ref_cost: np.ndarray

    @property
    def acc(self) -> float:
        return float(self.correct.mean())

    @property
    def mean_cost(self) -> float:
        return float(self.cost.mean())

    @property
    def ref_acc(self) -> float:
        return float(self.ref_correct.mean())

    @property
    def ref_mean_cost(self) -> float:
        return float(self.ref_cost.mean())


class AutoTuner(Tuner):
    """Chooses a family and its knobs by nested cross-validation on the table's rows;
    `select(target)` returns the winner family's `Fitted` (its policy name and knobs),
    with the candidates, their cross-validated figures and the reason in
    `search["auto"]`."""

    policy = "auto"

    def __init__(self, table: Table, infos: Sequence[TierInfo], *, signal: str | None = None,
                 candidates: Sequence[str] | None = None, folds: int = 4, tolerance: float = 0.005,
                 margin: float | str = 0.0, confidence: float = 0.5, max_rows: int = 3000, seed: int = 0,
                 risk: Any = None,
                 reference: str | None = None,
                 progress: Callable[[str], None] | None = None, **options: Any):
        super().__init__(table, infos, **options)
        t0 = time.perf_counter()
        self.signal, self.tol, self.seed = signal, float(tolerance), int(seed)
        if margin == "outer":
            self.margins = MARGINS
        else:
            try:
                self.margins = (float(margin),)
            except (TypeError, ValueError):
                raise TuningError(f"auto: margin must be a number or 'outer', got {margin!r}") from None
        self.z = float(confidence)
        if not (math.isfinite(self.z) and self.z >= 0):
            raise TuningError(f"auto: confidence must be a number >= 0 (standard errors), got {confidence!r}")
        self.risk = risk
        self.progress = progress
        names = [t.name for t in self.infos]
        if reference is not None and reference not in names:
            raise TuningError(f"auto: reference {reference!r} is not a tier here; tiers: {', '.join(names)}")
        self.ref_tier = names.index(reference) if reference is not None else None
        known = {c.name: c for c in CANDIDATES}
        if candidates is None:
            self.cands = list(CANDIDATES)
        else:
            bad = [c for c in candidates if c not in known]
            if bad:
                raise TuningError(f"auto: unknown candidate(s) {bad}; candidates: {', '.join(known)}")
            self.cands = [known[c] for c in candidates]
            if "single" not in candidates:
                self.cands.insert(0, known["single"])  # the reference is always a candidate
        self.K = int(folds)
        if self.K < 3:
            raise TuningError("auto: nested cross-validation needs at least 3 folds")
        n = table.n
        self.n_all = n
        if n > max_rows:
            self.rows = np.sort(np.random.default_rng(seed).permutation(n)[:max_rows])
        else:
            self.rows = np.arange(n)
        self.cv = sub_table(table, self.rows)
        m = self.cv.n
        self.fold = np.empty(m, dtype=int)
        self.fold[np.random.default_rng(seed + 1).permutation(m)] = np.arange(m) % self.K
        self.fits: dict[str, dict[tuple[int, ...], _Fit]] = {}
        self.na: dict[str, str] = {}
        self.fit_seconds: dict[str, float] = {}
        self._sim: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
        self._full: dict[str, Tuner | Exception] = {}
        self.cv_seconds = 0.0
        self.too_few = m < MIN_ROWS
        if not self.too_few and risk is None:
            self._fit_all()
        self.cv_seconds = time.perf_counter() - t0

    # -- fitting ------------------------------------------------------------------------
    def _ref(self, acc: np.ndarray, cost: np.ndarray) -> int:
        """The reference: the tier the user named, else the best single model on the rows given."""
        return self.ref_tier if self.ref_tier is not None else _ref_index(acc, cost)

    def _options(self, c: Candidate) -> dict[str, Any]:
        o = dict(c.options)
        if c.signal and self.signal is not None:
            o.setdefault("signal", self.signal)
        return o

    def _make(self, c: Candidate, table: Table) -> Tuner:
        from . import make_tuner  # deferred: the registry (this package) imports auto, a cycle at the top

        return make_tuner(c.policy, table, self.infos, **self._options(c))

    def _splits(self) -> list[tuple[int, ...]]:
        K = self.K
        return [(o,) for o in range(K)] + [(o, j) for o in range(K) for j in range(o + 1, K)]

    def _fit_all(self) -> None:
        for c in self.cands:
            if self.progress:
                self.progress(f"auto: {c.name}")
            fits: dict[tuple[int, ...], _Fit] = {}
            spent = 0.0
            for out in self._splits():
                idx = np.flatnonzero(~np.isin(self.fold, out))
                t = time.perf_counter()
                try:
                    tuner = self._make(c, sub_table(self.cv, idx))
                    f = _Fit(out, tuner)
                except NotApplicable as e:
                    self.na[c.name] = str(e)
                    break
                except (UserError, ValueError, np.linalg.LinAlgError) as e:
                    # e.g. a scorer that too few rows cannot support: not a candidate here
                    self.na[c.name] = f"fails on {len(idx)} of the {self.cv.n} rows ({type(e).__name__}: {e})"
                    break
                f.seconds = time.perf_counter() - t
                spent += f.seconds
                fits[out] = f
            self.fit_seconds[c.name] = round(spent, 2)
            if c.name not in self.na:
                self.fits[c.name] = fits

    def _targets(self, table_idx: np.ndarray, target: Target) -> list[Target]:
        """The operating points of a fit on rows `table_idx` (a budget uses the parity points)."""
        target = Target.match_best() if target.kind == "budget" else target
        acc = self.cv.correct[:, table_idx].mean(axis=1)
        cost = self.cv.cost[:, table_idx].mean(axis=1)
        r = self._ref(acc, cost)
        base = acc[r] if target.kind == "match_best" else float(target.value)
        pts = [Target.accuracy(min(base + m, 1.0)) for m in ACC_MARGINS]
        pts += [Target.budget(x * cost[r]) for x in BUDGET_RATIOS]
        return pts

    def _knobs(self, c: Candidate, f: _Fit, target: Target, point: int) -> tuple[str, dict[str, Any]] | None:
        key = (Target.match_best() if target.kind == "budget" else target, point)
        if key not in f.params:
            idx = np.flatnonzero(~np.isin(self.fold, f.out))
            tg = self._targets(idx, target)[point]
            try:
                fp = f.tuner.select(tg)
                f.params[key] = (fp.policy, fp.params)
            except TargetUnreachable:
                f.params[key] = None
        return f.params[key]

    def _outcomes(self, policy: str, params: dict[str, Any], fold: int) -> tuple[np.ndarray, np.ndarray]:
        k = (_key(policy, params), fold)
        if k not in self._sim:
            idx = np.flatnonzero(self.fold == fold)
            recs = [self.cv.records[i] for i in idx]
            outs = simulate(make_policy(policy, self.infos, params), self.cv.tiers, recs)
            self._sim[k] = (np.array([o.correct if o.status == "succeeded" and o.correct is not None else 0.0
                                      for o in outs]),
                            np.array([o.cost_usd for o in outs]))
        return self._sim[k]

    def _ref_outcomes(self, out: tuple[int, ...], fold: int) -> tuple[np.ndarray, np.ndarray]:
        """The reference of the rows without `out` (best single there), on `fold`."""
        idx = np.flatnonzero(~np.isin(self.fold, out))
        r = self._ref(self.cv.correct[:, idx].mean(axis=1), self.cv.cost[:, idx].mean(axis=1))
        return self._outcomes("single", {"tier": self.infos[r].name}, fold)

    def _score(self, c: Candidate, target: Target, point: int,
               pairs: Sequence[tuple[tuple[int, ...], int]]) -> _Scored | None:
        """(fit, held-out fold) pairs pooled; None when a fit cannot reach the point."""
        cs, ks, rc, rk = [], [], [], []
        for out, fold in pairs:
            kn = self._knobs(c, self.fits[c.name][out], target, point)
            if kn is None:
                return None
            a, b = self._outcomes(kn[0], kn[1], fold)
            ra, rb = self._ref_outcomes(out, fold)
            cs.append(a)
            ks.append(b)
            rc.append(ra)
            rk.append(rb)
        return _Scored(np.concatenate(cs), np.concatenate(ks), np.concatenate(rc), np.concatenate(rk))

    # -- choosing -----------------------------------------------------------------------
    def _table(self, target: Target, pairs: Sequence[tuple[tuple[int, ...], int]]
               ) -> list[tuple[Candidate, int, _Scored]]:
        rows = []
        npts = len(ACC_MARGINS) + len(BUDGET_RATIOS)
        for c in self.cands:
            if c.name not in self.fits:
                continue
            for p in range(npts):
                s = self._score(c, target, p, pairs)
                if s is not None:
                    rows.append((c, p, s))
        return rows

    def _qualifies(self, s: _Scored, target: Target, mu: float = 0.0) -> bool:
        """The lower confidence bound (`confidence` standard errors under the mean) meets the target."""
        if target.kind == "match_best":
            return s.acc - s.ref_acc - self.z * _se(s.correct - s.ref_correct) >= -self.tol + mu - 1e-12
        return s.acc - self.z * _se(s.correct) >= float(target.value) + mu - 1e-12

    def _meets(self, est: dict[str, Any], target: Target) -> bool:
        if target.kind == "match_best":
            return est["accuracy_delta"] >= -self.tol - 1e-12
        return est["accuracy"] >= float(target.value) - 1e-12

    def _estimate(self, inner: list[list[tuple[Candidate, int, _Scored]]], target: Target, mu: float
                  ) -> dict[str, Any]:
        """Outer folds: for each o, the rule chooses from the CV of the rows without o (two-folds-out
        fits scored on the other folds) and its one-fold-out fit is scored on o."""
        est_c, est_k, est_rc, est_rk, per_outer = [], [], [], [], []
        for o, rows in enumerate(inner):
            ch, _ = self._choose(rows, target, mu)
            s = self._score(ch[0], target, ch[1], [((o,), o)]) if ch is not None else None
            if s is None:  # nothing chosen, or its point is out of reach of the one-fold-out fit: the reference
                per_outer.append("single (the reference)" if ch is None else f"{ch[0].name} (unreachable: reference)")
                a, b = self._ref_outcomes((o,), o)
                ra, rb = a, b
            else:
                per_outer.append(f"{ch[0].name} @ {_point_name(ch[1])}")
                a, b, ra, rb = s.correct, s.cost, s.ref_correct, s.ref_cost
            est_c.append(a)
            est_k.append(b)
            est_rc.append(ra)
            est_rk.append(rb)
        ec, ek, erc, erk = map(np.concatenate, (est_c, est_k, est_rc, est_rk))
        return {"accuracy": _r(ec.mean()), "cost": _r(ek.mean()), "reference_accuracy": _r(erc.mean()),
                "reference_cost": _r(erk.mean()), "accuracy_delta": _r(ec.mean() - erc.mean()),
                "accuracy_delta_se": _r((ec - erc).std(ddof=1) / math.sqrt(ec.size)) if ec.size > 1 else None,
                "cost_ratio": _r(ek.mean() / erk.mean()) if erk.mean() > 0 else None,
                "chosen_per_outer_fold": per_outer, "rows": int(ec.size)}

    def _choose(self, rows: list[tuple[Candidate, int, _Scored]], target: Target, mu: float = 0.0
                ) -> tuple[tuple[Candidate, int, _Scored] | None, str]:
        """The rule of the module doc; (choice, why)."""
        if target.kind == "budget":
            ok = [r for r in rows if r[2].mean_cost <= target.value * 1.02 + 1e-15]
            if not ok:
                return None, f"no candidate's cross-validated cost is within the budget {target.value:.6g}"
            best = max(ok, key=lambda r: (round(r[2].acc, 9), -r[2].mean_cost, -r[0].simplicity))
            return best, (f"most accurate on the held-out folds within the budget: {best[0].name} "
                          f"({best[2].acc:.4f} at {best[2].mean_cost:.6g})")
        ok = [r for r in rows if self._qualifies(r[2], target, mu)]
        if not ok:
            hi = max(rows, key=lambda r: r[2].acc) if rows else None
            return None, ("no candidate reaches the target on the held-out folds"
                          + (f" (the most accurate: {hi[0].name}, {hi[2].acc:.4f})" if hi else ""))
        cheapest = min(ok, key=lambda r: (r[2].mean_cost, -r[2].acc, r[0].simplicity))
        n = cheapest[2].cost.size
        near = []
        for r in ok:
            d = r[2].cost - cheapest[2].cost
            se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
            if r[2].mean_cost <= cheapest[2].mean_cost + se + 1e-15:
                near.append(r)
        pick = min(near, key=lambda r: (r[0].simplicity, r[2].mean_cost, -r[2].acc))
        ref_cost = cheapest[2].ref_mean_cost
        ratio = (lambda x: x / ref_cost) if ref_cost > 0 else (lambda x: float("nan"))
        lcb = f" - {self.z:g} standard error" if self.z else ""
        if target.kind == "match_best":
            cond = (f"held-out accuracy{lcb} >= the reference's - {self.tol:g}" + (f" + margin {mu:g}" if mu else ""))
        else:
            cond = f"held-out accuracy{lcb} >= {target.value:.4f}" + (f" + margin {mu:g}" if mu else "")
        why = (f"{len(ok)} of {len(rows)} (family, operating point) pairs meet {cond} over {n} held-out rows; "
               f"cheapest: {cheapest[0].name} (cost ratio {ratio(cheapest[2].mean_cost):.3f}, "
               f"accuracy {cheapest[2].acc:.4f} vs reference {cheapest[2].ref_acc:.4f})")
        if pick is not cheapest:
            why += (f"; {pick[0].name} ({SIMPLICITY_WORDS[pick[0].simplicity]}, cost ratio "
                    f"{ratio(pick[2].mean_cost):.3f}) is within one standard error of its cost and simpler, so it "
                    f"is preferred ({n} rows: too few to tell them apart)")
        if pick[0].name == "single":
            why += "; nothing cheaper reaches the target reliably: the reference model alone is deployed"
        return pick, why

    # -- select -----------------------------------------------------------------------
    def select(self, target: Target) -> Fitted:
        if self.risk is not None:
            return self._select_risk(target)
        t0 = time.perf_counter()
        if self.too_few:  # no cross-validation: a single model (for parity, the reference)
            from .single import SingleTuner  # deferred: with the registry's, after this package is loaded

            single = next(c for c in CANDIDATES if c.name == "single")
            fitted = SingleTuner(self.table, self.infos).select(target)
            return self._wrap(fitted, target, single, None, None,
                              f"{self.cv.n} rows are too few to cross-validate (need {MIN_ROWS}): a single model",
                              [], None, time.perf_counter() - t0)
        K = self.K
        rows = self._table(target, [((o,), o) for o in range(K)])  # K-fold CV over every row
        inner = [self._table(target, [(tuple(sorted((o, j))), j) for j in range(K) if j != o]) for o in range(K)]
        # outer folds estimate the whole procedure for each safety margin; the margin is the
        # smallest-cost one whose estimate meets the target (budgets: no margin)
        margins = [0.0] if target.kind == "budget" else list(self.margins)
        estimates = {mu: self._estimate(inner, target, mu) for mu in margins}
        if target.kind == "budget":
            mu = 0.0
        else:
            good = [m for m in margins if self._meets(estimates[m], target)]
            mu = (min(good, key=lambda m: (estimates[m]["cost"], m)) if good else max(margins))
        estimate = dict(estimates[mu])
        if len(margins) > 1:
            estimate["margin"] = mu
            estimate["by_margin"] = [{"margin": m, "accuracy_delta": estimates[m]["accuracy_delta"],
                                      "accuracy": estimates[m]["accuracy"],
                                      "cost_ratio": estimates[m]["cost_ratio"]} for m in margins]
            estimate["note"] = ("the margin was chosen on these outer-fold estimates (the smallest cost whose estimate "
                                "meets the target), so the estimate at the chosen margin is somewhat optimistic")
        # inner folds choose, with that margin
        choice, why = self._choose(rows, target, mu)
        summary = self._summary(rows, target, mu)
        # the winner, fitted on every row; if its point is out of reach there, the next one
        order = [choice] if choice is not None else []
        if choice is None and target.kind != "match_best":
            raise TargetUnreachable(f"auto: {why}")
        for c_, p_, s_ in order:
            try:
                fitted = self._final(c_, p_, target)
            except TargetUnreachable as e:
                why += f"; {c_.name} cannot reach its point on every train row ({e}): the reference instead"
                continue
            return self._wrap(fitted, target, c_, p_, s_, why, summary, estimate, time.perf_counter() - t0)
        if target.kind != "match_best":
            raise TargetUnreachable(f"auto: {why}")
        return self._reference(target, why, summary, estimate, time.perf_counter() - t0)

    def _final(self, c: Candidate, point: int, target: Target) -> Fitted:
        """The family fitted on every row, at the chosen point (for a budget: at the budget itself)."""
        tuner = self._full_tuner(c)
        return tuner.select(target if target.kind == "budget" else self._targets_full(target)[point])

    def _targets_full(self, target: Target) -> list[Target]:
        target = Target.match_best() if target.kind == "budget" else target
        acc, cost = self.table.accuracy(), self.table.mean_cost()
        r = self._ref(acc, cost)
        base = acc[r] if target.kind == "match_best" else float(target.value)
        return ([Target.accuracy(min(base + m, 1.0)) for m in ACC_MARGINS]
                + [Target.budget(x * cost[r]) for x in BUDGET_RATIOS])

    def _full_tuner(self, c: Candidate) -> Tuner:
        if c.name not in self._full:
            try:
                self._full[c.name] = self._make(c, self.table)
            except UserError as e:
                self._full[c.name] = e
        t = self._full[c.name]
        if isinstance(t, Exception):
            raise TargetUnreachable(f"{c.name} cannot be fitted on every row: {t}")
        return t

    def _reference(self, target: Target, why: str, summary: list | None = None, estimate: dict | None = None,
                   seconds: float = 0.0) -> Fitted:
        acc, cost = self.table.accuracy(), self.table.mean_cost()
        r = self._ref(acc, cost)
        if target.kind == "accuracy" and acc[r] < target.value - 1e-12:
            raise TargetUnreachable(f"auto: {why}")
        if target.kind == "budget" and cost[r] > target.value * (1 + 1e-9):
            raise TargetUnreachable(f"auto: {why}")
        fitted = Fitted("single", {"tier": self.infos[r].name}, float(acc[r]), float(cost[r]), self.table.n, target,
                        float(acc[r]) if target.kind == "match_best" else None)
        single = next(c for c in CANDIDATES if c.name == "single")
        return self._wrap(fitted, target, single, None, None, why, summary or [], estimate, seconds)

    def _wrap(self, fitted: Fitted, target: Target, c: Candidate, point: int | None, s: _Scored | None, why: str,
              summary: list, estimate: dict | None, seconds: float) -> Fitted:
        few = self.cv.n < 500
        info: dict[str, Any] = {
            "chosen": c.name, "family": fitted.policy, "simplicity": SIMPLICITY_WORDS[c.simplicity],
            "operating_point": _point_name(point) if point is not None else "the reference",
            "why": why,
            "target": target.as_json() | ({"tolerance": self.tol} if target.kind == "match_best" else {})
            | ({"confidence": self.z} if target.kind != "budget" else {}),
            "cross_validation": {"folds": self.K, "rows": int(self.cv.n), "train_rows": int(self.n_all),
                                 "sampled": bool(self.cv.n < self.n_all), "seed": self.seed,
                                 "fits_per_candidate": len(self._splits())},
            "candidates": summary,
            "seconds": {"cross_validation": round(self.cv_seconds, 2), "select": round(seconds, 2),
                        "fit_per_candidate": self.fit_seconds},
        }
        if s is not None:
            info["cv"] = {"accuracy": _r(s.acc), "cost": _r(s.mean_cost), "reference_accuracy": _r(s.ref_acc),
                          "reference_cost": _r(s.ref_mean_cost),
                          "cost_ratio": _r(s.mean_cost / s.ref_mean_cost) if s.ref_mean_cost > 0 else None}
        if estimate is not None:
            info["estimate"] = estimate
        if few:
            info["few_rows"] = (f"{self.cv.n} rows: simpler families are preferred when their cross-validated "
                                "cost is within one standard error of the cheapest")
        note = (f"auto: {c.name} chosen by {self.K}-fold nested cross-validation on the train rows"
                + (f" ({fitted.note})" if fitted.note else ""))
        acc = self.table.accuracy()
        resolved = (float(acc[self._ref(acc, self.table.mean_cost())]) if target.kind == "match_best" else
                    target.value if target.kind == "accuracy" else None)
        return dataclasses.replace(fitted, target=target, target_accuracy=resolved, note=note,
                                   search={"auto": info, **({"family": fitted.search} if fitted.search else {})})

    def _summary(self, rows: list[tuple[Candidate, int, _Scored]], target: Target, mu: float = 0.0
                 ) -> list[dict[str, Any]]:
        out = []
        for c in self.cands:
            e: dict[str, Any] = {"name": c.name, "policy": c.policy, "simplicity": c.simplicity,
                                 "fit_seconds": self.fit_seconds.get(c.name)}
            if c.name in self.na:
                e["status"] = "not applicable: " + self.na[c.name]
                out.append(e)
                continue
            mine = [r for r in rows if r[0] is c]
            ok = [r for r in mine if self._qualifies(r[2], target, mu)] if target.kind != "budget" else []
            if ok:
                b = min(ok, key=lambda r: (r[2].mean_cost, -r[2].acc))
                e["status"] = "meets the target"
            elif mine:
                b = max(mine, key=lambda r: (r[2].acc, -r[2].mean_cost))
                e["status"] = "misses the target" if target.kind != "budget" else "scored"
            else:
                e["status"] = "no operating point reached on every fold"
                out.append(e)
                continue
            s = b[2]
            e.update({"operating_point": _point_name(b[1]), "cv_accuracy": _r(s.acc), "cv_cost": _r(s.mean_cost),
                      "cv_accuracy_delta": _r(s.acc - s.ref_acc),
                      "cv_cost_ratio": _r(s.mean_cost / s.ref_mean_cost) if s.ref_mean_cost > 0 else None})
            out.append(e)
        return out

    def _select_risk(self, target: Target) -> Fitted:
        """Every family with a risk-controlled tuner certified at delta / F; the cheapest certified wins."""
        from . import RISK_TUNERS, make_tuner  # deferred: the registry imports auto, a cycle at the top

        t0 = time.perf_counter()
        fams = [c for c in self.cands if c.policy in RISK_TUNERS and c.name in ("threshold", "automix",
                                                                                  "cascade-routing")]
        spec = self.risk
        F = max(1, len(fams))
        split = dataclasses.replace(spec, delta=spec.delta / F)
        tried, best = [], None
        for c in fams:
            try:
                t = make_tuner(c.policy, self.table, self.infos, risk=split, **self._options(c))
                f = t.select(target)
            except (NotApplicable, TargetUnreachable, UserError) as e:
                tried.append({"name": c.name, "status": f"not certified: {e}"})
                continue
            rc = f.search.get("risk_control", {})
            certified = rc.get("chosen") == "certified cascade"
            tried.append({"name": c.name, "status": "certified" if certified else "reference alone",
                          "train_cost": _r(f.train_cost), "train_accuracy": _r(f.train_accuracy)})
            if best is None or (f.train_cost, 0 if certified else 1) < (best[1].train_cost, 0):
                best = (c, f)
        if best is None:
            return self._reference(target, f"no family could be certified at risk {spec.alpha:g}")
        c, f = best
        why = (f"{F} families certified at delta {spec.delta:g}/{F} = {split.delta:.4g} each (a union bound: the "
               f"chosen one keeps the guarantee at delta {spec.delta:g}); the cheapest on the train rows: {c.name}")
        info = {"chosen": c.name, "family": f.policy, "simplicity": SIMPLICITY_WORDS[c.simplicity],
                "operating_point": "the certified knobs", "why": why, "candidates": tried,
                "target": {"risk_bound": spec.alpha, "delta": spec.delta, "delta_per_family": split.delta},
                "seconds": {"select": round(time.perf_counter() - t0, 2)}}
        return dataclasses.replace(f, search={**f.search, "auto": info},
                                   note=(f.note + f"; auto certified each of {F} families at delta {split.delta:.4g}, "
                                         f"so the chosen one's bound holds with probability >= {1 - spec.delta:g} "
                                         "(union bound)"))


def _ref_index(acc: np.ndarray, cost: np.ndarray) -> int:
    """The best single model: highest accuracy, ties the cheaper, then the earlier."""
    return min(range(len(acc)), key=lambda i: (-acc[i], cost[i], i))


def _se(x: np.ndarray) -> float:
    """Standard error of the mean of per-row values (0 for fewer than two rows)."""
    return float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else 0.0


def _point_name(p: int | None) -> str:
    if p is None:
        return "the reference"
    if p < len(ACC_MARGINS):
        m = ACC_MARGINS[p]
        return f"accuracy target {m * 100:+g} point"
    return f"budget {BUDGET_RATIOS[p - len(ACC_MARGINS)]:g} x the reference's cost"


def _r(x: float) -> float:
    return float(f"{float(x):.6g}")



def describe(info: dict[str, Any]) -> str:
    """What auto chose and why, in a few lines (for `cascade tune` and `cascade evaluate`)."""
    lines = [f"auto: {info['chosen']} ({info.get('simplicity', '')}) at {info.get('operating_point', '-')}; "
             f"why: {info['why']}"]
    cv = info.get("cv")
    if cv and cv.get("cost_ratio") is not None:
        lines.append(f"  cross-validated (inner folds): accuracy {cv['accuracy']:.4f} vs the reference's "
                     f"{cv['reference_accuracy']:.4f}, cost ratio {cv['cost_ratio']:.3f}")
    est = info.get("estimate")
    if est:
        se = est.get("accuracy_delta_se")
        lines.append(f"  estimate of the whole procedure (outer folds, {est['rows']} rows): accuracy "
                     f"{est['accuracy_delta']:+.4f}" + (f" (se {se:.4f})" if se is not None else "")
                     + " vs the reference, cost ratio "
                     + (f"{est['cost_ratio']:.3f}" if est.get("cost_ratio") is not None else "-")
                     + f"; chosen per outer fold: {', '.join(str(x) for x in est['chosen_per_outer_fold'])}")
    if info.get("few_rows"):
        lines.append(f"  few rows: {info['few_rows']}")
    cv_info, sec = info.get("cross_validation"), info.get("seconds") or {}
    if cv_info:
        total = sec.get("cross_validation", 0) + sec.get("select", 0)
        lines.append(f"  nested cross-validation: {cv_info['folds']} folds over {cv_info['rows']} rows"
                     + (f" (a sample of the {cv_info['train_rows']})" if cv_info.get("sampled") else "")
                     + f", {cv_info['fits_per_candidate']} fits per candidate, {total:.0f} s")
    for c in info.get("candidates", []):
        if "cv_cost_ratio" in c:
            lines.append(f"    {c['name']:<20} {c['status']:<18} Δacc {c['cv_accuracy_delta']:+.4f}  cost ratio "
                         f"{c['cv_cost_ratio'] if c['cv_cost_ratio'] is None else format(c['cv_cost_ratio'], '.3f')}"
                         f"  ({c['operating_point']}; fits {c.get('fit_seconds', 0):.0f} s)")
        else:
            lines.append(f"    {c['name']:<20} {c['status']}")
    return "\n".join(lines)
