"""Cascade routing (Dekoninck, Baader & Vechev, ICML 2025): routing and cascading in one
rule, over any order of the models of `chain` (the pool; its order does not matter).

Quality estimates, per model m of the pool (fitted by router.lab.tuners.cascade_routing
on train rows only):
- ex ante, before any call: a = the predictor's P(m correct | query) from the query
  vector (`router.core.quality`: hashed words or sentence embeddings, length,
  category), calibrated as q_pre = sigmoid(pre0 + pre1 * logit a);
- ex post, once m has answered: q_post = sigmoid(w . f + b) with
  f = (logit a, logit of P(m correct | its confidence signal) (a binned isotonic
  calibration, `edges`/`levels`; `missing` where no signal is recorded), 1 when the
  signal is absent, the number of other models already run that gave the same
  answer, the number that gave another answer, the best q_pre among those
  agreeing). It is
  recomputed after every call, so a model's estimate moves when a later model
  agrees or disagrees with it;
- before m runs, what its q_post will be is uncertain: its distribution is
  sigmoid(logit q_pre + r_k), the r_k the quantiles of logit q_post - logit q_pre on
  train given how many other models had answered (0, 1, 2 or more), equal weights.
  Where running m reveals nothing (no signal, no answers to compare) the r_k are 0
  and the rule is plain routing on q_pre.
- cost: m's mean train cost over the dearest pool model's.

The rule, before the first call and after each one: with R the models run so far
(known q_post) and U the others, score every set T of U (T non-empty before the
first call)
    E[max(max_{i in R} q_post_i, max_{j in T} Q_j)] - lam * sum_{j in T} c_j
(the Q_j independent draws from their distributions above; the expectation is exact
for those discrete distributions). The best T (ties: cheaper, then smaller) is the
"supermodel" to complete: if it is empty the query stops and the answer of the run
model with the highest q_post is returned (`answer_from`, not necessarily the
last); else the cheapest model of T runs next, and the choice is made again with
what it returns. So the first call can be any model (routing), the next one any
model not yet run, cheaper or dearer, and lam = 0 ends at the best expected
quality. Simplifications against the paper: the estimates of models not yet run
are not updated by the answers seen so far (their own distribution is), and
quality estimates are taken as independent (the paper fits a covariance).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
from bisect import bisect_right
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from ..answers import normalize_answer
from ..attempt import Attempt, Query
from ..errors import PolicyError
from ..policy import Decision, Knob, Needs, Plan, Policy, TierInfo, finite_number
from ..quality import QueryEncoder, predictor_from_params
from ..signals import get

N_POST = 6  # ex-post features: logit a, signal, signal absent, agree, disagree, best agreeing q_pre
SPREAD_KEYS = ("0", "1", "2")  # other models run before: none, one, two or more
ANSWER_KINDS = ("auto", "choice", "number", "text")
_EPS = 1e-6


def logit(p: float) -> float:
    p = min(max(p, _EPS), 1.0 - _EPS)
    return math.log(p / (1.0 - p))


def _sig(z: float) -> float:
    return 0.5 * (1.0 + math.tanh(0.5 * z))


def expected_max(known: float, supports: Sequence[np.ndarray]) -> float:
    """E[max(known, X_1, ..., X_n)] for independent X_i uniform on the values of
    supports[i] (known = 0 when nothing has run: qualities are in [0, 1])."""
    if not supports:
        return known
    grid = np.unique(np.concatenate([np.atleast_1d(s) for s in supports] + [np.array([known, 1.0])]))
    grid = grid[grid >= known]
    if grid.size < 2:
        return known
    cdf = np.ones(grid.size - 1)
    for s in supports:
        cdf = cdf * (np.searchsorted(np.sort(s), grid[:-1], side="right") / len(s))
    return float(known + ((1.0 - cdf) * np.diff(grid)).sum())


class Model:
    """One pool model's fitted estimates (validated)."""

    def __init__(self, tier: str, d: Mapping[str, Any]):
        w = f"estimates[{tier!r}]"
        if not isinstance(d, Mapping):
            raise PolicyError(f"{w} must be an object")
        for key in ("cost", "pre", "post", "spread"):
            if key not in d:
                raise PolicyError(f"{w} lacks {key!r} (refit with `cascade tune --policy cascade-routing`)")
        self.cost = finite_number(d["cost"], f"{w}.cost", low=0.0)
        self.pre = self._vec(d["pre"], 2, f"{w}.pre")
        self.post = self._vec(d["post"], N_POST + 1, f"{w}.post")
        sp = d["spread"]
        if not isinstance(sp, Mapping) or set(sp) != set(SPREAD_KEYS):
            raise PolicyError(f"{w}.spread must map {', '.join(SPREAD_KEYS)} to lists of numbers")
        self.spread = {k: np.array(self._vec(sp[k], None, f"{w}.spread[{k}]")) for k in SPREAD_KEYS}
        self.edges = [finite_number(x, f"{w}.edges") for x in d.get("edges", [])]
        levels = [finite_number(x, f"{w}.levels", low=0.0) for x in d.get("levels", [0.5])]
        if len(levels) != len(self.edges) + 1:
            raise PolicyError(f"{w}: levels needs len(edges) + 1 = {len(self.edges) + 1} values, got {len(levels)}")
        if any(b < a for a, b in zip(self.edges, self.edges[1:])):
            raise PolicyError(f"{w}.edges must be sorted")
        self.sig_logits = [logit(v) for v in levels]
        self.missing_logit = logit(finite_number(d.get("missing", 0.5), f"{w}.missing", low=0.0))
        self.raw = dict(d)

    @staticmethod
    def _vec(x: Any, n: int | None, what: str) -> list[float]:
        if isinstance(x, (str, bytes)) or not isinstance(x, Sequence):
            raise PolicyError(f"{what} must be a list of numbers")
        out = [finite_number(v, what) for v in x]
        if (n is not None and len(out) != n) or not out:
            raise PolicyError(f"{what} needs {n if n is not None else 'at least 1'} numbers, got {len(out)}")
        return out

    def q_pre(self, a_logit: float) -> float:
        return _sig(self.pre[0] + self.pre[1] * a_logit)

    def q_post(self, a_logit: float, signal: float | None, agree: int, disagree: int, agree_q: float) -> float:
        s = self.missing_logit if signal is None else self.sig_logits[bisect_right(self.edges, signal)]
        f = (a_logit, s, 1.0 if signal is None else 0.0, float(agree), float(disagree), agree_q)
        return _sig(sum(w * x for w, x in zip(self.post, f)) + self.post[N_POST])

    def support(self, q_pre: float, others_run: int) -> np.ndarray:
        r = self.spread[SPREAD_KEYS[min(others_run, 2)]]
        z = logit(q_pre) + r
        return 0.5 * (1.0 + np.tanh(0.5 * z))


