"""Cascade routing (Dekoninck, Baader & Vechev, ICML 2025), simplified to the
cascade setting with post-hoc quality estimates.

Per chain tier the fitted params hold (router.lab.tuners.cascade_routing fits them on train):
- a calibrated post-hoc quality estimate q(signal) = P(correct | the tier's own
  confidence): a step function, `levels[bisect_right(edges, signal)]`, and
  `missing` when the signal is absent;
- an ex-ante distribution of that estimate before the tier is run: `dist`, pairs
  [value, weight] (the train rows' calibrated values; its mean is about the
  tier's train accuracy), per category in `by_category` where the train data had
  enough rows of the category;
- `cost`: the tier's mean train cost.

After each call, with q_best the highest estimate among the attempts so far, every
untried chain tier j after the current one is scored
    gain_j - lam * cost_j,   gain_j = E[max(q_best, Q_j)] - q_best
(Q_j drawn from j's ex-ante distribution, assumed independent of what was seen).
The best-scoring tier is called next if its score is > 0; otherwise the query
stops and the answer of the attempt with the highest estimated quality is
returned (`answer_from`), not necessarily the last one.
"""
from __future__ import annotations

from bisect import bisect_right
from typing import Any, Mapping, Sequence

from ..attempt import Attempt, Query
from ..errors import PolicyError
from ..policy import ChainPolicy, Decision, Knob, TierInfo, finite_number
from ..signals import get


def _dist(pairs: Any, what: str) -> tuple[tuple[float, float], ...]:
    try:
        out = tuple((finite_number(v, what), finite_number(w, what)) for v, w in pairs)
    except (TypeError, ValueError) as e:
        if isinstance(e, PolicyError):
            raise
        raise PolicyError(f"{what} must be a list of [value, weight] pairs") from None
    if not out or any(w < 0 for _, w in out) or sum(w for _, w in out) <= 0:
        raise PolicyError(f"{what} needs at least one pair and positive weights")
    z = sum(w for _, w in out)
    return tuple((v, w / z) for v, w in out)


class Estimates:
    """One tier's fitted quality and cost estimates (validated)."""

    def __init__(self, tier: str, d: Mapping[str, Any]):
        if not isinstance(d, Mapping):
            raise PolicyError(f"estimates for tier {tier!r} must be an object")
        w = f"estimates[{tier!r}]"
        for key in ("cost", "edges", "levels", "missing", "dist"):
            if key not in d:
                raise PolicyError(f"{w} lacks {key!r}")
        self.cost = finite_number(d["cost"], f"{w}.cost")
        self.edges = [finite_number(x, f"{w}.edges") for x in d["edges"]]
        self.levels = [finite_number(x, f"{w}.levels") for x in d["levels"]]
        if len(self.levels) != len(self.edges) + 1:
            raise PolicyError(f"{w}: levels needs len(edges) + 1 = {len(self.edges) + 1} values, got {len(self.levels)}")
        if any(b < a for a, b in zip(self.edges, self.edges[1:])):
            raise PolicyError(f"{w}.edges must be sorted")
        self.missing = finite_number(d["missing"], f"{w}.missing")
        self.dist = _dist(d["dist"], f"{w}.dist")
        self.by_category = {str(c): _dist(p, f"{w}.by_category[{c!r}]") for c, p in (d.get("by_category") or {}).items()}
        self.raw = d

    def post(self, value: float | None) -> float:
        if value is None:
            return self.missing
        return self.levels[bisect_right(self.edges, value)]

    def gain(self, q_best: float, category: str | None) -> float:
        dist = self.by_category.get(category, self.dist) if category is not None else self.dist
        return sum(w * (v - q_best) for v, w in dist if v > q_best)


class CascadeRouting(ChainPolicy):
    name = "cascade-routing"
    summary = "cascade routing: call the next model while its expected quality gain beats lam x its cost"
    knobs = (
        Knob("lam", "float", "price of quality: stop when max_j E[max(q_best, Q_j)] - q_best - lam*c_j <= 0", low=0.0),
        Knob("chain", "tier_list", "the tiers that may be called, cheapest first (default: every estimated tier)"),
        Knob("signal", "choice", "the confidence signal the post-hoc estimates read"),
    )

    def __init__(
        self,
        tiers: Sequence[TierInfo],
        estimates: Mapping[str, Any] | None = None,
        lam: float = 0.0,
        signal: str = "logprob",
        chain: Sequence[str] | None = None,
    ):
        super().__init__(tiers)
        self.signal = self.signal_name(signal)
        self.lam = finite_number(lam, "lam", low=0.0)
        if not estimates:
            raise PolicyError("cascade-routing needs fitted `estimates` per tier (run `cascade tune --policy cascade-routing`)")
        self.est: dict[int, Estimates] = {}
        for name, d in estimates.items():
            self.est[self.tier_index(name, "estimates for tier")] = Estimates(name, d)
        self.chain = self.tier_list(list(chain) if chain is not None
                                    else [t.name for t in self.tiers if t.index in self.est])
        missing = [self.tiers[i].name for i in self.chain if i not in self.est]
        if missing:
            raise PolicyError(f"no estimates for chain tier(s) {missing}")

    def decide(self, query: Query, attempts: Sequence[Attempt]) -> Decision:
        qs = [self.est[a.tier_index].post(get(a.signals, self.signal)) for a in attempts]
        best = max(range(len(qs)), key=lambda i: (qs[i], i))  # ties: the later attempt
        qb = qs[best]
        tried = {a.tier_index for a in attempts}
        score, nxt = 0.0, None
        for j in self.rest_of_chain(attempts[-1]):
            if j in tried:
                continue
            e = self.est[j]
            s = e.gain(qb, query.category) - self.lam * e.cost
            if s > score:
                score, nxt = s, j
        if nxt is not None:
            return Decision("escalate", f"q_best={qb:.3g}; {self.tiers[nxt].name}: gain - lam*cost = {score:.3g} > 0",
                            next_tier=nxt, score=qb)
        return Decision("accept", f"no tier left worth its cost; best estimate q={qb:.3g} "
                                  f"from {attempts[best].tier}", answer_from=best, score=qb)

    def params(self) -> dict[str, Any]:
        return {
            "signal": self.signal,
            "lam": self.lam,
            "chain": [self.tiers[i].name for i in self.chain],
            "estimates": {self.tiers[i].name: dict(self.est[i].raw) for i in self.chain},
        }

    @staticmethod
    def brief(params: Mapping[str, Any]) -> str:
        """One line for tables (the estimates are long)."""
        return f"lam={float(params['lam']):.4g}: " + " > ".join(params["chain"])
