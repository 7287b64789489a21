"""Random routing: each query goes to one tier drawn with fixed weights.

The "random router at matched cost" baseline (RouteLLM's random router; mixing two
single models traces the straight line between them on a cost-accuracy plot).
The draw is a pure function of (seed, query id), so a run is reproducible and the
workers and the offline evaluator route every query identically:

    u = first 8 bytes of sha256(f"{seed}:{query.id}") / 2**64   in [0, 1)
    tier = the first tier (portfolio order) whose cumulative normalised weight > u

Should the drawn tier's call fail, the job falls back to the other tiers with a
weight, then the rest, in portfolio order.
"""
from __future__ import annotations

import hashlib
import math
from typing import Any, Mapping, Sequence

from ..attempt import Attempt, Query
from ..errors import PolicyError
from ..policy import Decision, Knob, Plan, Policy, TierInfo


def draw(seed: int, query_id: str) -> float:
    """The uniform number in [0, 1) that decides the route of one query."""
    h = hashlib.sha256(f"{seed}:{query_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def pick(cumulative: Sequence[tuple[int, float]], u: float) -> int:
    for index, upper in cumulative:
        if u < upper:
            return index
    return cumulative[-1][0]


class RandomRouting(Policy):
    name = "random"
    summary = "route each query to a tier drawn with fixed weights (deterministic per query id and seed)"
    knobs = (
        Knob("weights", "per_tier_float", "per tier: share of queries sent there (normalised to sum 1)", low=0.0),
        Knob("seed", "int", "seed of the per-query draw"),
    )

    def __init__(self, tiers: Sequence[TierInfo], weights: Mapping[str, float] | None = None, seed: int = 0):
        super().__init__(tiers)
        if not weights:
            raise PolicyError("policy 'random' needs `weights`: {tier: share of queries}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise PolicyError(f"seed must be an integer, got {seed!r}")
        self.seed = seed
        w: dict[int, float] = {}
        for name, value in weights.items():
            idx = self.tier_index(name, "weight for tier")
            try:
                v = float(value)
            except (TypeError, ValueError):
                raise PolicyError(f"weight for tier {name!r} must be a number, got {value!r}") from None
            if not math.isfinite(v) or v < 0:
                raise PolicyError(f"weight for tier {name!r} must be a finite number >= 0, got {value!r}")
            w[idx] = v
        total = sum(w.values())
        if total <= 0:
            raise PolicyError("weights sum to 0: at least one tier needs a positive weight")
        self.weights = {i: v / total for i, v in sorted(w.items()) if v > 0}
        acc = 0.0
        cum: list[tuple[int, float]] = []
        for i, v in self.weights.items():
            acc += v
            cum.append((i, acc))
        cum[-1] = (cum[-1][0], 1.0)  # no rounding gap at the top
        self._cumulative = tuple(cum)
        self._fallback = tuple(self.weights) + tuple(t.index for t in self.tiers if t.index not in self.weights)

    def route(self, query_id: str) -> int:
        return pick(self._cumulative, draw(self.seed, query_id))

    def plan(self, query: Query) -> Plan:
        first = self.route(query.id)
        return Plan(first=first, allowed=(first,) + tuple(i for i in self._fallback if i != first))

    def decide(self, query: Query, attempts: Sequence[Attempt]) -> Decision:
        return Decision("accept", "routed at random" if len(attempts) == 1 else "fallback tier")

    def params(self) -> dict[str, Any]:
        return {"weights": {self.tiers[i].name: v for i, v in self.weights.items()}, "seed": self.seed}
