"""Tuner of the agreement cascade: which chain, and how many earlier answers must match.

Nothing is fitted but discrete choices, so what holds on train tends to hold on
new traffic. The answer kind is read off the train answers (`infer_kind`). Every
chain of 3 or 4 tiers in train cost order is searched (a 2-tier chain would pay
for the first tier and always take the second's answer), with min_agree 1, and
also 2 on 4-tier chains; and every set of four voters cheaper than the most
accurate train model (in cost order) that must all agree (min_agree 3), else that
model settles. The replay is vectorised over canonical answers and
reproduces `router.lab.simulate` exactly.
"""
from __future__ import annotations

import itertools
from typing import Any, Sequence

import numpy as np

from router.core.answers import infer_kind, normalize_answer
from router.core.policy import TierInfo
from router.lab.labelled import Table
from router.lab.tuning import Fitted, NotApplicable, Target, Tuner, TuningError, cost_order, given_chain, select_index

MAX_AGREEMENT_MODELS = 12


def answer_texts(table: Table) -> list[list[str | None]]:
    """The recorded answer text per (tier, row) of a table."""
    return [[r.responses[t.model].text for r in table.records] for t in table.tiers]


def canonical_answers(texts: Sequence[Sequence[str | None]], kind: str) -> np.ndarray:
    """(k, n) object array of canonical answers; None where a text has none."""
    out = np.empty((len(texts), len(texts[0]) if texts else 0), dtype=object)
    for i, row in enumerate(texts):
        for j, t in enumerate(row):
            a = normalize_answer(t, kind)
            out[i, j] = None if a is None else a.value
    return out


def agreement_matrix(canon: np.ndarray) -> np.ndarray:
    """(k, k, n) booleans: tier i's answer equals tier j's (both present)."""
    k, n = canon.shape
    present = np.array([[v is not None for v in row] for row in canon], dtype=bool)
    same = np.zeros((k, k, n), dtype=bool)
    for i in range(k):
        for j in range(k):
            if i != j:
                same[i, j] = present[i] & present[j] & (canon[i] == canon[j])
    return same


def agreement_replay(chain: Sequence[int], min_agree: int, same: np.ndarray, correct: np.ndarray,
                     cost: np.ndarray) -> tuple[float, float]:
    """Accuracy and mean cost of the agreement cascade over the table's rows."""
    n = correct.shape[1]
    alive = np.ones(n, dtype=bool)
    acc = tot = 0.0
    for p, t in enumerate(chain):
        tot += cost[t, alive].sum()
        if p == len(chain) - 1:
            acc += correct[t, alive].sum()
            break
        matches = sum((same[t, chain[q]].astype(int) for q in range(p)), np.zeros(n, dtype=int))
        accept = alive & (matches >= min_agree)
        acc += correct[t, accept].sum()
        alive &= ~accept
    return acc / n, tot / n


class AgreementTuner(Tuner):
    policy = "agreement"

    def __init__(self, table: Table, infos: Sequence[TierInfo], *, chain: Sequence[str] | None = None,
                 answer_kind: str | None = None, **options: Any):
        super().__init__(table, infos, **options)
        texts = answer_texts(table)
        if not any(t is not None and t.strip() for row in texts for t in row):
            raise NotApplicable("no answer text is recorded, so answers cannot be compared")
        kind = answer_kind or infer_kind(t for row in texts for t in row)
        same = agreement_matrix(canonical_answers(texts, kind))
        if chain is not None:
            chains = [given_chain(chain, {t.name: t.index for t in infos})]
            if len(chains[0]) < 3:
                raise TuningError("an agreement chain needs at least 3 tiers (two that vote, one that settles)")
        else:
            pool = cost_order(table)[:MAX_AGREEMENT_MODELS] if len(infos) > MAX_AGREEMENT_MODELS else cost_order(table)
            if len(pool) < 3:
                raise NotApplicable(f"an agreement cascade needs 3 tiers, the data have {len(pool)}")
            acc_tr, cost_tr = table.accuracy(), table.mean_cost()
            top = max(range(len(infos)), key=lambda i: (acc_tr[i], -cost_tr[i]))
            voters = [i for i in pool if cost_tr[i] < cost_tr[top]]
            chains = [c for size in (3, 4) for c in itertools.combinations(pool, size)]
            # four cheaper voters that must all agree, else the most accurate model settles: on data
            # where cheap models are often right together (routerbench-arc) this is what saves
            if len(voters) >= 4:
                chains += [c + (top,) for c in itertools.combinations(voters, 4)]
        self.configs: list[dict[str, Any]] = []
        acc, cost = [], []
        for c in chains:
            for m in (range(1, len(c) - 1) if len(c) <= 4 else (len(c) - 2,)):
                a, t = agreement_replay(c, m, same, table.correct, table.cost)
                self.configs.append({"chain": [infos[i].name for i in c], "min_agree": m, "answer_kind": kind})
                acc.append(a)
                cost.append(t)
        self._acc, self._cost = np.array(acc), np.array(cost)
        self.search = {"answer_kind": kind, "chains": len(chains), "configurations": len(self.configs),
                       "agrees_with_another_model": {infos[i].name: round(float(same[i].any(axis=0).mean()), 4)
                                          for i in range(len(infos))}}

    def select(self, target: Target) -> Fitted:
        i = select_index(self._acc, self._cost, self.resolve(target), "agreement cascade")
        return self._fitted(target, self.configs[i], self._acc[i], self._cost[i], search=dict(self.search))
