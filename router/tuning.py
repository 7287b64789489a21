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

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import numpy as np

from .labelled import CONFIDENCE_SIGNALS, Table, build_table, tier_infos
from .policy import TierInfo
from .records import Record
from .simulate import TierModel, simulate

TOL = 1e-9


class TuningError(ValueError):
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
def _select(acc: np.ndarray, cost: np.ndarray, target: Target, what: str) -> int:
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
        self.table = table
        self.infos = list(infos)
        self.options = options

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


# -- single ------------------------------------------------------------------
class SingleTuner(Tuner):
    policy = "single"

    def __init__(self, table: Table, infos: Sequence[TierInfo], **options: Any):
        super().__init__(table, infos)
        if options:
            raise TuningError(f"policy 'single': unknown tuning option(s) {sorted(options)}")
        self.acc = table.accuracy()
        self.cost = table.mean_cost()

    def select(self, target: Target) -> Fitted:
        i = _select(self.acc, self.cost, self.resolve(target), "single model")
        return self._fitted(target, {"tier": self.infos[i].name}, self.acc[i], self.cost[i])


# -- random ------------------------------------------------------------------
class RandomTuner(Tuner):
    policy = "random"

    def __init__(self, table: Table, infos: Sequence[TierInfo], seed: int = 0, **options: Any):
        super().__init__(table, infos)
        if options:
            raise TuningError(f"policy 'random': unknown tuning option(s) {sorted(options)}")
        from .metrics import hull

        self.seed = int(seed)
        acc, cost = table.accuracy(), table.mean_cost()
        pts = {}
        for i in range(len(infos)):
            key = (float(cost[i]), float(acc[i]))
            pts.setdefault(key, i)
        self.vertices = hull(pts)  # (cost, acc), increasing
        self.vertex_tier = [pts[v] for v in self.vertices]

    def _weights(self, target: Target) -> dict[str, float]:
        xs = [v[0] for v in self.vertices]
        ys = [v[1] for v in self.vertices]
        names = [self.infos[i].name for i in self.vertex_tier]
        if target.kind == "budget":
            b = target.value
            if b < xs[0] * (1 - TOL) - 1e-15:
                raise TargetUnreachable(f"random routing: budget {b:.6g} is below the cheapest model (train cost {xs[0]:.6g})")
            if b >= xs[-1]:
                return {names[-1]: 1.0}
            j = max(i for i in range(len(xs)) if xs[i] <= b)
            w = (b - xs[j]) / (xs[j + 1] - xs[j])
        else:
            a = target.value
            if a > ys[-1] + TOL:
                raise TargetUnreachable(
                    f"random routing: target accuracy {a:.4f} is not reachable on the train rows; "
                    f"the most accurate model reaches {ys[-1]:.4f}")
            k = next(i for i in range(len(ys)) if ys[i] >= a - TOL)
            if k == 0:
                return {names[0]: 1.0}
            j = k - 1
            w = (a - ys[j]) / (ys[k] - ys[j])
        w = min(max(w, 0.0), 1.0)
        out = {}
        if w < 1:
            out[names[j]] = 1.0 - w
        if w > 0:
            out[names[j + 1]] = w
        return out

    def realised(self, weights: dict[str, float]) -> tuple[float, float]:
        """Train accuracy and cost of the actual per-query draws."""
        from .policies import make_policy

        pol = make_policy("random", self.infos, {"weights": weights, "seed": self.seed})
        idx = np.array([pol.route(i) for i in self.table.ids])
        cols = np.arange(self.table.n)
        return float(self.table.correct[idx, cols].mean()), float(self.table.cost[idx, cols].mean())

    def select(self, target: Target) -> Fitted:
        w = self._weights(self.resolve(target))
        acc, cost = self.realised(w)
        return self._fitted(target, {"weights": w, "seed": self.seed}, acc, cost,
                            note="chosen in expectation over the hull of single models")


# -- threshold cascade -------------------------------------------------------
GRID = {2: 400, 3: 40, 4: 16}
MAX_SEARCHED_MODELS = 8