def post_estimates(models: Sequence[Model], a_logits: Sequence[float], run: Sequence[tuple[int, float | None, Any]],
                   q_pres: Sequence[float]) -> list[float]:
    """q_post of every run model: run = (pool position, signal, canonical answer) in call order."""
    out = []
    for p, sig, ans in run:
        agree = [q for (o, _, b) in run if o != p for q in (q_pres[o],) if ans is not None and b == ans]
        disagree = sum(1 for (o, _, b) in run if o != p and b is not None and (ans is None or b != ans))
        out.append(models[p].q_post(a_logits[p], sig, len(agree), disagree, max(agree, default=0.0)))
    return out


_SUBSETS: dict[tuple[int, bool], np.ndarray] = {}
_ANSWERS: dict[tuple[str, str | None], Any] = {}  # canonical answers: long worked answers parse slowly


_MEMBERS: dict[tuple[int, bool], list[tuple[int, ...]]] = {}


def subsets(u: int, with_empty: bool) -> np.ndarray:
    """Every subset of range(u) as rows of a 0/1 matrix, by size then lexicographically."""
    key = (u, with_empty)
    if key not in _SUBSETS:
        sets = [T for size in range(0 if with_empty else 1, u + 1) for T in itertools.combinations(range(u), size)]
        _MEMBERS[key] = sets
        _SUBSETS[key] = np.array([[1.0 if i in T else 0.0 for i in range(u)] for T in sets],
                                 dtype=float).reshape(len(sets), u)
    return _SUBSETS[key]


