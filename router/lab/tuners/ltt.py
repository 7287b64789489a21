"""Risk-controlled tuning: Learn then Test with a learnt order (split
fixed-sequence testing; Angelopoulos, Bates, Candes, Jordan, Lei, arXiv
2110.01052), shared by the risk tuners of the chain policies.

The loss, per query, of a cascade against the reference model (a tier named by
the user, or the most accurate tier on the learn part):

    loss = max(0, correct_reference - correct_cascade)

i.e. 1 when the reference answers right and the cascade wrong (0/1 data), so
risk = the share of queries the cascade loses against the reference. Since the
cascade may also be right where the reference is wrong, accuracy(cascade) >=
accuracy(reference) - risk: a certified risk <= alpha is a certified accuracy
loss of at most alpha.

Procedure (fit on the rows given, which the evaluator restricts to train):
1. The rows are split at random (seeded) into a learn part (`learn_fraction`) and
   a calibration part.
2. Learn (the subclass, on the learn part only): the reference is fixed and a path
   of configurations is ordered from conservative to aggressive.
3. Test: each path configuration's calibration losses give a p-value for
   H: risk > alpha (exact binomial for 0/1 losses, Hoeffding-Bentkus otherwise);
   `fixed-sequence` rejects along the path until the first p > delta (the order
   came from rows the p-values do not use, so no multiplicity penalty), `holm`
   and `bonferroni` correct for the path's length instead.
4. Among the certified configurations the cheapest on all the rows is chosen
   (for a budget target: the most accurate within it). If none is certified the
   answer is the reference alone, which has no loss against itself.

Guarantee: with probability >= 1 - delta over the calibration draw, the chosen
configuration's risk on traffic exchangeable with these rows is <= alpha. It does
not survive a shift between the tuning rows and the traffic (see router.lab.drift).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from router.core.policy import TierInfo
from router.lab import risk
from router.lab.labelled import Table
from router.lab.tuning import Fitted, Target, TargetUnreachable, Tuner, TuningError

MIN_CAL_ROWS = 30
MIN_LEARN_ROWS = 20


@dataclass(frozen=True)
class RiskSpec:
    alpha: float
    delta: float = 0.1
    procedure: str = "fixed-sequence"
    learn_fraction: float = 1 / 3
    reference: str | None = None
    seed: int = 0
    steps: int = 50  # path points between the reference alone and the learnt anchor

    def __post_init__(self) -> None:
        risk.check_levels(self.alpha, self.delta)
        if self.procedure not in risk.PROCEDURES:
            raise risk.RiskError(f"unknown testing procedure {self.procedure!r}; known: {', '.join(risk.PROCEDURES)}")
        if not 0.0 < self.learn_fraction < 1.0:
            raise risk.RiskError(f"learn_fraction must lie strictly between 0 and 1, got {self.learn_fraction!r}")


def losses_against(reference: np.ndarray, cascade: np.ndarray) -> np.ndarray:
    """Per-query loss of a cascade against the reference model (see module doc)."""
    return np.clip(np.asarray(reference, float) - np.asarray(cascade, float), 0.0, 1.0)


def subtable(table: Table, cols: np.ndarray) -> Table:
    cols = np.asarray(cols, dtype=int)
    return Table([table.ids[j] for j in cols], table.tiers, table.correct[:, cols], table.cost[:, cols],
                 {s: v[:, cols] for s, v in table.conf.items()}, table.latency[:, cols],
                 [table.records[j] for j in cols] if table.records else [])


class RiskControlled(Tuner):
    """The split, the reference, the test along `self.path` and the choice; a
    subclass builds the path on `self.learn` and says what a configuration does."""

    def __init__(self, table: Table, infos: Sequence[TierInfo], spec: RiskSpec):
        super().__init__(table, infos)
        self.spec = spec
        n = table.n
        n_learn = int(round(n * spec.learn_fraction))
        n_cal = n - n_learn
        if n_learn < MIN_LEARN_ROWS or n_cal < MIN_CAL_ROWS:
            raise risk.RiskError(
                f"risk control needs at least {MIN_LEARN_ROWS} learn and {MIN_CAL_ROWS} calibration rows; "
                f"{n} rows split at learn fraction {spec.learn_fraction:.2f} give {n_learn} and {n_cal}")
        if np.unique(table.correct).size < 2:
            raise risk.RiskError(f"all {n} rows have the same correctness for every tier (one class): "
                                 f"there is no loss to control")
        perm = np.random.default_rng(spec.seed).permutation(n)
        self.learn, self.cal = subtable(table, np.sort(perm[:n_learn])), subtable(table, np.sort(perm[n_learn:]))
        self.by_name = {t.name: t.index for t in infos}
        acc_l, cost_l = self.learn.accuracy(), self.learn.mean_cost()
        if spec.reference is not None:
            if spec.reference not in self.by_name:
                raise TuningError(f"reference tier {spec.reference!r} is not a tier here; "
                                  f"tiers: {', '.join(self.by_name)}")
            self.ref = self.by_name[spec.reference]
        else:  # the most accurate on the learn part; ties: the cheaper
            self.ref = min(range(len(infos)), key=lambda i: (-acc_l[i], cost_l[i], i))
        self.path: list[Any] = []
        self.configurations = 0

    # -- what a subclass provides -------------------------------------------------
    def outcome(self, cfg: Any, table: Table) -> tuple[np.ndarray, np.ndarray]:
        """Per-query correctness and cost of a path configuration on `table`."""
        raise NotImplementedError

    def params(self, cfg: Any) -> dict[str, Any]:
        raise NotImplementedError

    def fallback(self) -> tuple[str, dict[str, Any]]:
        """(policy, params) of the reference alone."""
        raise NotImplementedError

    # -- test -----------------------------------------------------------------------
    def test(self) -> None:
        ref_c = self.cal.correct[self.ref]
        self.cal_losses = [losses_against(ref_c, self.outcome(cfg, self.cal)[0]) for cfg in self.path]
        self.pvalues = [risk.pvalue(x, self.spec.alpha) for x in self.cal_losses]
        self.certified = risk.PROCEDURES[self.spec.procedure](self.pvalues, self.spec.delta)
        s = self.spec
        self.search = {"reference": self.infos[self.ref].name, "alpha": s.alpha, "delta": s.delta,
                       "procedure": s.procedure, "learn_rows": self.learn.n, "calibration_rows": self.cal.n,
                       "configurations": self.configurations, "path": len(self.path),
                       "certified": int(self.certified.sum())}

    # -- select ---------------------------------------------------------------------
    def select(self, target: Target) -> Fitted:
        picks = [None] + [int(j) for j in np.flatnonzero(self.certified)]  # None: the reference alone
        rows = [(self.table.correct[self.ref], self.table.cost[self.ref])] + [
            self.outcome(self.path[j], self.table) for j in picks[1:]]
        acc = np.array([r[0].mean() for r in rows])
        cost = np.array([r[1].mean() for r in rows])
        t = self.resolve(target)
        if t.kind == "budget":
            ok = np.flatnonzero(cost <= t.value * (1 + 1e-9) + 1e-15)
            if ok.size == 0:
                raise TargetUnreachable(
                    f"risk-controlled {self.policy}: budget {t.value:.6g} is below every certified configuration "
                    f"(the cheapest costs {cost.min():.6g} per query on train)")
            k = int(ok[np.lexsort((cost[ok], -acc[ok]))[0]])
        else:
            k = int(np.lexsort((-acc, cost))[0])
        j = picks[k]
        policy, params = self.fallback() if j is None else (self.policy, self.params(self.path[j]))
        f = self._fitted(target, params, acc[k], cost[k], note=self.guarantee(j), search={"risk_control": self.report(j)})
        f.policy = policy
        return f

    # -- report ---------------------------------------------------------------------
    def guarantee(self, j: int | None) -> str:
        s = self.spec
        ref = self.infos[self.ref].name
        if j is None:
            return (f"no cascade cheaper than {ref} is certified at risk <= {s.alpha:g} (delta {s.delta:g}) "
                    f"from {self.cal.n} calibration rows: the reference model alone is used")
        return (f"with probability >= {1 - s.delta:g} over the {self.cal.n} calibration rows, the share of queries "
                f"{ref} answers right and this cascade wrong is <= {s.alpha:g} (so its accuracy is >= {ref}'s "
                f"- {s.alpha:g}), on traffic exchangeable with the tuning rows; Learn then Test (arXiv 2110.01052), "
                f"{s.procedure} testing")

    def report(self, j: int | None) -> dict[str, Any]:
        s = self.spec
        n_cal = self.cal.n
        out: dict[str, Any] = {
            "alpha": s.alpha, "delta": s.delta, "procedure": s.procedure, "loss": "max(0, reference - cascade)",
            "reference": self.infos[self.ref].name, "learn_rows": self.learn.n, "calibration_rows": n_cal,
            "configurations": self.configurations, "path": len(self.path), "certified": int(self.certified.sum()),
            "assumption": "calibration rows and future traffic are exchangeable (no shift)",
            "citation": "Angelopoulos et al., Learn then Test, arXiv 2110.01052",
            "zero_loss_rows": math.ceil(math.log(s.delta) / math.log1p(-s.alpha)),
        }
        out["chosen"] = "reference alone" if j is None else "certified cascade"
        if j is not None:
            k = float(self.cal_losses[j].sum())
            out.update({"calibration_losses": k, "p_value": self.pvalues[j],
                        "upper_bound": risk.upper_bound(int(math.ceil(k)), n_cal, s.delta)})
        # how many rows would certify the cheapest path configuration whose loss rate
        # over all the rows is <= alpha/2 (a planning figure, not a guarantee)
        full = [losses_against(self.table.correct[self.ref], self.outcome(c, self.table)[0]).mean() for c in self.path]
        near = [i for i, r in enumerate(full) if r <= s.alpha / 2]
        if near:
            r = float(full[near[-1]])
            need = risk.rows_needed(r, s.alpha, s.delta)
            out["rows_needed"] = {"loss_rate": r, "calibration_rows": need,
                                  "total_rows": None if need is None else math.ceil(need / (1 - s.learn_fraction))}
        return out
