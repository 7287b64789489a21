"""FrugalGPT (Chen, Zaharia, Zou 2023): a chain of up to three models, each answer
scored by a learned scorer g(query, answer) -> P(correct); stop at the first
tier whose score reaches its threshold, the last tier always answers.

The scorers (`router.core.scorers.AnswerScorer`, one per non-last tier of the
chain) read only text: the answer's form, whether it agrees with the earlier
tiers' answers, and optionally sentence embeddings of query and answer, checks of
a worked numeric answer's arithmetic (`router.core.worked`) and the query's hashed
words. So the policy runs where no log-probs exist. `cascade tune --policy frugalgpt` fits the
scorers and searches the chain and thresholds on train rows (FrugalGPT's
budgeted chain search, `router.lab.tuners.frugalgpt`).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from ..attempt import Attempt, Query
from ..errors import PolicyError
from ..policy import ChainPolicy, Decision, Knob, Needs, TierInfo, finite_number
from ..scorers import AnswerScorer, embed_missing


class FrugalGPT(ChainPolicy):
    name = "frugalgpt"
    summary = "FrugalGPT: accept when a learned scorer of (query, answer, earlier answers) reaches the tier's threshold"
    knobs = (
        Knob("thresholds", "per_tier_float", "per tier: accept when the scorer's P(correct) >= threshold"),
        Knob("chain", "tier_list", "the tiers climbed, cheapest first (at most 3 in FrugalGPT)"),
        Knob("scorers", "choice", "per tier: the fitted answer scorer (fitted by the tuner)"),
    )

    def __init__(self, tiers: Sequence[TierInfo], chain: Sequence[str] | None = None,
                 thresholds: Mapping[str, float] | None = None, scorers: Mapping[str, Any] | None = None):
        super().__init__(tiers)
        self.chain = self.tier_list(list(chain) if chain is not None else [t.name for t in self.tiers])
        thresholds, scorers = dict(thresholds or {}), dict(scorers or {})
        self.thresholds: dict[int, float] = {}
        self.scorers: dict[int, AnswerScorer] = {}
        for pos, i in enumerate(self.chain[:-1]):
            name = self.tiers[i].name
            if name not in thresholds or name not in scorers:
                raise PolicyError(f"policy 'frugalgpt': tier {name!r} of the chain needs a threshold and a scorer "
                                  f"(fit them with `cascade tune --policy frugalgpt`)")
            self.thresholds[i] = finite_number(thresholds[name], f"threshold for tier {name!r}")
            sc = AnswerScorer(scorers[name], f"scorers[{name!r}]")
            if sc.agree != pos:
                raise PolicyError(f"scorers[{name!r}] compares with {sc.agree} earlier answer(s), but the tier is at "
                                  f"position {pos + 1} of the chain")
            self.scorers[i] = sc
        for name in list(thresholds) + list(scorers):
            if self.tier_index(name, "threshold/scorer for tier") not in self.chain[:-1]:
                raise PolicyError(f"threshold/scorer for tier {name!r}: not a non-last tier of the chain")

    def needs(self, tier: int) -> Needs:
        return Needs()

    def warm(self, texts: Sequence[str]) -> None:
        """Embed, in one batch, texts the scorers will read (the lab's replay calls this)."""
        if any(sc.text for sc in self.scorers.values()):
            embed_missing(texts)

    def decide(self, query: Query, attempts: Sequence[Attempt]) -> Decision:
        cur = attempts[-1]
        later = self.rest_of_chain(cur)
        if not later:
            return Decision("accept", "last tier of the chain")
        pos = self.chain.index(cur.tier_index)
        by_tier = {a.tier_index: a.text for a in attempts[:-1]}
        earlier = [by_tier.get(t) for t in self.chain[:pos]]
        score = self.scorers[cur.tier_index].score(query.prompt, cur.text, earlier, cur.signals)
        th = self.thresholds[cur.tier_index]
        if score >= th:
            return Decision("accept", f"scorer P(correct)={score:.4g} >= {th:.4g}", score=score)
        return Decision("escalate", f"scorer P(correct)={score:.4g} < {th:.4g}", next_tier=later[0], score=score)

    def params(self) -> dict[str, Any]:
        non_last = self.chain[:-1]
        return {
            "chain": [self.tiers[i].name for i in self.chain],
            "thresholds": {self.tiers[i].name: self.thresholds[i] for i in non_last},
            "scorers": {self.tiers[i].name: self.scorers[i].params() for i in non_last},
        }

    @staticmethod
    def brief(params: Mapping[str, Any]) -> str:
        th = params["thresholds"]
        return " > ".join(f"{t}@{th[t]:.3g}" if t in th else t for t in params["chain"])
