"""Risk-controlled automix and cascade routing (Learn then Test, see `ltt`).

Their tuners sweep one scalar knob, lam, per chain. Learn, on the learn part
only: the policy's own tuner is fitted there (its estimators too) and every
configuration it sweeps is replayed on the learn rows for its per-query loss
against the reference; the cheapest configuration with learn loss <= alpha is the
anchor, and the path is every configuration of the anchor's chain ordered by
learn cost, dearest (most escalation) first. If nothing is certified the answer is
the reference alone (the `single` policy).
"""
from __future__ import annotations

import json
from typing import Any, Callable, Sequence

import numpy as np

from router.core.policies import make_policy
from router.core.policy import TierInfo
from router.lab.labelled import Table
from router.lab.simulate import simulate
from router.lab.tuning import Tuner, TuningError

from .ltt import RiskControlled, RiskSpec, losses_against


class RiskControlledSweep(RiskControlled):
    def __init__(self, table: Table, infos: Sequence[TierInfo], *, risk_spec: RiskSpec, policy: str,
                 learner: Callable[..., Tuner], **options: Any):
        self.policy = policy
        super().__init__(table, infos, risk_spec)
        self._cache: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = {}
        configs = getattr(learner(self.learn, infos, **options), "configs", None)
        if not configs:
            raise TuningError(f"risk-controlled {policy}: its tuner exposes no configurations to test")
        self.configurations = len(configs)
        ref_l = self.learn.correct[self.ref]
        loss, cost = [], []
        for p in configs:
            c, t = self.outcome(p, self.learn)
            loss.append(losses_against(ref_l, c).mean())
            cost.append(t.mean())
        loss_a, cost_a = np.array(loss), np.array(cost)
        ok = np.flatnonzero(loss_a <= risk_spec.alpha)
        if ok.size:
            anchor = configs[int(ok[np.argmin(cost_a[ok])])]
            same = [i for i, p in enumerate(configs) if p.get("chain") == anchor.get("chain")]
            self.path = [configs[i] for i in sorted(same, key=lambda i: (-cost_a[i], loss_a[i]))]
        self.test()

    def outcome(self, cfg: dict[str, Any], table: Table) -> tuple[np.ndarray, np.ndarray]:
        key = (id(table), json.dumps(cfg, sort_keys=True))
        if key not in self._cache:
            outs = simulate(make_policy(self.policy, self.infos, cfg), table.tiers, table.records)
            self._cache[key] = (np.array([o.correct if o.correct is not None else 0.0 for o in outs]),
                                np.array([o.cost_usd for o in outs]))
        return self._cache[key]

    def params(self, cfg: dict[str, Any]) -> dict[str, Any]:
        return cfg

    def fallback(self) -> tuple[str, dict[str, Any]]:
        return "single", {"tier": self.infos[self.ref].name}
