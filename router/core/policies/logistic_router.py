"""Pre-call learned router (RouteLLM / Hybrid LLM style, methods 8 and 9).

Before any call, a per-model logistic regression on features of the query text
alone (`router.core.features`: hashed words and bigrams of the prompt, log prompt
length, the category one-hot when known) predicts p_m = P(model m answers
correctly | query). The query goes to the cheapest model (params `order`,
cheapest first) with p_m >= alpha; if none reaches alpha, to the model with the
highest p_m (ties: the cheaper). Exactly one model is called (the others are
only a fallback should that call fail). With two models this is Hybrid LLM's
"small model if p >= threshold" and RouteLLM's threshold alpha.

Params (JSON): alpha; order (tier names, cheapest first); features
{buckets, categories, shapes (optional: hash the word shapes too)}; models {tier: {bias, w: "column:weight ..."}} (the
non-zero weights, rounded to 4 decimals, as one compact string). The tuner
(`router.lab.tuners.logistic_router`) fits the weights on the train rows only
and sweeps alpha.
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Mapping, Sequence

import numpy as np

from ..attempt import Attempt, Query
from ..errors import PolicyError
from ..features import DEFAULT_BUCKETS, QueryFeaturizer, sigmoid
from ..policy import Decision, Knob, Plan, Policy, TierInfo

WEIGHT_DECIMALS = 4


def weights_text(pairs) -> str:
    """Sparse weights as one compact JSON string: "column:weight column:weight ..."."""
    return " ".join(f"{int(c)}:{float(w)!r}" for c, w in pairs)


def weight_pairs(w: str | Sequence[Sequence[float]]) -> list[tuple[int, float]]:
    """The inverse of `weights_text` (a list of [column, weight] pairs is accepted too)."""
    if isinstance(w, str):
        return [(int(c), float(v)) for c, v in (t.split(":") for t in w.split())]
    return [(int(c), float(v)) for c, v in w]


class LogisticRouter(Policy):
    name = "logistic-router"
    summary = "pre-call learned router: cheapest model whose predicted P(correct | query) >= alpha"
    knobs = (
        Knob("alpha", "float", "route to the cheapest model whose predicted success >= alpha", low=0.0, high=1.0),
        Knob("order", "tier_list", "the routable tiers, cheapest first"),
        Knob("models", "choice", "per tier: the logistic regression's bias and weights (fitted by the tuner)"),
    )

    def __init__(self, tiers: Sequence[TierInfo], alpha: float = 0.5, order: Sequence[str] | None = None,
                 models: Mapping[str, Mapping[str, Any]] | None = None, features: Mapping[str, Any] | None = None):
        super().__init__(tiers)
        try:
            self.alpha = float(alpha)
        except (TypeError, ValueError):
            raise PolicyError(f"alpha must be a number, got {alpha!r}") from None
        if math.isnan(self.alpha):
            raise PolicyError("alpha is NaN")
        if not models:
            raise PolicyError("policy 'logistic-router' needs `models` (fit them with `cascade tune --policy logistic-router`)")
        self.order = self.tier_list(list(order) if order is not None
                                    else [t.name for t in self.tiers if t.name in models], "order")
        names = [self.tiers[i].name for i in self.order]
        feats = dict(features or {})
        unknown = set(feats) - {"buckets", "categories", "shapes"}
        if unknown:
            raise PolicyError(f"features: unknown key(s) {sorted(unknown)}; known: buckets, categories, shapes")
        try:
            self.featurizer = QueryFeaturizer.shared(feats.get("buckets", DEFAULT_BUCKETS), feats.get("categories", ()),
                                                     feats.get("shapes", False))
        except (TypeError, ValueError) as e:
            raise PolicyError(f"features: {e}") from None
        d = self.featurizer.dim
        self.W = np.zeros((len(self.order), d))
        self.b = np.zeros(len(self.order))
        self._models = {}
        for j, name in enumerate(names):
            m = models.get(name)
            if m is None:
                raise PolicyError(f"models: no model for tier {name!r} of the order")
            try:
                self.b[j] = float(m.get("bias", 0.0))
                pairs = weight_pairs(m.get("w", ""))
            except (TypeError, ValueError, AttributeError):
                raise PolicyError(f"models[{name!r}] must be {{'bias': number, 'w': 'column:weight ...'}}") from None
            for col, w in pairs:
                if not 0 <= col < d:
                    raise PolicyError(f"models[{name!r}]: column {col} outside 0..{d - 1}")
                self.W[j, col] = w
            self._models[name] = {"bias": float(self.b[j]), "w": weights_text(pairs)}
        extra = [n for n in models if n not in names]
        if extra:
            self.tier_index(extra[0], "models tier")  # an unknown name is an error; a known one is just unused
        self._fallback = tuple(t.index for t in self.tiers if t.index not in self.order)
        feats_key = json.dumps(self.params()["features"], sort_keys=True)
        self._caches = []
        for n in names:
            fp = hashlib.sha256((feats_key + json.dumps(self._models[n], sort_keys=True)).encode()).hexdigest()
            if fp not in LogisticRouter._pcache and len(LogisticRouter._pcache) >= 64:
                LogisticRouter._pcache.clear()
            self._caches.append(LogisticRouter._pcache.setdefault(fp, {}))

    # predictions per (tier model, query), shared by the instances an evaluation builds
    # for one fitted model at many alphas; keyed by the model's content, so exact
    _pcache: dict[str, dict[tuple[str, str | None], float]] = {}

    def probs(self, query: Query) -> list[float]:
        """Predicted P(correct) per tier of `order` (the same arithmetic the tuner replays)."""
        key = (query.prompt, query.category)
        got = [c.get(key) for c in self._caches]
        if None not in got:
            return got
        p = [float(v) for v in self._probs(query)]
        for c, v in zip(self._caches, p):
            if len(c) >= 1 << 16:
                c.clear()
            c[key] = v
        return p

    def _probs(self, query: Query) -> np.ndarray:
        idx, vals = self.featurizer(query.prompt, query.category)
        # row by row (elementwise product, then a sum along each row): a tier's value does
        # not depend on which other tiers are routable, so the tuner's replay is exact
        return sigmoid((self.W[:, idx] * vals).sum(axis=1) + self.b)

    def route(self, query: Query) -> tuple[int, float]:
        """Position in `order` of the routed tier, and its predicted success."""
        p = self.probs(query)
        for pos, v in enumerate(p):
            if v >= self.alpha:
                return pos, v
        pos = max(range(len(p)), key=p.__getitem__)  # the first of equal maxima
        return pos, p[pos]

    def plan(self, query: Query) -> Plan:
        pos, p = self.route(query)
        first = self.order[pos]
        rest = tuple(i for i in self.order if i != first) + self._fallback
        return Plan(first=first, allowed=(first,) + rest, note=f"p={p:.3f}")

    def decide(self, query: Query, attempts: Sequence[Attempt]) -> Decision:
        return Decision("accept", "routed before the call" if len(attempts) == 1 else "fallback tier")

    @staticmethod
    def brief(params: Mapping[str, Any]) -> str:
        """One line for the evaluate table (the weights are left out)."""
        return f"alpha={float(params['alpha']):.3g} over " + " < ".join(params["order"])

    def params(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "order": [self.tiers[i].name for i in self.order],
            "features": {"buckets": self.featurizer.buckets, "categories": list(self.featurizer.categories),
                         **({"shapes": True} if self.featurizer.shapes else {})},
            "models": self._models,
        }