class SetValues:
    """Every set T of the models not run yet, scored without lam: E[max quality] (exact
    for the discrete distributions) and summed cost; `pick` applies a lam. Separate so
    that one computation serves every lam (the tuner's sweep, the evaluator's budgets)."""

    __slots__ = ("unrun", "A", "value", "cost", "size", "q_pres", "costs", "members", "_order", "_first_of")

    def __init__(self, models: Sequence[Model], costs: Sequence[float], q_pres: Sequence[float],
                 run_pos: Sequence[int], q_run: Sequence[float]):
        done = set(run_pos)
        self.unrun = [p for p in range(len(models)) if p not in done]
        self.q_pres, self.costs = q_pres, costs
        self._order: np.ndarray | None = None
        self._first_of: list[int | None] | None = None
        known = max(q_run, default=0.0)
        if not self.unrun:
            self.members: list[tuple[int, ...]] = [()]
            self.A = np.zeros((1, 0))
            self.value, self.cost, self.size = np.array([known]), np.zeros(1), np.zeros(1)
            return
        sup = [np.sort(models[p].support(q_pres[p], len(run_pos))) for p in self.unrun]
        grid = np.sort(np.concatenate(sup + [np.array([known, 1.0])]))
        grid = grid[grid >= known]
        self.A = subsets(len(self.unrun), bool(run_pos))
        self.members = _MEMBERS[(len(self.unrun), bool(run_pos))]
        if grid.size >= 2:
            F = np.stack([np.searchsorted(s, grid[:-1], side="right") / s.size for s in sup])
            P = np.exp(self.A @ np.log(np.maximum(F, 1e-300)))
            self.value = known + (1.0 - P) @ np.diff(grid)
        else:
            self.value = np.full(self.A.shape[0], known)
        self.cost = self.A @ np.array([costs[p] for p in self.unrun])
        self.size = self.A.sum(axis=1)

    def pick(self, lam: float) -> tuple[int | None, float]:
        """The next pool position to run (None: stop) and the best set's score at lam
        (ties: the cheaper set, then the smaller); within the set the cheapest runs first."""
        nxt, score = self.pick_many(np.array([lam]))
        return nxt[0], float(score[0])

    def pick_many(self, lams: np.ndarray) -> tuple[list[int | None], np.ndarray]:
        """`pick` for every lam at once."""
        if self._order is None:  # ties: the cheaper set, then the smaller, then the first
            self._order = np.lexsort((np.arange(self.A.shape[0]), self.size, self.cost))
        order = self._order
        score = self.value[order, None] - self.cost[order, None] * lams[None, :]
        top = score.max(axis=0)
        best = order[np.argmax(score >= top - 1e-12, axis=0)]
        return [self._first(int(b)) for b in best], top

    def _first(self, b: int) -> int | None:
        """The model of set b that runs first (the cheapest; ties: the higher q_pre)."""
        if self._first_of is None:
            self._first_of = [-1] * len(self.members)  # -1: not computed yet (None: the empty set)
        if self._first_of[b] == -1:
            T = [self.unrun[i] for i in self.members[b]]
            self._first_of[b] = min(T, key=lambda p: (self.costs[p], -self.q_pres[p], p)) if T else None
        return self._first_of[b]


def choose(models: Sequence[Model], costs: Sequence[float], lam: float, q_pres: Sequence[float],
           run_pos: Sequence[int], q_run: Sequence[float]) -> tuple[int | None, float]:
    """The next pool position to run (None: stop) and the best set's score."""
    return SetValues(models, costs, q_pres, run_pos, q_run).pick(lam)


