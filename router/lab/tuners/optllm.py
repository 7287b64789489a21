"""Tuner of the optllm policy: B bootstrap logistic regressions per model on the
train rows; kappa (caution) and lam searched on out-of-fold predictions."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from router.core.policies.optllm import route_all
from router.core.quality import sigmoid, unpack
from router.lab.quality_fit import fit_bootstrap

from .quality_routing import QualityRoutingTuner

KAPPAS = (0.0, 0.5, 1.0, 2.0)


class OptLLMTuner(QualityRoutingTuner):
    policy = "optllm"

    def configure(self, members: int = 8, l2: float = 1e-3, kappas: Sequence[float] = KAPPAS, **options: Any) -> None:
        self.members, self.l2, self.kappas = int(members), float(l2), tuple(float(k) for k in kappas)
        super().configure(**options)

    def fit_predictor(self, X: np.ndarray, Y: np.ndarray) -> dict[str, Any]:
        return fit_bootstrap(X, Y, members=self.members, l2=self.l2, kappa=0.0, seed=self.seed)

    def extra_params(self) -> dict[str, Any]:
        return {"batch_budget": None}  # per query by lam; set it to assign whole batches

    def decision_rules(self, pol, q_in, q_sel, sel):
        # the members' predictions, in-sample and out-of-fold; the spread is applied per kappa
        k, X = len(self.enc.order), self.enc.X
        m_in = _members(self.base["predictor"], X, k)
        m_oof = np.full((m_in.shape[0], X.shape[0], k), np.nan)
        for params, te in self.fold_fits:
            m_oof[:, te] = _members(params, X[te], k)
        m_oof = m_oof[:, sel]
        c = self.enc.rel_cost
        for kappa in self.kappas:
            qi = m_in.mean(axis=0) - kappa * m_in.std(axis=0)
            qs = m_oof.mean(axis=0) - kappa * m_oof.std(axis=0)
            yield ({"predictor": {**self.base["predictor"], "kappa": kappa}},
                   (lambda lam, q=qi: route_all(q, c, lam)), (lambda lam, q=qs: route_all(q, c, lam)))


def _members(params: dict[str, Any], X: np.ndarray, k: int) -> np.ndarray:
    W = unpack(params["W"], "W", (None, k, X.shape[1]))
    b = unpack(params["b"], "b", (W.shape[0], k))
    return sigmoid(np.einsum("nd,bkd->bnk", X, W) + b[:, None, :])
