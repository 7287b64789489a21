"""Tuner of the gatekeeper policy: a Platt calibration per tier, then one threshold.

Each tier's calibration is fitted on every train row where its signal is
finite (`router.lab.scoring.fit_platt`; a tier whose rows are all right or all
wrong gets the constant P of its share, clipped to [0.01, 0.99]). Chains of
2..`max_tiers` undominated tiers in cost order are searched with one shared
tau drawn from the calibrated train values (at most `quantiles`). Calibrated
values are computed with the policy's own arithmetic, so the replay matches
`router.lab.simulate` exactly.
"""
from __future__ import annotations

import itertools
from typing import Any, Sequence

import numpy as np

from router.core.policies.gatekeeper import calibrated
from router.core.policy import TierInfo
from router.lab.labelled import Table
from router.lab.scoring import ScorerError, fit_platt
from router.lab.tuning import (
    Fitted,
    NotApplicable,
    Target,
    Tuner,
    TuningError,
    given_chain,
    pick_signal,
    select_index,
    undominated_pool,
)


def shared_threshold_grid(conf: Sequence[np.ndarray], correct: Sequence[np.ndarray], cost: Sequence[np.ndarray],
                          taus: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy and mean cost of a chain for each tau, one tau for every non-last
    tier (accept where conf >= tau; NaN never accepts; the last tier always)."""
    n = correct[0].shape[0]
    alive = np.ones((taus.size, n))
    acc = np.zeros(taus.size)
    tot = np.zeros(taus.size)
    with np.errstate(invalid="ignore"):
        for p in range(len(conf)):
            tot += alive @ cost[p]
            if p == len(conf) - 1:
                acc += alive @ correct[p]
                break
            accept = alive * (conf[p][None, :] >= taus[:, None])
            acc += accept @ correct[p]
            alive = alive - accept
    return acc / n, tot / n


class GatekeeperTuner(Tuner):
    policy = "gatekeeper"

    def __init__(self, table: Table, infos: Sequence[TierInfo], *, signal: str | None = None,
                 chain: Sequence[str] | None = None, max_tiers: int = 3, prune: bool = True, quantiles: int = 300,
                 **options: Any):
        super().__init__(table, infos, **options)
        if not 2 <= max_tiers <= 4:
            raise TuningError(f"gatekeeper: max_tiers must be 2..4, got {max_tiers}")
        self.signal = pick_signal(table, signal, "a calibrated cascade")
        raw = table.conf[self.signal]
        self.calibration: dict[int, list[float]] = {}
        notes = {}
        cal = np.full(raw.shape, np.nan)
        for i in range(len(infos)):
            fin = np.isfinite(raw[i])
            if not fin.any():
                continue
            try:
                a, b = fit_platt(raw[i, fin], table.correct[i, fin], f"calibration of tier {infos[i].name!r}")
            except ScorerError as e:
                share = float(np.clip(np.mean(table.correct[i, fin] >= 0.5), 0.01, 0.99))
                a, b = 0.0, float(np.log(share / (1 - share)))
                notes[infos[i].name] = str(e)
            self.calibration[i] = [a, b]
            cal[i, fin] = [calibrated(self.signal, v, a, b) for v in raw[i, fin]]
        if not self.calibration:
            raise NotApplicable(f"no finite {self.signal!r} is recorded, so no tier can be calibrated")
        if chain is not None:
            chains = [given_chain(chain, {t.name: t.index for t in infos})]
            bad = [infos[i].name for i in chains[0][:-1] if i not in self.calibration]
            if bad:
                raise TuningError(f"gatekeeper: tier(s) {bad} of the chain record no finite {self.signal!r}")
        else:
            pool, pruned = undominated_pool(table, infos, prune)
            chains = [c for size in range(2, max_tiers + 1) for c in itertools.combinations(pool, size)
                      if all(i in self.calibration for i in c[:-1])]
            if not chains:
                raise NotApplicable("gatekeeper: no chain of undominated tiers has calibrated non-last tiers")
        v = cal[np.isfinite(cal)]
        taus = np.unique(v) if v.size <= quantiles else np.unique(np.quantile(v, np.linspace(0, 1, quantiles), method="lower"))
        self.taus = np.concatenate([taus, [1.0 + 1e-9]])  # above every value: the chain's last tier for all
        self.chains = chains
        accs, costs = [], []
        for c in chains:
            a, t = shared_threshold_grid([cal[i] for i in c], [table.correct[i] for i in c],
                                         [table.cost[i] for i in c], self.taus)
            accs.append(a)
            costs.append(t)
        self._acc, self._cost = np.concatenate(accs), np.concatenate(costs)
        self.search = {"signal": self.signal, "calibration": "Platt (affine in log-odds), per tier, on all train rows",
                       "chains": len(chains), "taus": int(self.taus.size), "configurations": int(self._acc.size),
                       **({"constant_calibration": notes} if notes else {})}

    def select(self, target: Target) -> Fitted:
        i = select_index(self._acc, self._cost, self.resolve(target), f"gatekeeper ({self.signal})")
        ci, ti = divmod(i, self.taus.size)
        c = self.chains[ci]
        names = [self.infos[t].name for t in c]
        params = {"signal": self.signal, "tau": float(self.taus[ti]), "chain": names,
                  "calibration": {self.infos[t].name: self.calibration[t] for t in c[:-1]}}
        return self._fitted(target, params, self._acc[i], self._cost[i], search=dict(self.search))
