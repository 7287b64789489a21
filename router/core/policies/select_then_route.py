"""Select-then-route (method 14): a per-category shortlist, then a cascade in it.

Taxonomy = the query's `category` (e.g. the MMLU subject) when the traffic
carries one, else the class `router.core.taxonomy.detect` finds in its text
("auto:math", "auto:multiple-choice", ...). From the train rows, each class gets
a shortlist: the models whose train accuracy on that class, shrunk toward their
accuracy over every train row (`shrink` pseudo-rows of the global figure, so a
class with few rows follows the global ranking), is within `delta` of the class's
best (at least the best one), cheapest first; `default` is the shortlist built
over every train row, used for a class not seen in training. Within the
shortlist the query climbs from the cheapest model upward and is accepted at the
first model whose recorded confidence `signal` reaches `threshold`, or, with
`judges`, as soon as the two models called last give the same answer
(`router.core.taxonomy.answer_key`): the judges disagreeing escalates. The last
shortlisted model always accepts. Without a confidence signal and without judges
only the cheapest shortlisted model is called.

Params (JSON): shortlists {class: [tier, ...]}, default [tier, ...], signal,
threshold, judges (bool), delta and shrink (the values the shortlists were built
with; informational).
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
from ..taxonomy import answer_key, detect


def taxonomy_class(query: Query) -> str:
    """The query's class: its own category, else the detected one."""
    return query.category if query.category is not None else "auto:" + detect(query.prompt)


class SelectThenRoute(Policy):
    name = "select-then-route"
    summary = "per-category shortlist of models proven on train, then a confidence cascade within it"
    knobs = (
        Knob("delta", "float", "shortlist the models within delta of the category's best train accuracy", low=0.0, high=1.0),
        Knob("threshold", "float", "accept at the first shortlisted tier whose confidence >= threshold"),
        Knob("shortlists", "choice", "per category: the shortlisted tiers, cheapest first (built by the tuner)"),
        Knob("default", "tier_list", "the shortlist for a query without a known category"),
        Knob("signal", "choice", "the confidence signal (null: call the cheapest shortlisted tier only)"),
        Knob("judges", "choice", "accept when the last two shortlisted models called agree; escalate when they disagree"),
    )

    def __init__(self, tiers: Sequence[TierInfo], default: Sequence[str] | None = None,
                 shortlists: Mapping[str, Sequence[str]] | None = None, signal: str | None = None,
                 threshold: float | None = None, delta: float | None = None, judges: bool = False,
                 shrink: float | None = None):
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
        if not isinstance(judges, bool):
            raise PolicyError(f"judges must be true or false, got {judges!r}")
        self.judges = judges
        self.shrink = None if shrink is None else float(shrink)

    def shortlist(self, query: Query) -> tuple[int, ...]:
        return self.shortlists.get(taxonomy_class(query), self.default)

    def needs(self, tier: int) -> Needs:
        return Needs(signals=(self.signal,)) if self.signal else Needs()

    def plan(self, query: Query) -> Plan:
        chain = self.shortlist(query)
        used = chain if self.signal or self.judges else chain[:1]
        rest = tuple(i for i in chain if i not in used) + tuple(t.index for t in self.tiers if t.index not in chain)
        return Plan(first=used[0], allowed=used + rest)

    def decide(self, query: Query, attempts: Sequence[Attempt]) -> Decision:
        cur = attempts[-1]
        chain = self.shortlist(query)
        climbs = self.signal is not None or self.judges
        if cur.tier_index not in chain or (not climbs and cur.tier_index != chain[0]):
            return Decision("accept", "fallback tier")
        if not climbs:
            return Decision("accept", "cheapest shortlisted tier (no confidence signal)")
        pos = chain.index(cur.tier_index)
        if pos == len(chain) - 1:
            return Decision("accept", "last shortlisted tier")
        nxt = chain[pos + 1]
        if self.judges and len(attempts) >= 2:
            a, b = answer_key(attempts[-2].text), answer_key(cur.text)
            if a is not None and a == b:
                return Decision("accept", f"judges {attempts[-2].tier} and {cur.tier} agree")
        if self.signal is None:
            return Decision("escalate", "no agreement of two judges yet", next_tier=nxt)
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
        return (f"delta={params.get('delta')} shrink={params.get('shrink')}"
                + (f" {params['signal']}>={th:.3g}" if th is not None else "")
                + (" judges" if params.get("judges") else "")
                + ("" if th is not None or params.get("judges") else " cheapest only")
                + "; default " + " > ".join(params["default"]) + avg)

    def params(self) -> dict[str, Any]:
        names = lambda chain: [self.tiers[i].name for i in chain]  # noqa: E731
        return {
            "delta": self.delta,
            "signal": self.signal,
            "threshold": self.threshold,
            "default": names(self.default),
            "shortlists": {c: names(v) for c, v in sorted(self.shortlists.items())},
            "judges": self.judges,
            "shrink": self.shrink,
        }

