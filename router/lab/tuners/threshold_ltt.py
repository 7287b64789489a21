"""Risk-controlled threshold cascade (Learn then Test, see `ltt`).

Learn, on the learn part only: every chain of 1-3 tiers cheaper than the
reference on learn (undominated, at most 6 of them), with the reference last,
and thresholds from each tier's learn confidences; the cheapest configuration
with learn loss <= alpha is the anchor. The path runs on the anchor's chain from
"almost always escalate" towards the anchor and past it: every non-last tier
accepts the share min(1, lam * s) of the learn queries, s its share at the
anchor, lam rising in `steps` steps to 1 and as many again to 2.
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Sequence

import numpy as np

from router.core.policy import TierInfo
from router.lab.labelled import Table
from router.lab.tuning import NotApplicable, TuningError, pick_signal

from .ltt import RiskControlled, RiskSpec, losses_against
from .threshold import GRID, _candidates, chain_grid

MAX_CHEAP_TIERS = 6


def threshold_rows(table: Table, signal: str, chain: Sequence[int], thresholds: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Per-query correctness and cost of one threshold configuration (the policy's
    rule: accept where signal >= threshold, a missing signal escalates, the last
    tier of the chain accepts)."""
    n = table.n
    correct, cost = np.zeros(n), np.zeros(n)
    alive = np.ones(n, dtype=bool)
    conf = table.conf[signal]
    for pos, tier in enumerate(chain):
        cost[alive] += table.cost[tier, alive]
        if pos == len(chain) - 1:
            accept = alive
        else:
            with np.errstate(invalid="ignore"):
                accept = alive & (conf[tier] >= thresholds[pos])
        correct[accept] = table.correct[tier, accept]
        alive = alive & ~accept
    return correct, cost


class RiskControlledThreshold(RiskControlled):
    policy = "threshold"

    def __init__(self, table: Table, infos: Sequence[TierInfo], *, risk_spec: RiskSpec, signal: str | None = None,
                 chain: Sequence[str] | None = None, max_tiers: int = 4, prune: bool = True, **options: Any):
        options.pop("min_tiers", None)  # every chain here ends at the reference: lengths 1..max_tiers
        if options:
            raise TuningError(f"risk-controlled threshold: unknown tuning option(s) {sorted(options)}")
        super().__init__(table, infos, risk_spec)
        self.signal = pick_signal(table, signal, "a threshold cascade")
        if not np.isfinite(table.conf[self.signal]).any():
            raise NotApplicable(f"no finite {self.signal!r} confidence is recorded, so a threshold cascade cannot run")
        acc_l, cost_l = self.learn.accuracy(), self.learn.mean_cost()
        self._path(self._chains(chain, self.by_name, acc_l, cost_l, max_tiers, prune))
        self.test()
        self.search["signal"] = self.signal

    # -- learn ---------------------------------------------------------------
    def _chains(self, chain, by_name, acc, cost, max_tiers, prune) -> list[tuple[int, ...]]:
        if chain is not None:
            bad = [c for c in chain if c not in by_name]
            if bad:
                raise TuningError(f"chain tier(s) {bad} are not tiers here; tiers: {', '.join(by_name)}")
            c = tuple(by_name[x] for x in chain)
            if c[-1] != self.ref:
                raise TuningError(f"a risk-controlled chain ends at the reference tier {self.infos[self.ref].name!r}; "
                                  f"got {list(chain)}")
            return [c]
        has_conf = np.isfinite(self.learn.conf[self.signal]).any(axis=1)
        cheap = [i for i in range(len(self.infos)) if i != self.ref and cost[i] < cost[self.ref] and has_conf[i]]
        if prune:
            cheap = [i for i in cheap if not any(
                cost[j] <= cost[i] and acc[j] >= acc[i] and (cost[j] < cost[i] or acc[j] > acc[i]) for j in cheap)]
        cheap.sort(key=lambda i: (cost[i], i))
        if len(cheap) > MAX_CHEAP_TIERS:
            pos = np.unique(np.round(np.linspace(0, len(cheap) - 1, MAX_CHEAP_TIERS)).astype(int))
            cheap = [cheap[p] for p in pos]
        out = [(self.ref,)]
        for size in range(1, min(max_tiers, 4)):
            out += [c + (self.ref,) for c in itertools.combinations(cheap, size)]
        return out

    def _path(self, chains: list[tuple[int, ...]]) -> None:
        L = self.learn
        ref_c = L.correct[self.ref]
        conf = L.conf[self.signal]
        risks, costs, grids = [], [], []
        for c in chains:
            cands = [_candidates(conf[i], GRID.get(len(c), 16)) for i in c[:-1]]
            # chain_grid sums "correct" over the accepted queries: fed losses, it sums losses
            r, t = chain_grid([conf[i] for i in c], [losses_against(ref_c, L.correct[i]) for i in c],
                              [L.cost[i] for i in c], cands)
            risks.append(r)
            costs.append(t)
            grids.append((c, cands))
        risk_l, cost_l = np.concatenate(risks), np.concatenate(costs)
        offsets = np.cumsum([0] + [r.size for r in risks])

        def config(flat: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
            g = int(np.searchsorted(offsets, flat, side="right") - 1)
            c, cands = grids[g]
            ix = np.unravel_index(flat - offsets[g], tuple(len(x) for x in cands)) if cands else ()
            return c, tuple(float(cands[j][ix[j]]) for j in range(len(cands)))

        anchor = None
        for i in np.lexsort((risk_l, cost_l)):  # cheapest first
            if risk_l[i] <= self.spec.alpha:
                anchor = config(int(i))
                break
        self.anchor = anchor
        self.configurations = int(risk_l.size)
        self.path = [] if anchor is None or len(anchor[0]) == 1 else self._walk(anchor)

    def _walk(self, anchor: tuple[tuple[int, ...], tuple[float, ...]]) -> list[tuple[tuple[int, ...], tuple[float, ...]]]:
        """Configurations on the anchor's chain from nearly the reference alone
        towards and past the anchor: every non-last tier accepts the share
        min(1, lam * s) of the learn queries, s its share at the anchor, lam rising."""
        chain, th = anchor
        conf = self.learn.conf[self.signal]
        values = [np.sort(conf[i][np.isfinite(conf[i])]) for i in chain[:-1]]
        shares = [float(np.mean(v >= t)) for v, t in zip(values, th)]
        steps = self.spec.steps
        out: list[tuple[tuple[int, ...], tuple[float, ...]]] = []
        for lam in np.linspace(0, 2, 2 * steps + 1)[1:]:
            cut = []
            for v, s in zip(values, shares):
                a = min(1.0, lam * s)
                k = int(math.ceil(a * v.size))  # accept the k most confident learn queries
                cut.append(float(v[-k]) if k >= 1 else float(v[-1]) + 1.0)
            cfg = (chain, tuple(cut))
            if not out or out[-1] != cfg:
                out.append(cfg)
        return out

    def outcome(self, cfg, table: Table) -> tuple[np.ndarray, np.ndarray]:
        return threshold_rows(table, self.signal, *cfg)

    def params(self, cfg) -> dict[str, Any]:
        chain, th = cfg
        names = [self.infos[i].name for i in chain]
        return {"signal": self.signal, "thresholds": {names[j]: th[j] for j in range(len(th))}, "chain": names}

    def fallback(self) -> tuple[str, dict[str, Any]]:
        return self.policy, {"signal": self.signal, "thresholds": {}, "chain": [self.infos[self.ref].name]}
