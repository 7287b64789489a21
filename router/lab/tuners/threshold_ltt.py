"""Risk-controlled tuning of a threshold cascade: Learn then Test with a learnt
order (split fixed-sequence testing), arXiv 2110.01052.

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
2. Learn: on the learn part only, the reference is fixed and every candidate
   configuration (chains of 1-3 tiers cheaper than the reference on learn, with
   the reference last, thresholds from each tier's learn confidences) gets its
   learn risk and cost. The path is the learn Pareto front: configurations by
   increasing learn risk, each strictly cheaper than the ones before, up to
   learn risk alpha.
3. Test: each path configuration's calibration losses give a p-value for
   H: risk > alpha (exact binomial for 0/1 losses, Hoeffding-Bentkus otherwise);
   `fixed-sequence` rejects along the path until the first p > delta (the order
   came from rows the p-values do not use, so no multiplicity penalty), `holm`
   and `bonferroni` correct for the path's length instead.
4. Among the certified configurations the cheapest on all the rows is chosen
   (for a budget target: the most accurate within it). If none is certified the
   cascade is the reference alone, which has no loss against itself.

Guarantee: with probability >= 1 - delta over the calibration draw, the chosen
configuration's risk on traffic exchangeable with these rows is <= alpha. It does
not survive a shift between the tuning rows and the traffic (see drift).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from router.core.policy import TierInfo
from router.lab import risk
from router.lab.labelled import CONFIDENCE_SIGNALS, Table
from router.lab.tuning import Fitted, NotApplicable, Target, TargetUnreachable, Tuner, TuningError

from .threshold import GRID, _candidates, chain_grid

MIN_CAL_ROWS = 30
MIN_LEARN_ROWS = 20
MAX_CHEAP_TIERS = 6


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


def threshold_rows(table: Table, signal: str, chain: Sequence[int], thresholds: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Per-query correctness and cost of one threshold configuration (the policy's
    rule: accept where signal >= threshold, a missing signal escalates, the last
    tier of the chain accepts)."""
    n = table.n
    correct, cost = np.zeros(n), np.zeros(n)
    alive = np.ones(n, dtype=bool)
    conf = table.conf[signal]
    for pos, tier in enumerate(chain):
        cost[alive] += table.cost[tier, alive]
        if pos == len(chain) - 1:
            accept = alive
        else:
            with np.errstate(invalid="ignore"):
                accept = alive & (conf[tier] >= thresholds[pos])
        correct[accept] = table.correct[tier, accept]
        alive = alive & ~accept
    return correct, cost


