"""Hybrid LLM (Ding et al., ICLR 2024; method 9): route to the small model when
its predicted quality gap to the large one is small enough.

A classifier on the query ("linear" predictor with one output) estimates
p(x) = P(small model's quality >= large model's - t); the query goes to `small`
when p(x) >= `threshold`, else to `large`. Exactly one model is called. The
tuner fits it with one of three label kinds (`labels`): deterministic 1[H >= 0]
on the recorded outcomes, probabilistic (the share of similar train queries
where H >= 0, standing in for the paper's sampled responses when one response
per model is recorded), or transformed (the same smoothed gap, relaxed by t
chosen so the labels are balanced).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from ..attempt import Attempt, Query
from ..errors import PolicyError
from ..policy import Decision, Knob, Plan, Policy, TierInfo, finite_number
from ..quality import QueryEncoder, predictor_from_params


class HybridLLM(Policy):
    name = "hybrid-llm"
    summary = "Hybrid LLM: small model when the predicted quality gap to the large one is small enough"
    knobs = (
        Knob("threshold", "float", "route small when P(gap small enough) >= threshold", low=0.0, high=1.0),
        Knob("small", "choice", "the cheap tier"),
        Knob("large", "choice", "the dear tier"),
        Knob("labels", "choice", "label kind the classifier was fitted on",
             choices=("deterministic", "probabilistic", "transformed")),
    )

    def __init__(self, tiers: Sequence[TierInfo], threshold: float = 0.5, small: str | None = None,
                 large: str | None = None, labels: str = "deterministic", t: float = 0.0,
                 features: Mapping[str, Any] | None = None, predictor: Mapping[str, Any] | None = None):
        super().__init__(tiers)
        if small is None or large is None or predictor is None:
            raise PolicyError("policy 'hybrid-llm' needs `small`, `large` and a fitted `predictor` "
                              "(fit them with `cascade tune --policy hybrid-llm`)")
        self.small, self.large = self.tier_list([small, large], "small/large")
        self.threshold = finite_number(threshold, "threshold")
        if labels not in ("deterministic", "probabilistic", "transformed"):
            raise PolicyError(f"labels must be deterministic, probabilistic or transformed, got {labels!r}")
        self.labels, self.t = labels, finite_number(t, "t")
        feats = dict(features or {})
        self.encoder = QueryEncoder(feats.get("text", "embed"), feats.get("buckets", 256), feats.get("categories", ()))
        self.predictor = predictor_from_params(predictor, 1, self.encoder.dim, ("linear",))
        self._predictor_params = dict(predictor)
        self._cache: dict[tuple[str, str | None], float] = {}

    def p_small(self, query: Query) -> float:
        key = (query.prompt, query.category)
        if key not in self._cache:
            self._cache[key] = float(self.predictor.predict(self.encoder.vector(query.prompt, query.category)[None, :])[0, 0])
        return self._cache[key]

    def plan(self, query: Query) -> Plan:
        p = self.p_small(query)
        first, other = (self.small, self.large) if p >= self.threshold else (self.large, self.small)
        rest = tuple(t.index for t in self.tiers if t.index not in (first, other))
        return Plan(first=first, allowed=(first, other) + rest, note=f"p_small={p:.3f}")

    def decide(self, query: Query, attempts: Sequence[Attempt]) -> Decision:
        return Decision("accept", "routed before the call" if len(attempts) == 1 else "fallback tier")

    @staticmethod
    def brief(params: Mapping[str, Any]) -> str:
        return (f"{params['labels']} labels, threshold={float(params['threshold']):.3g}: "
                f"{params['small']} else {params['large']}")

    def params(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "small": self.tiers[self.small].name, "large": self.tiers[self.large].name,
                "labels": self.labels, "t": self.t, "features": self.encoder.params(),
                "predictor": self._predictor_params}
