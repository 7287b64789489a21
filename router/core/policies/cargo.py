"""CARGO (Barrak et al., 2025; method 10): per-model score regression, the top-2
gap, and a tie-break stage.

A regression per model ("linear" predictor, identity link) predicts the score
(here: correctness) each model would get on the query. The models are ranked by
predicted score - lam * relative cost; when the top two are within `delta` of each
other the prediction is uncertain and a pairwise classifier fitted on the train
rows where exactly those two differed decides between them (P(first beats
second) >= 0.5, else the second). Without a tie-break model for that pair the
cheaper of the two is taken.

Params: those of `QualityRouter` plus delta and tiebreak {"a|b": {"w": packed,
"b": number}} with a, b tier names of the order (a cheaper than b).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from ..attempt import Query
from ..errors import PolicyError
from ..policy import Knob, TierInfo, finite_number
from ..quality import sigmoid, unpack
from .quality_router import COMMON_KNOBS, QualityRouter


class Cargo(QualityRouter):
    name = "cargo"
    summary = "CARGO: per-model score regression; a pairwise tie-break when the top-2 gap is below delta"
    knobs = COMMON_KNOBS + (
        Knob("delta", "float", "top-2 gap below which the pairwise tie-break decides", low=0.0),
    )
    predictor_kinds = ("linear",)

    def __init__(self, tiers: Sequence[TierInfo], delta: float = 0.0,
                 tiebreak: Mapping[str, Mapping[str, Any]] | None = None, **kw: Any):
        super().__init__(tiers, **kw)
        self.delta = finite_number(delta, "delta", low=0.0)
        names = [self.tiers[i].name for i in self.order]
        self.tiebreak: dict[tuple[int, int], tuple[np.ndarray, float]] = {}
        self._tiebreak_params = {}
        for key, m in (tiebreak or {}).items():
            a, sep, b = str(key).partition("|")
            if not sep or a not in names or b not in names:
                raise PolicyError(f"tiebreak key {key!r} must be 'a|b' with a and b tiers of the order ({', '.join(names)})")
            if not isinstance(m, Mapping):
                raise PolicyError(f"tiebreak[{key!r}] must be {{'w': packed array, 'b': number}}")
            w = unpack(m.get("w"), f"tiebreak[{key!r}].w", (self.encoder.dim,))
            self.tiebreak[(names.index(a), names.index(b))] = (w, finite_number(m.get("b"), f"tiebreak[{key!r}].b"))
            self._tiebreak_params[str(key)] = dict(m)

    def choose(self, query: Query, q: np.ndarray) -> tuple[int, str]:
        score = q - self.lam * self.costs
        ranked = sorted(range(len(score)), key=lambda j: (-score[j], j))
        top = ranked[0]
        if len(ranked) < 2 or score[top] - score[ranked[1]] >= self.delta:
            return top, f"score={score[top]:.3f}"
        a, b = sorted(ranked[:2])  # a is the cheaper (earlier in the order)
        tb = self.tiebreak.get((a, b))
        if tb is None:
            return a, f"top-2 gap {score[top] - score[ranked[1]]:.3f} < delta: the cheaper"
        x = self.encoder.vector(query.prompt, query.category)
        p = float(sigmoid(np.array(x @ tb[0] + tb[1])))
        return (a if p >= 0.5 else b), f"top-2 gap < delta: tie-break P({a} beats {b})={p:.3f}"

    def params(self) -> dict[str, Any]:
        return {**super().params(), "delta": self.delta, "tiebreak": self._tiebreak_params}