class CascadeRouting(Policy):
    name = "cascade-routing"
    summary = ("cascade routing: before and after each call, run the model (any, in any order) that completes "
               "the set with the best expected max quality - lam x cost, or stop")
    knobs = (
        Knob("lam", "float", "price of quality: each set of models is scored E[max quality] - lam * sum of costs",
             low=0.0),
        Knob("chain", "tier_list", "the pool of tiers that may be called (any order)"),
        Knob("signal", "choice", "the confidence signal the ex-post estimates read (none: answers only)"),
        Knob("features", "choice", "the query encoder of the ex-ante predictor"),
        Knob("ante", "choice", "the fitted ex-ante predictor (one output per pool tier)"),
        Knob("estimates", "choice", "per tier: cost, ex-ante calibration, ex-post weights, spread (fitted)"),
        Knob("answer_kind", "choice", "how answers are compared for agreement", choices=ANSWER_KINDS),
    )
    _acache: ClassVar[dict[str, dict[tuple[str, str | None], tuple[float, ...]]]] = {}
    _vcache: ClassVar[dict[str, dict[tuple[Any, ...], SetValues]]] = {}

    def __init__(self, tiers: Sequence[TierInfo], estimates: Mapping[str, Any] | None = None, lam: float = 0.0,
                 signal: str | None = None, chain: Sequence[str] | None = None,
                 features: Mapping[str, Any] | None = None, ante: Mapping[str, Any] | None = None,
                 answer_kind: str = "auto"):
        super().__init__(tiers)
        self.signal = None if signal is None else self.signal_name(signal)
        self.lam = finite_number(lam, "lam", low=0.0)
        if not estimates or not isinstance(estimates, Mapping):
            raise PolicyError("cascade-routing needs fitted `estimates` per tier (run `cascade tune --policy "
                              "cascade-routing`)")
        if answer_kind not in ANSWER_KINDS:
            raise PolicyError(f"answer_kind must be one of {', '.join(ANSWER_KINDS)}, got {answer_kind!r}")
        self.answer_kind = answer_kind
        for name in estimates:
            self.tier_index(name, "estimates for tier")
        self.chain = self.tier_list(list(chain) if chain is not None
                                    else [t.name for t in self.tiers if t.name in estimates], "chain")
        names = [self.tiers[i].name for i in self.chain]
        missing = [n for n in names if n not in estimates]
        if missing:
            raise PolicyError(f"no estimates for chain tier(s) {missing}")
        self.models = [Model(n, estimates[n]) for n in names]
        top = max(m.cost for m in self.models)
        self.costs = [m.cost / top if top > 0 else 0.0 for m in self.models]
        self.pos = {t: p for p, t in enumerate(self.chain)}
        if (features is None) != (ante is None):
            raise PolicyError("`features` and `ante` go together: both fitted, or neither (constant ex-ante estimates)")
        self.encoder = None
        self.ante_predictor = None
        self._ante_params = None if ante is None else dict(ante)
        if features is not None:
            feats = dict(features)
            unknown = set(feats) - {"text", "buckets", "categories"}
            if unknown:
                raise PolicyError(f"features: unknown key(s) {sorted(unknown)}; known: text, buckets, categories")
            self.encoder = QueryEncoder(feats.get("text", "embed"), feats.get("buckets", 256),
                                        feats.get("categories", ()))
            self.ante_predictor = predictor_from_params(ante, len(self.chain), self.encoder.dim, ("linear",))
        key = json.dumps([None if self.encoder is None else self.encoder.params(), names, self._ante_params],
                         sort_keys=True)
        fp = hashlib.sha256(key.encode()).hexdigest()
        if fp not in CascadeRouting._acache and len(CascadeRouting._acache) >= 64:
            CascadeRouting._acache.clear()
        self._cache = CascadeRouting._acache.setdefault(fp, {})
        # the set values do not depend on lam: instances differing only in lam share them
        vkey = json.dumps([key, [m.raw for m in self.models]], sort_keys=True)
        vfp = hashlib.sha256(vkey.encode()).hexdigest()
        if vfp not in CascadeRouting._vcache and len(CascadeRouting._vcache) >= 64:
            CascadeRouting._vcache.clear()
        self._vals = CascadeRouting._vcache.setdefault(vfp, {})

    # -- estimates --------------------------------------------------------------------
    def ante_logits(self, query: Query) -> tuple[float, ...]:
        """logit of the ex-ante predictor per pool tier (0 without a predictor: the
        calibration's intercept is then the model's train accuracy)."""
        if self.encoder is None:
            return (0.0,) * len(self.chain)
        key = (query.prompt, query.category)
        hit = self._cache.get(key)
        if hit is None:
            if len(self._cache) >= 1 << 16:
                self._cache.clear()
            a = self.ante_predictor.predict(self.encoder.vector(query.prompt, query.category)[None, :])[0]
            hit = self._cache[key] = tuple(logit(float(v)) for v in a)
        return hit

    def warm(self, texts: Sequence[str]) -> None:
        if self.encoder is not None:
            self.encoder.warm(texts)

    def answer(self, text: str | None) -> Any:
        key = (self.answer_kind, text)
        if key not in _ANSWERS:
            if len(_ANSWERS) >= 1 << 16:
                _ANSWERS.clear()
            _ANSWERS[key] = normalize_answer(text, self.answer_kind)
        return _ANSWERS[key]

    def _state(self, query: Query, attempts: Sequence[Attempt]):
        a = self.ante_logits(query)
        q_pres = [m.q_pre(x) for m, x in zip(self.models, a)]
        run = [(self.pos[t.tier_index], None if self.signal is None else get(t.signals, self.signal),
                self.answer(t.text)) for t in attempts if t.tier_index in self.pos]
        return a, q_pres, run

    def _values(self, query: Query, a: Sequence[float], q_pres: list[float],
                run: list[tuple[int, float | None, Any]]) -> tuple[list[float], SetValues]:
        key = (query.prompt, query.category, tuple(run))
        hit = self._vals.get(key)
        q_run = post_estimates(self.models, a, run, q_pres) if run else []
        if hit is None:
            if len(self._vals) >= 1 << 17:
                self._vals.clear()
            hit = self._vals[key] = SetValues(self.models, self.costs, q_pres, [p for p, _, _ in run], q_run)
        return q_run, hit

    # -- the interface ----------------------------------------------------------------
    def needs(self, tier: int) -> Needs:
        return Needs(signals=(self.signal,)) if self.signal is not None else Needs()

    def plan(self, query: Query) -> Plan:
        a, q_pres, _ = self._state(query, ())
        nxt, v = self._values(query, a, q_pres, [])[1].pick(self.lam)
        first = self.chain[nxt]
        return Plan(first=first, allowed=(first,) + tuple(t for t in self.chain if t != first),
                    note=f"q_pre={q_pres[nxt]:.3f}; best set's E[max q] - lam*c = {v:.3f}")

    def decide(self, query: Query, attempts: Sequence[Attempt]) -> Decision:
        a, q_pres, run = self._state(query, attempts)
        if not run:  # only fallback tiers outside the pool answered
            return Decision("accept", "no pool tier answered; keeping the fallback's answer")
        q_run, vals = self._values(query, a, q_pres, run)
        nxt, v = vals.pick(self.lam)
        b = max(range(len(q_run)), key=lambda i: (q_run[i], i))  # ties: the later call
        ok = [i for i, t in enumerate(attempts) if t.tier_index in self.pos]
        if nxt is not None:
            return Decision("escalate", f"q_post={[round(q, 3) for q in q_run]}; set with {self.tiers[self.chain[nxt]].name}: "
                                        f"E[max q] - lam*c = {v:.3g}", next_tier=self.chain[nxt], score=q_run[b])
        return Decision("accept", f"no model left worth its cost; best q_post={q_run[b]:.3g} from "
                                  f"{attempts[ok[b]].tier}", answer_from=ok[b], score=q_run[b])

    def params(self) -> dict[str, Any]:
        names = [self.tiers[i].name for i in self.chain]
        out: dict[str, Any] = {
            "signal": self.signal,
            "lam": self.lam,
            "chain": names,
            "answer_kind": self.answer_kind,
            "estimates": {n: dict(m.raw) for n, m in zip(names, self.models)},
        }
        if self.encoder is not None:
            out["features"] = self.encoder.params()
            out["ante"] = self._ante_params
        return out

    @staticmethod
    def brief(params: Mapping[str, Any]) -> str:
        """One line for tables (the estimates are long)."""
        return f"lam={float(params['lam']):.4g} over " + ", ".join(params["chain"])