class RiskControlledThreshold(Tuner):
    policy = "threshold"

    def __init__(self, table: Table, infos: Sequence[TierInfo], *, risk_spec: RiskSpec, signal: str | None = None,
                 chain: Sequence[str] | None = None, max_tiers: int = 4, prune: bool = True, **options: Any):
        super().__init__(table, infos)
        options.pop("min_tiers", None)  # every chain here ends at the reference: lengths 1..max_tiers
        if options:
            raise TuningError(f"risk-controlled threshold: unknown tuning option(s) {sorted(options)}")
        self.spec = spec = risk_spec
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
        self.signal = self._signal(signal)
        perm = np.random.default_rng(spec.seed).permutation(n)
        self.learn, self.cal = subtable(table, np.sort(perm[:n_learn])), subtable(table, np.sort(perm[n_learn:]))
        by_name = {t.name: t.index for t in infos}
        acc_l, cost_l = self.learn.accuracy(), self.learn.mean_cost()
        if spec.reference is not None:
            if spec.reference not in by_name:
                raise TuningError(f"reference tier {spec.reference!r} is not a tier here; tiers: {', '.join(by_name)}")
            self.ref = by_name[spec.reference]
        else:  # the most accurate on the learn part; ties: the cheaper
            self.ref = min(range(len(infos)), key=lambda i: (-acc_l[i], cost_l[i], i))
        chains = self._chains(chain, by_name, acc_l, cost_l, max_tiers, prune)
        self._path(chains)
        self._test()
        self.search = {"signal": self.signal, "reference": self.infos[self.ref].name, "alpha": spec.alpha,
                       "delta": spec.delta, "procedure": spec.procedure, "learn_rows": self.learn.n,
                       "calibration_rows": self.cal.n, "configurations": self.configurations,
                       "path": len(self.path), "certified": int(self.certified.sum())}

    # -- learn ---------------------------------------------------------------
    def _signal(self, signal: str | None) -> str:
        counts = {s: int(np.isfinite(self.table.conf[s]).sum()) for s in CONFIDENCE_SIGNALS}
        if signal is None:
            signal = max(CONFIDENCE_SIGNALS, key=lambda s: counts[s])
        if signal not in counts:
            raise TuningError(f"signal {signal!r}: recorded data carry {' or '.join(CONFIDENCE_SIGNALS)}")
        if counts[signal] == 0:
            raise NotApplicable(f"no finite {signal!r} confidence is recorded, so a threshold cascade cannot run")
        return signal

    def _chains(self, chain, by_name, acc, cost, max_tiers, prune) -> list[tuple[int, ...]]:
        if chain is not None:
            bad = [c for c in chain if c not in by_name]
            if bad:
                raise TuningError(f"chain tier(s) {bad} are not tiers here; tiers: {', '.join(by_name)}")
            c = tuple(by_name[x] for x in chain)
            if c[-1] != self.ref:
                raise TuningError(f"a risk-controlled chain ends at the reference tier {self.infos[self.ref].name!r}; "
                                  f"got {list(chain)}")
            return [c]
        has_conf = np.isfinite(self.learn.conf[self.signal]).any(axis=1)
        cheap = [i for i in range(len(self.infos)) if i != self.ref and cost[i] < cost[self.ref] and has_conf[i]]
        if prune:
            cheap = [i for i in cheap if not any(
                cost[j] <= cost[i] and acc[j] >= acc[i] and (cost[j] < cost[i] or acc[j] > acc[i]) for j in cheap)]
        cheap.sort(key=lambda i: (cost[i], i))
        if len(cheap) > MAX_CHEAP_TIERS:
            pos = np.unique(np.round(np.linspace(0, len(cheap) - 1, MAX_CHEAP_TIERS)).astype(int))
            cheap = [cheap[p] for p in pos]
        out = [(self.ref,)]
        for size in range(1, min(max_tiers, 4)):
            out += [c + (self.ref,) for c in itertools.combinations(cheap, size)]
        return out

    def _path(self, chains: list[tuple[int, ...]]) -> None:
        L = self.learn
        ref_c = L.correct[self.ref]
        conf = L.conf[self.signal]
        risks, costs, grids = [], [], []
        for c in chains:
            cands = [_candidates(conf[i], GRID.get(len(c), 16)) for i in c[:-1]]
            # chain_grid sums "correct" over the accepted queries: fed losses, it sums losses
            r, t = chain_grid([conf[i] for i in c], [losses_against(ref_c, L.correct[i]) for i in c],
                              [L.cost[i] for i in c], cands)
            risks.append(r)
            costs.append(t)
            grids.append((c, cands))
        risk_l, cost_l = np.concatenate(risks), np.concatenate(costs)
        offsets = np.cumsum([0] + [r.size for r in risks])

        def config(flat: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
            g = int(np.searchsorted(offsets, flat, side="right") - 1)
            c, cands = grids[g]
            ix = np.unravel_index(flat - offsets[g], tuple(len(x) for x in cands)) if cands else ()
            return c, tuple(float(cands[j][ix[j]]) for j in range(len(cands)))

        anchor = None
        for i in np.lexsort((risk_l, cost_l)):  # cheapest first
            if risk_l[i] <= self.spec.alpha:
                anchor = config(int(i))
                break
        self.anchor = anchor
        self.configurations = int(risk_l.size)
        self.path = [] if anchor is None or len(anchor[0]) == 1 else self._walk(anchor)

    def _walk(self, anchor: tuple[tuple[int, ...], tuple[float, ...]]) -> list[tuple[tuple[int, ...], tuple[float, ...]]]:
        """Configurations on the anchor's chain from nearly the reference alone
        towards and past the anchor: every non-last tier accepts the share
        min(1, lam * s) of the learn queries, s its share at the anchor, lam rising."""
        chain, th = anchor
        conf = self.learn.conf[self.signal]
        values = [np.sort(conf[i][np.isfinite(conf[i])]) for i in chain[:-1]]
        shares = [float(np.mean(v >= t)) for v, t in zip(values, th)]
        steps = self.spec.steps
        out: list[tuple[tuple[int, ...], tuple[float, ...]]] = []
        for lam in np.linspace(0, 2, 2 * steps + 1)[1:]:
            cut = []
            for v, s in zip(values, shares):
                a = min(1.0, lam * s)
                k = int(math.ceil(a * v.size))  # accept the k most confident learn queries
                cut.append(float(v[-k]) if k >= 1 else float(v[-1]) + 1.0)
            cfg = (chain, tuple(cut))
            if not out or out[-1] != cfg:
                out.append(cfg)
        return out

    # -- test ----------------------------------------------------------------
    def _test(self) -> None:
        C = self.cal
        ref_c = C.correct[self.ref]
        self.cal_losses, self.pvalues = [], []
        for chain, th in self.path:
            correct, _ = threshold_rows(C, self.signal, chain, th)
            loss = losses_against(ref_c, correct)
            self.cal_losses.append(loss)
            self.pvalues.append(risk.pvalue(loss, self.spec.alpha))
        self.certified = risk.PROCEDURES[self.spec.procedure](self.pvalues, self.spec.delta)

    # -- select --------------------------------------------------------------
    def _params(self, chain: Sequence[int], th: Sequence[float]) -> dict[str, Any]:
        names = [self.infos[i].name for i in chain]
        return {"signal": self.signal, "thresholds": {names[j]: th[j] for j in range(len(th))}, "chain": names}

    def select(self, target: Target) -> Fitted:
        full = [(self.path[j], *threshold_rows(self.table, self.signal, *self.path[j]))
                for j in np.flatnonzero(self.certified)]
        ref = ((self.ref,), ())
        options = [(ref, self.table.correct[self.ref], self.table.cost[self.ref])] + full
        acc = np.array([o[1].mean() for o in options])
        cost = np.array([o[2].mean() for o in options])
        t = self.resolve(target)
        if t.kind == "budget":
            ok = np.flatnonzero(cost <= t.value * (1 + 1e-9) + 1e-15)
            if ok.size == 0:
                raise TargetUnreachable(
                    f"risk-controlled threshold: budget {t.value:.6g} is below every certified configuration "
                    f"(the cheapest costs {cost.min():.6g} per query on train)")
            pick = int(ok[np.lexsort((cost[ok], -acc[ok]))[0]])
        else:
            pick = int(np.lexsort((-acc, cost))[0])
        cfg = options[pick][0]
        return self._fitted(target, self._params(*cfg), acc[pick], cost[pick],
                            note=self.guarantee(cfg), search={"risk_control": self.report(cfg)})

    # -- report --------------------------------------------------------------
    def guarantee(self, cfg) -> str:
        s = self.spec
        ref = self.infos[self.ref].name
        if len(cfg[0]) == 1:
            return (f"no cascade cheaper than {ref} is certified at risk <= {s.alpha:g} (delta {s.delta:g}) "
                    f"from {self.cal.n} calibration rows: the reference model alone is used")
        return (f"with probability >= {1 - s.delta:g} over the {self.cal.n} calibration rows, the share of queries "
                f"{ref} answers right and this cascade wrong is <= {s.alpha:g} (so its accuracy is >= {ref}'s "
                f"- {s.alpha:g}), on traffic exchangeable with the tuning rows; Learn then Test (arXiv 2110.01052), "
                f"{s.procedure} testing")

    def report(self, cfg) -> dict[str, Any]:
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
        if len(cfg[0]) > 1:
            j = self.path.index(cfg)
            k = float(self.cal_losses[j].sum())
            out.update({"calibration_losses": k, "p_value": self.pvalues[j],
                        "upper_bound": risk.upper_bound(int(math.ceil(k)), n_cal, s.delta)})
        # how many rows would certify the cheapest path configuration whose loss rate
        # over all the rows is <= alpha/2 (a planning figure, not a guarantee)
        full = [losses_against(self.table.correct[self.ref], threshold_rows(self.table, self.signal, *c)[0]).mean()
                for c in self.path]
        near = [j for j, r in enumerate(full) if r <= s.alpha / 2]
        if near:
            r = float(full[near[-1]])
            need = risk.rows_needed(r, s.alpha, s.delta)
            out["rows_needed"] = {"loss_rate": r, "calibration_rows": need,
                                  "total_rows": None if need is None else math.ceil(need / (1 - s.learn_fraction))}
        return out
