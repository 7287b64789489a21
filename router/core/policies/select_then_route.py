"""Select-then-route (method 14): a per-category shortlist, then a cascade in it.

Taxonomy = the query's `category` (e.g. the MMLU subject). From the train rows,
each category gets a shortlist: the models whose train accuracy on that category
is within `delta` of the category's best (at least the best one), cheapest
first; `default` is the shortlist built the same way over every train row, used
for a query whose category is absent or was not seen in training (so data
without categories is one class). Within the shortlist the query climbs from the
cheapest model upward and is accepted at the first model whose recorded
confidence `signal` reaches `threshold`; the last shortlisted model always
accepts. Without a confidence signal (`signal` null) only the cheapest
shortlisted model is called.

Params (JSON): shortlists {category: [tier, ...]}, default [tier, ...], signal,
threshold, delta (the value the shortlists were built with; informational).
The tuner (`router.lab.tuners.select_then_route`) builds the shortlists
on train only and sweeps delta and the threshold.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from ..attempt import Attempt, Query
from ..errors import PolicyError
from ..policy import Decision, Knob, Needs, Plan, Policy, TierInfo
from ..signals import get


class SelectThenRoute(Policy):
    name = "select-then-route"
    summary = "per-category shortlist of models proven on train, then a confidence cascade within it"
    knobs = (
        Knob("delta", "float", "shortlist the models within delta of the category's best train accuracy", low=0.0, high=1.0),
        Knob("threshold", "float", "accept at the first shortlisted tier whose confidence >= threshold"),
        Knob("shortlists", "choice", "per category: the shortlisted tiers, cheapest first (built by the tuner)"),
        Knob("default", "tier_list", "the shortlist for a query without a known category"),
        Knob("signal", "choice", "the confidence signal (null: call the cheapest shortlisted tier only)"),
    )

    def __init__(self, tiers: Sequence[TierInfo], default: Sequence[str] | None = None,
                 shortlists: Mapping[str, Sequence[str]] | None = None, signal: str | None = None,
                 threshold: float | None = None, delta: float | None = None):
        super().__init__(tiers)
        if not default:
            raise PolicyError("policy 'select-then-route' needs `default`: the shortlist for queries "
                              "without a known category (fit it with `cascade tune --policy select-then-route`)")
        self.default = self.tier_list(default, "default")
        self.shortlists = {str(c): self.tier_list(v, f"shortlists[{c!r}]") for c, v in (shortlists or {}).items()}
        if signal is not None:
            signal = self.signal_name(signal)
            if threshold is None:
                raise PolicyError("a `threshold` is needed with a `signal`")
        self.signal = signal
        self.threshold = None
        if threshold is not None:
            try:
                self.threshold = float(threshold)
            except (TypeError, ValueError):
                raise PolicyError(f"threshold must be a number, got {threshold!r}") from None
            if math.isnan(self.threshold):
                raise PolicyError("threshold is NaN")
        self.delta = None if delta is None else float(delta)

    def shortlist(self, query: Query) -> tuple[int, ...]:
        if query.category is not None and query.category in self.shortlists:
            return self.shortlists[query.category]
        return self.default

    def needs(self, tier: int) -> Needs:
        return Needs(signals=(self.signal,)) if self.signal else Needs()

    def plan(self, query: Query) -> Plan:
        chain = self.shortlist(query)
        used = chain if self.signal else chain[:1]
        rest = tuple(i for i in chain if i not in used) + tuple(t.index for t in self.tiers if t.index not in chain)
        return Plan(first=used[0], allowed=used + rest)

    def decide(self, query: Query, attempts: Sequence[Attempt]) -> Decision:
        cur = attempts[-1]
        chain = self.shortlist(query)
        if cur.tier_index not in chain or (self.signal is None and cur.tier_index != chain[0]):
            return Decision("accept", "fallback tier")
        if self.signal is None:
            return Decision("accept", "cheapest shortlisted tier (no confidence signal)")
        pos = chain.index(cur.tier_index)
        if pos == len(chain) - 1:
            return Decision("accept", "last shortlisted tier")
        nxt = chain[pos + 1]
        value = get(cur.signals, self.signal)
        if value is None:
            return Decision("escalate", f"{self.signal} missing", next_tier=nxt)
        if value >= self.threshold:
            return Decision("accept", f"{self.signal}={value:.4g} >= {self.threshold:.4g}", score=value)
        return Decision("escalate", f"{self.signal}={value:.4g} < {self.threshold:.4g}", next_tier=nxt, score=value)

    @staticmethod
    def brief(params: Mapping[str, Any]) -> str:
        th = params.get("threshold")
        lists = params.get("shortlists") or {}
        sizes = [len(v) for v in lists.values()]
        avg = f", {len(lists)} categories, mean shortlist {sum(sizes) / len(sizes):.1f}" if sizes else " (one class)"
        return (f"delta={params.get('delta')}" + (f" {params['signal']}>={th:.3g}" if th is not None else " cheapest only")
                + "; default " + " > ".join(params["default"]) + avg)

    def params(self) -> dict[str, Any]:
        names = lambda chain: [self.tiers[i].name for i in chain]  # noqa: E731
        return {
            "delta": self.delta,
            "signal": self.signal,
            "threshold": self.threshold,
            "default": names(self.default),
            "shortlists": {c: names(v) for c, v in sorted(self.shortlists.items())},
        }

