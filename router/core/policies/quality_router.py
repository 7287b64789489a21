"""The routing rule RouteLLM, CARGO and OptLLM share, generalised to N models.

Before any call a fitted predictor (`router.core.quality`) estimates a quality
q_m per model of `order` from the query alone; the query goes to the model with
the highest q_m - lam * cost_m (cost_m: the model's mean train cost divided by
the dearest one's, so lam is scale-free; ties go to the cheaper model). With two
models this is RouteLLM's rule, "strong when the predicted advantage exceeds a
threshold", and lam is that threshold (negative: the strong model unless the weak
one is predicted better by more than |lam|); lam = 0 picks the best predicted
quality.
Exactly one model is called (the others are only a fallback should it fail).
The portfolio's tiers must be exactly the fitted ones: a tier either side lacks
is an error naming it.

Subclasses name the predictor kinds they accept and may refine `choose`.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from ..attempt import Attempt, Query
from ..errors import PolicyError
from ..policy import Decision, Knob, Plan, Policy, TierInfo, finite_number
from ..quality import QueryEncoder, predictor_from_params

COMMON_KNOBS = (
    Knob("lam", "float", "route to argmax predicted quality - lam * relative cost"),
    Knob("order", "tier_list", "the routable tiers, cheapest first"),
    Knob("costs", "choice", "per tier: mean train cost relative to the dearest tier"),
    Knob("features", "choice", "the query encoder: text (embed or hashed), buckets, categories"),
    Knob("predictor", "choice", "the fitted per-model quality predictor (fitted by the tuner)"),
)


class QualityRouter(Policy):
    predictor_kinds: ClassVar[tuple[str, ...]] = ()
    _pcache: ClassVar[dict[str, dict[tuple[str, str | None], tuple[float, ...]]]] = {}

    def __init__(self, tiers: Sequence[TierInfo], lam: float = 0.0, order: Sequence[str] | None = None,
                 costs: Mapping[str, float] | None = None, features: Mapping[str, Any] | None = None,
                 predictor: Mapping[str, Any] | None = None):
        super().__init__(tiers)
        if predictor is None or costs is None or order is None:
            raise PolicyError(f"policy {self.name!r} needs a fitted `order`, `costs` and `predictor` "
                              f"(fit them with `cascade tune --policy {self.name}`)")
        self.lam = finite_number(lam, "lam")
        self.order = self.tier_list(list(order), "order")
        names = [self.tiers[i].name for i in self.order]
        if not isinstance(costs, Mapping) or set(costs) != set(names):
            raise PolicyError(f"costs must give one number per tier of the order ({', '.join(names)}), "
                              f"got {sorted(costs) if isinstance(costs, Mapping) else costs!r}")
        self.costs = np.array([finite_number(costs[n], f"costs[{n!r}]", low=0.0) for n in names])
        feats = dict(features or {})
        unknown = set(feats) - {"text", "buckets", "categories"}
        if unknown:
            raise PolicyError(f"features: unknown key(s) {sorted(unknown)}; known: text, buckets, categories")
        self.encoder = QueryEncoder(feats.get("text", "embed"), feats.get("buckets", 256), feats.get("categories", ()))
        self.predictor = predictor_from_params(predictor, len(self.order), self.encoder.dim, self.predictor_kinds)
        self._predictor_params = dict(predictor)
        extra = [t.name for t in self.tiers if t.index not in self.order]
        if extra:
            raise PolicyError(f"portfolio tier(s) {extra} have no fitted prediction in this {self.name} policy, "
                              f"fitted on {', '.join(names)}: refit it on data with those models, or drop those tiers")
        key = json.dumps([self.encoder.params(), names, self._predictor_params], sort_keys=True)
        fp = hashlib.sha256(key.encode()).hexdigest()
        if fp not in QualityRouter._pcache and len(QualityRouter._pcache) >= 64:
            QualityRouter._pcache.clear()
        self._cache = QualityRouter._pcache.setdefault(fp, {})

    def warm(self, texts: Sequence[str]) -> None:
        self.encoder.warm(texts)

    def qualities(self, query: Query) -> np.ndarray:
        """Predicted quality per tier of `order` (cached per fitted predictor, so the many
        instances an evaluation builds at different lam predict each query once)."""
        key = (query.prompt, query.category)
        hit = self._cache.get(key)
        if hit is None:
            if len(self._cache) >= 1 << 16:
                self._cache.clear()
            hit = self._cache[key] = tuple(float(v) for v in self.predictor.predict(
                self.encoder.vector(query.prompt, query.category)[None, :])[0])
        return np.array(hit)

    def choose(self, query: Query, q: np.ndarray) -> tuple[int, str]:
        """Position in `order` of the routed tier, and a note."""
        score = q - self.lam * self.costs
        pos = int(np.argmax(score))  # the first (cheapest) of equal maxima
        return pos, f"q={q[pos]:.3f}, q-lam*c={score[pos]:.3f}"

    def plan(self, query: Query) -> Plan:
        pos, note = self.choose(query, self.qualities(query))
        first = self.order[pos]
        rest = tuple(i for i in self.order if i != first)
        return Plan(first=first, allowed=(first,) + rest, note=note)

    def decide(self, query: Query, attempts: Sequence[Attempt]) -> Decision:
        return Decision("accept", "routed before the call" if len(attempts) == 1 else "fallback tier")

    @staticmethod
    def brief(params: Mapping[str, Any]) -> str:
        """One line for the evaluate table (the fitted arrays are left out)."""
        p = params.get("predictor") or {}
        return (f"{p.get('kind')} on {params.get('features', {}).get('text')}, lam={float(params['lam']):.3g} over "
                + " < ".join(params["order"]))

    def params(self) -> dict[str, Any]:
        names = [self.tiers[i].name for i in self.order]
        return {
            "lam": self.lam,
            "order": names,
            "costs": {n: float(c) for n, c in zip(names, self.costs)},
            "features": self.encoder.params(),
            "predictor": self._predictor_params,
        }