def _candidates(values: np.ndarray, q: int) -> np.ndarray:
    v = values[np.isfinite(values)]
    if v.size == 0:
        return np.array([])
    u = np.unique(v)
    if u.size <= q:
        return u
    return np.unique(np.quantile(v, np.linspace(0.0, 1.0, q), method="lower"))


def chain_grid(conf: Sequence[np.ndarray], correct: Sequence[np.ndarray], cost: Sequence[np.ndarray],
               cands: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Train accuracy and mean cost of a chain for every threshold combination.

    conf/correct/cost: one (n,) array per chain tier; cands: one array of
    thresholds per tier but the last. Result arrays are indexed like
    np.ravel_multi_index over the candidate arrays. A tier accepts where
    conf >= threshold (NaN never does: the query escalates), the last always.
    """
    n = correct[0].shape[0]
    k = len(conf)
    if k == 1:
        return np.array([correct[0].mean()]), np.array([cost[0].mean()])
    alive = np.ones((1, n))
    acc = np.zeros(1)
    tot = np.zeros(1)
    with np.errstate(invalid="ignore"):
        for i in range(k - 1):
            accept = (conf[i][None, :] >= cands[i][:, None]).astype(float)  # (Q, n)
            q = accept.shape[0]
            paid = alive @ cost[i]  # every query alive here pays tier i
            acc = (acc[:, None] + (alive * correct[i]) @ accept.T).ravel()
            tot = np.repeat(tot + paid, q)
            rest = 1.0 - accept
            if i < k - 2:
                alive = (alive[:, None, :] * rest[None, :, :]).reshape(-1, n)
            else:
                acc = acc + ((alive * correct[k - 1]) @ rest.T).ravel()
                tot = tot + ((alive * cost[k - 1]) @ rest.T).ravel()
    return acc / n, tot / n


def fast_threshold(table: Table, chain: Sequence[int], thresholds: Sequence[float], signal: str) -> tuple[float, float]:
    """Accuracy and mean cost of one threshold configuration on `table` (vectorised)."""
    conf = table.conf[signal]
    acc, cost = chain_grid([conf[i] for i in chain], [table.correct[i] for i in chain],
                           [table.cost[i] for i in chain], [np.array([t]) for t in thresholds])
    return float(acc[0]), float(cost[0])


class ThresholdTuner(Tuner):
    policy = "threshold"

    def __init__(self, table: Table, infos: Sequence[TierInfo], *, signal: str | None = None,
                 min_tiers: int = 2, max_tiers: int = 4, chain: Sequence[str] | None = None,
                 prune: bool = True, **options: Any):
        super().__init__(table, infos)
        if options:
            raise TuningError(f"policy 'threshold': unknown tuning option(s) {sorted(options)}")
        if signal is None:
            counts = {s: int(np.isfinite(table.conf[s]).sum()) for s in CONFIDENCE_SIGNALS}
            signal = max(CONFIDENCE_SIGNALS, key=lambda s: counts[s])
            if counts[signal] == 0:
                raise NotApplicable("no confidence signal (logprob or p_true) is recorded, so a threshold cascade cannot run")
        elif signal not in table.conf:
            raise TuningError(f"signal {signal!r}: recorded data carry {' or '.join(CONFIDENCE_SIGNALS)}")
        self.signal = signal
        conf = table.conf[signal]
        has_conf = np.isfinite(conf).any(axis=1)
        if not has_conf.any():
            raise NotApplicable(f"no finite {signal!r} confidence is recorded, so a threshold cascade cannot run")
        acc, cost = table.accuracy(), table.mean_cost()
        by_name = {t.name: t.index for t in infos}
        k = len(infos)
        self.search: dict[str, Any] = {"signal": signal}
        if chain is not None:
            missing = [c for c in chain if c not in by_name]
            if missing:
                raise TuningError(f"chain tier(s) {missing} are not tiers here; tiers: {', '.join(by_name)}")
            chains = [tuple(by_name[c] for c in chain)]
            self.search["chain"] = list(chain)
        else:
            if not 1 <= min_tiers <= max_tiers:
                raise TuningError(f"need 1 <= min_tiers <= max_tiers, got {min_tiers}, {max_tiers}")
            if max_tiers > 4:
                raise TuningError("chains of more than 4 tiers are not searched (max_tiers <= 4)")
            pool = list(range(k))
            pruned: list[str] = []
            if prune:
                keep = []
                for i in pool:
                    dominated = any(
                        cost[j] <= cost[i] and acc[j] >= acc[i] and (cost[j] < cost[i] or acc[j] > acc[i])
                        for j in pool if j != i
                    )
                    if dominated:
                        pruned.append(infos[i].name)
                    else:
                        keep.append(i)
                pool = keep
            pool.sort(key=lambda i: (cost[i], acc[i], i))
            if len(pool) > MAX_SEARCHED_MODELS:
                pos = np.unique(np.round(np.linspace(0, len(pool) - 1, MAX_SEARCHED_MODELS)).astype(int))
                dropped = [infos[pool[p]].name for p in range(len(pool)) if p not in set(pos)]
                pruned += dropped
                pool = [pool[p] for p in pos]
            self.search.update({"models": [infos[i].name for i in pool], "pruned": pruned,
                                "tiers": [min_tiers, max_tiers]})
            chains = []
            for size in range(min_tiers, max_tiers + 1):
                for c in itertools.combinations(pool, size):
                    if all(has_conf[i] for i in c[:-1]):
                        chains.append(c)
            if not chains:
                raise NotApplicable(
                    f"no chain of {min_tiers}..{max_tiers} tiers can be formed from the "
                    f"{len(pool)} candidate model(s) {self.search['models']}"
                    + (f" (dominated on train, pruned: {pruned})" if pruned else ""))
        self.chains = chains
        self.grids: list[tuple[list[np.ndarray], np.ndarray, np.ndarray]] = []
        for c in chains:
            q = GRID.get(len(c), 16)
            cands = [_candidates(conf[i], q) for i in c[:-1]]
            if any(cd.size == 0 for cd in cands):
                raise NotApplicable(f"chain {[infos[i].name for i in c]}: a non-last tier has no finite {signal!r}")
            a, t = chain_grid([conf[i] for i in c], [table.correct[i] for i in c], [table.cost[i] for i in c], cands)
            self.grids.append((cands, a, t))
        self.search["chains"] = len(chains)
        self.search["configurations"] = int(sum(g[1].size for g in self.grids))
        self._acc = np.concatenate([g[1] for g in self.grids])
        self._cost = np.concatenate([g[2] for g in self.grids])
        self._offsets = np.cumsum([0] + [g[1].size for g in self.grids])

    def params_of(self, flat: int) -> dict[str, Any]:
        ci = int(np.searchsorted(self._offsets, flat, side="right") - 1)
        local = flat - self._offsets[ci]
        chain = self.chains[ci]
        cands = self.grids[ci][0]
        idx = np.unravel_index(local, tuple(len(c) for c in cands)) if cands else ()
        names = [self.infos[i].name for i in chain]
        return {
            "signal": self.signal,
            "thresholds": {names[j]: float(cands[j][idx[j]]) for j in range(len(cands))},
            "chain": names,
        }

    def select(self, target: Target) -> Fitted:
        i = _select(self._acc, self._cost, self.resolve(target), f"threshold cascade ({self.signal})")
        p = self.params_of(i)
        return self._fitted(target, p, self._acc[i], self._cost[i], search=dict(self.search))


# -- generic: bounded scalar knobs, replayed with simulate --------------------
class GridTuner(Tuner):
    def __init__(self, table: Table, infos: Sequence[TierInfo], *, policy: str, base: dict[str, Any] | None = None,
                 points: int | None = None, **options: Any):
        super().__init__(table, infos)
        from .policies import POLICIES, PolicyError, make_policy

        self.policy = policy
        cls = POLICIES[policy]
        knobs = list(cls.knobs)
        bad = [kn.name for kn in knobs if kn.kind not in ("float", "int") or kn.low is None or kn.high is None]
        if bad or not knobs:
            raise NotApplicable(
                f"policy {policy!r} has no tuner: its knob(s) {bad or '(none)'} are not bounded scalars; "
                f"register one in router.tuning.TUNERS")
        if len(knobs) > 3:
            raise NotApplicable(f"policy {policy!r}: the generic grid searches at most 3 knobs, it has {len(knobs)}")
        g = points or {1: 25, 2: 9, 3: 5}[len(knobs)]
        axes = []
        for kn in knobs:
            vals = np.linspace(kn.low, kn.high, g)
            axes.append(sorted({int(round(v)) for v in vals}) if kn.kind == "int" else [float(v) for v in vals])
        tiers = table.tiers
        self.configs: list[dict[str, Any]] = []
        acc, cost = [], []
        from .metrics import summarize

        for combo in itertools.product(*axes):
            params = dict(base or {})
            params.update({kn.name: v for kn, v in zip(knobs, combo)})
            try:
                pol = make_policy(policy, self.infos, params)
            except PolicyError as e:
                raise NotApplicable(f"policy {policy!r}: cannot build it for the grid: {e}") from None
            try:
                s = summarize(simulate(pol, tiers, table.records), tiers)
            except (ValueError, KeyError, TypeError) as e:
                raise NotApplicable(f"policy {policy!r} cannot be replayed on these records: {e}") from None
            self.configs.append(pol.params())
            acc.append(s["accuracy"])
            cost.append(s["cost"])
        self._acc, self._cost = np.array(acc), np.array(cost)

    def select(self, target: Target) -> Fitted:
        i = _select(self._acc, self._cost, self.resolve(target), self.policy)
        return self._fitted(target, self.configs[i], self._acc[i], self._cost[i], note="generic grid search")


TUNERS: dict[str, Callable[..., Tuner]] = {
    "threshold": ThresholdTuner,
    "single": SingleTuner,
    "random": RandomTuner,
    "cascade-routing": lambda *a, **k: _more().CascadeRoutingTuner(*a, **k),
    "automix": lambda *a, **k: _more().AutoMixTuner(*a, **k),
    "router": lambda *a, **k: _precall().RouterTuner(*a, **k),
    "select-then-route": lambda *a, **k: _precall().SelectThenRouteTuner(*a, **k),
}


def _precall():  # tuners in router.precall_tuning (imported late: it imports this module)
    from . import precall_tuning

    return precall_tuning


def _more():  # tuners in router.tuning_more (imported late: it imports this module)
    from . import tuning_more

    return tuning_more


def make_tuner(policy: str, table: Table, infos: Sequence[TierInfo], **options: Any) -> Tuner:
    from .policies import POLICIES

    if policy not in POLICIES:
        import difflib

        near = difflib.get_close_matches(policy, list(POLICIES), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise TuningError(f"unknown policy {policy!r}{hint}; known: {', '.join(POLICIES)}")
    t = TUNERS.get(policy)
    if t is not None:
        return t(table, infos, **options)
    return GridTuner(table, infos, policy=policy, **options)


def confirm(fitted: Fitted, records: Sequence[Record], tiers: Sequence[TierModel]) -> Fitted:
    """Replay the fitted knobs on the rows they were fitted on with `router.simulate`
    and report simulate's train accuracy and cost (the search's own figures only
    choose knobs). A disagreement is a bug in the search, raised, never hidden."""
    from .metrics import summarize
    from .policies import make_policy

    s = summarize(simulate(make_policy(fitted.policy, tier_infos(tiers), fitted.params), tiers, records), tiers)
    if abs(s["accuracy"] - fitted.train_accuracy) > 1e-9 or abs(s["cost"] - fitted.train_cost) > 1e-9 * max(1.0, abs(s["cost"])):
        raise RuntimeError(
            f"internal error: tuning estimated accuracy {fitted.train_accuracy!r} / cost {fitted.train_cost!r} for "
            f"{fitted.policy} {fitted.params}, router.simulate gives {s['accuracy']!r} / {s['cost']!r}")
    return dataclasses.replace(fitted, train_accuracy=s["accuracy"], train_cost=s["cost"])


def fit(policy: str, train_records: Sequence[Record], tiers: Sequence[TierModel], target: Target,
        **options: Any) -> Fitted:
    """Fit `policy`'s knobs on `train_records` (and nothing else) to `target`; the
    returned train accuracy and cost are replayed with `router.simulate`."""
    if not train_records:
        raise TuningError("no train rows to fit on")
    table = build_table(train_records, tiers)
    return confirm(make_tuner(policy, table, tier_infos(tiers), **options).select(target), train_records, tiers)
