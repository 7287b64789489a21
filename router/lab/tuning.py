"""Fitting a policy's knobs on labelled train rows, to a budget or a quality target.

    fit(policy_name, train_records, tiers, target, **options) -> Fitted

`target` is one of
- Target.budget(c): the highest train accuracy with train mean cost <= c;
- Target.accuracy(a): the lowest train mean cost with train accuracy >= a;
- Target.match_best(): Target.accuracy(train accuracy of the best single model).
Ties go to the cheaper, then the more accurate configuration. A target no
configuration reaches is a `TargetUnreachable` error saying what is reachable.

Only the records passed in are read: the evaluator passes the train split (or
the k-1 tuning folds), so knobs never depend on test labels.

How each policy is searched (a "tuner" builds a pool of configurations with
their train accuracy and cost, then `select(target)` picks one):

- threshold: candidate models are the tiers not dominated on train (another tier
  is at most as dear and at least as accurate, one of them strictly), ordered by
  train cost (FrugalGPT-style pruning; `prune=False` keeps all, at most 8 are
  searched, spread over the cost order). Every chain of `min_tiers`..`max_tiers`
  of them in cost order is searched (or the one `chain` given), with every
  combination of per-tier thresholds drawn from that tier's train confidences:
  all distinct values for 2-tier chains (at most 400 quantiles), 40 quantiles
  per tier for 3 tiers, 16 for 4. A tier without any finite confidence can only
  close a chain. The search is vectorised (boolean masks and matrix products); it
  reproduces `router.simulate` exactly (tests/test_tuning.py checks it).
- single: each tier on its own.
- random: mixtures of the two neighbouring single models on the upper hull of
  the single models' train (cost, accuracy), weighted to meet the budget or the
  accuracy target in expectation; the per-query draw is the policy's own.
- any other registered policy whose knobs are all bounded scalars (float / int
  with low and high): a grid over the knobs, each configuration replayed on the
  train rows with `router.simulate` (slow but generic). A policy with other knob
  kinds needs a tuner registered in `TUNERS`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import numpy as np

from router.core.errors import UserError
from router.core.policies import make_policy
from router.core.policy import TierInfo
from router.lab.labelled import CONFIDENCE_SIGNALS, Table
from router.lab.metrics import summarize
from router.lab.simulate import simulate

TOL = 1e-9


class TuningError(UserError):
    pass


class NotApplicable(TuningError):
    """The policy cannot run on this data at all (e.g. no confidence recorded)."""


class TargetUnreachable(TuningError):
    pass


@dataclass(frozen=True)
class Target:
    kind: Literal["budget", "accuracy", "match_best"]
    value: float | None = None

    @staticmethod
    def budget(c: float) -> "Target":
        return Target("budget", float(c))

    @staticmethod
    def accuracy(a: float) -> "Target":
        return Target("accuracy", float(a))

    @staticmethod
    def match_best() -> "Target":
        return Target("match_best")

    def describe(self) -> str:
        if self.kind == "budget":
            return f"budget {self.value:.6g} per query"
        if self.kind == "accuracy":
            return f"target accuracy {self.value:.4f}"
        return "match the best single model's train accuracy"

    def as_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value}


@dataclass
class Fitted:
    policy: str
    params: dict[str, Any]
    train_accuracy: float
    train_cost: float
    train_rows: int
    target: Target
    target_accuracy: float | None = None  # resolved for match_best
    note: str = ""
    search: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------
def select_index(acc: np.ndarray, cost: np.ndarray, target: Target, what: str) -> int:
    """Index of the configuration meeting the target (see module doc)."""
    if target.kind == "budget":
        ok = cost <= target.value * (1 + TOL) + 1e-15
        if not ok.any():
            raise TargetUnreachable(
                f"{what}: budget {target.value:.6g} is below its cheapest configuration "
                f"(train cost {cost.min():.6g} per query)"
            )
        best = acc[ok].max()
        cand = np.flatnonzero(ok & (acc >= best - TOL))
        return int(cand[np.argmin(cost[cand])])
    ok = acc >= target.value - TOL
    if not ok.any():
        i = int(np.argmax(acc))
        raise TargetUnreachable(
            f"{what}: target accuracy {target.value:.4f} is not reachable on the train rows; the highest "
            f"it reaches is {acc[i]:.4f} (at cost {cost[i]:.6g} per query)"
        )
    low = cost[ok].min()
    cand = np.flatnonzero(ok & (cost <= low * (1 + TOL) + 1e-15))
    return int(cand[np.argmax(acc[cand])])


class Tuner:
    policy: str = ""

    def __init__(self, table: Table, infos: Sequence[TierInfo], **options: Any):
        """`options`: what a subclass did not take as keyword arguments, i.e. unknown ones."""
        if options:
            raise TuningError(f"policy {self.policy!r}: unknown tuning option(s) {sorted(options)}")
        self.table = table
        self.infos = list(infos)

    def select(self, target: Target) -> Fitted:
        raise NotImplementedError

    def resolve(self, target: Target) -> Target:
        if target.kind == "match_best":
            return Target.accuracy(float(self.table.accuracy().max()))
        return target

    def _fitted(self, target: Target, params: dict[str, Any], acc: float, cost: float, **kw: Any) -> Fitted:
        r = self.resolve(target)
        return Fitted(self.policy, params, float(acc), float(cost), self.table.n, target,
                      r.value if r.kind == "accuracy" else None, **kw)



# -- shared by the tuners that replay a pool of configurations --------------------
MAX_SEARCHED_MODELS = 8


def round6(x: float) -> float:
    return float(round(float(x), 6))


def given_chain(chain: Sequence[str], by_name: dict[str, int]) -> tuple[int, ...]:
    """A chain the user named (--chain), as tier indices; unknown names are an error."""
    bad = [c for c in chain if c not in by_name]
    if bad:
        raise TuningError(f"chain tier(s) {bad} are not tiers here; tiers: {', '.join(by_name)}")
    return tuple(by_name[c] for c in chain)


def undominated_pool(table: Table, infos: Sequence[TierInfo], prune: bool) -> tuple[list[int], list[str]]:
    """Tiers not dominated on train (cost, accuracy), in cost order, at most MAX_SEARCHED_MODELS."""
    acc, cost = table.accuracy(), table.mean_cost()
    pool = list(range(len(infos)))
    pruned: list[str] = []
    if prune:
        keep = []
        for i in pool:
            if any(cost[j] <= cost[i] and acc[j] >= acc[i] and (cost[j] < cost[i] or acc[j] > acc[i])
                   for j in pool if j != i):
                pruned.append(infos[i].name)
            else:
                keep.append(i)
        pool = keep
    pool.sort(key=lambda i: (cost[i], acc[i], i))
    if len(pool) > MAX_SEARCHED_MODELS:
        pos = set(np.unique(np.round(np.linspace(0, len(pool) - 1, MAX_SEARCHED_MODELS)).astype(int)).tolist())
        pruned += [infos[pool[p]].name for p in range(len(pool)) if p not in pos]
        pool = [pool[p] for p in sorted(pos)]
    return pool, pruned


def quantile_edges(x: np.ndarray, bins: int) -> list[float]:
    v = x[np.isfinite(x)]
    if v.size == 0 or bins < 2:
        return []
    return [float(e) for e in np.unique(np.quantile(v, np.linspace(0, 1, bins + 1)[1:-1], method="lower"))]


def bin_index(x: np.ndarray, edges: list[float]) -> np.ndarray:
    """bisect_right(edges, x) per finite value (what the policies compute); -1 where absent."""
    out = np.searchsorted(np.array(edges, dtype=float), np.nan_to_num(x), side="right")
    return np.where(np.isfinite(x), out, -1)


def pav(values: Sequence[float], weights: Sequence[float]) -> list[float]:
    """Weighted pooled-adjacent-violators: the closest non-decreasing sequence."""
    blocks: list[list[float]] = []  # [sum w*v, sum w, count]
    for v, w in zip(values, weights):
        blocks.append([v * w, w, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, ww, c = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += ww
            blocks[-1][2] += c
    out: list[float] = []
    for s, w, c in blocks:
        out += [s / w] * int(c)
    return out


def replay(policy: str, infos: Sequence[TierInfo], table: Table, params: dict[str, Any]) -> tuple[float, float, dict]:
    pol = make_policy(policy, infos, params)
    s = summarize(simulate(pol, table.tiers, table.records), table.tiers)
    return s["accuracy"], s["cost"], pol.params()


def pick_signal(table: Table, signal: str | None, what: str) -> str:
    if signal is None:
        counts = {s: int(np.isfinite(table.conf[s]).sum()) for s in CONFIDENCE_SIGNALS}
        signal = max(CONFIDENCE_SIGNALS, key=lambda s: counts[s])
        if counts[signal] == 0:
            raise NotApplicable(f"no confidence signal (logprob or p_true) is recorded, so {what} cannot run")
    elif signal not in table.conf:
        raise TuningError(f"signal {signal!r}: recorded data carry {' or '.join(CONFIDENCE_SIGNALS)}")
    return signal


class SweepTuner(Tuner):
    """Pool of replayed configurations; `select` picks one for a target."""

    def _sweep(self, configs: list[dict[str, Any]]) -> None:
        acc, cost, params = [], [], []
        for p in configs:
            a, c, pp = replay(self.policy, self.infos, self.table, p)
            acc.append(a)
            cost.append(c)
            params.append(pp)
        self._acc, self._cost, self.configs = np.array(acc), np.array(cost), params
        self.search["configurations"] = len(params)

    def select(self, target: Target) -> Fitted:
        i = select_index(self._acc, self._cost, self.resolve(target), self.policy)
        return self._fitted(target, self.configs[i], self._acc[i], self._cost[i], search=dict(self.search))



def cost_order(table: Table) -> list[int]:
    """Tiers cheapest first on train (ties: the less accurate, then file order)."""
    acc, cost = table.accuracy(), table.mean_cost()
    return sorted(range(len(table.tiers)), key=lambda i: (cost[i], acc[i], i))


