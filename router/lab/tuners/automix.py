"""Tuner of the automix policy.

- automix: per pair of undominated tiers in cost order (the cheaper with a
  finite verifier probability: p_true, or p_verify from live calls), `bins` quantile bins of
  the cheaper tier's verifier probability; state
  priors and P(bin | state) with one pseudo-count; the mean accuracy gain of
  escalating per state; lam: 0, the midpoints between the critical values
  E[gain | bin] / cost (where the decision of some bin flips), and one above.
"""
from __future__ import annotations

import itertools
from typing import Any, Sequence

import numpy as np

from router.core.policies.automix import Step
from router.core.policy import TierInfo
from router.lab.labelled import Table
from router.lab.tuning import (
    NotApplicable,
    SweepTuner,
    TuningError,
    bin_index,
    given_chain,
    quantile_edges,
    round6,
    undominated_pool,
)

VERIFIER_SIGNALS = ("p_true", "p_verify")  # recorded self-verification, or AutoMix's live k-sample verifier


def fit_step(x: np.ndarray, cur: np.ndarray, nxt: np.ndarray, cost_next: np.ndarray, bins: int = 8) -> dict[str, Any]:
    """AutoMix's meta-verifier tables for one step (this tier -> the next), from train rows."""
    edges = quantile_edges(x, bins)
    k = len(edges) + 1
    b = bin_index(x, edges)
    right, right_next = cur >= 0.5, nxt >= 0.5
    states = {"good": right, "needy": ~right & right_next, "hopeless": ~right & ~right_next}
    n = len(cur)
    delta = nxt - cur
    default_gain = {"good": -1.0, "needy": 1.0, "hopeless": 0.0}
    prior, lik, gain = {}, {}, {}
    for s, rows in states.items():
        prior[s] = round6((rows.sum() + 1) / (n + 3))
        fin = rows & (b >= 0)
        cnt = np.bincount(b[fin], minlength=k)
        lik[s] = [round6((c + 1) / (fin.sum() + k)) for c in cnt]
        gain[s] = round6(delta[rows].mean()) if rows.any() else default_gain[s]
    return {"edges": edges, "prior": prior, "likelihood": lik, "gain": gain, "cost": float(cost_next.mean())}


class AutoMixTuner(SweepTuner):
    policy = "automix"

    def __init__(self, table: Table, infos: Sequence[TierInfo], *, chain: Sequence[str] | None = None,
                 prune: bool = True, bins: int = 8, max_tiers: int = 2, signal: str | None = None,
                 **options: Any):
        super().__init__(table, infos, **options)
        if signal not in (None, *VERIFIER_SIGNALS):
            raise NotApplicable(f"automix bins a self-verification probability ({' or '.join(VERIFIER_SIGNALS)}), "
                                f"not {signal!r}")
        signal = signal or "p_true"
        conf = table.conf.get(signal, np.full(table.correct.shape, np.nan))
        has = np.isfinite(conf).any(axis=1)
        if not has.any():
            raise NotApplicable(f"automix needs a self-verification probability ({signal}) and none is recorded")
        if not 2 <= max_tiers <= 3:
            raise TuningError(f"automix: max_tiers must be 2 or 3, got {max_tiers}")
        by_name = {t.name: t.index for t in infos}
        self.search: dict[str, Any] = {"signal": signal, "bins": bins}
        if chain is not None:
            chains = [given_chain(chain, by_name)]
        else:
            pool, pruned = undominated_pool(table, infos, prune)
            self.search.update({"models": [infos[i].name for i in pool], "pruned": pruned})
            chains = [c for size in range(2, max_tiers + 1) for c in itertools.combinations(pool, size)
                      if all(has[i] for i in c[:-1])]
            if not chains:
                raise NotApplicable(f"automix: no chain of undominated tiers {self.search['models']} has a "
                                    f"cheaper tier with {signal}")
        configs = []
        for c in chains:
            names = [infos[i].name for i in c]
            steps = {names[p]: fit_step(conf[c[p]], table.correct[c[p]], table.correct[c[p + 1]], table.cost[c[p + 1]], bins)
                     for p in range(len(c) - 1)}
            crit = set()
            for n, d in steps.items():
                st = Step(n, d)
                if st.cost <= 0:
                    continue
                vals = [None] + [st.edges[0] - 1.0 if st.edges else 0.0] + list(st.edges)
                for v in vals:
                    g, _ = st.expected_gain(v)
                    if g > 0:
                        crit.add(g / st.cost)
            cs = sorted(crit)
            lams = [0.0] + [(a + b2) / 2 for a, b2 in zip(cs, cs[1:])] + ([cs[-1] * 2.0] if cs else [])
            for lam in lams:
                configs.append({"signal": signal, "lam": lam, "chain": names, "steps": steps})
        self.search["chains"] = len(chains)
        self._sweep(configs)
