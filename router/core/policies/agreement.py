"""Agreement cascade: accept an answer that earlier tiers of the chain gave too.

No confidence signal is read, only the answers' text, so this runs on any
backend. The chain's first tier always escalates (nothing to compare with yet);
each later tier but the last accepts when its answer is the same as at least
`min_agree` answers of the tiers before it in the chain (compared in canonical
form, `router.core.answers`, as `answer_kind`); the last tier accepts. Two cheap
models that agree are right more often than either alone, and their
disagreement is what sends a query to the dear model.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from ..answers import KINDS, normalize_answer
from ..attempt import Attempt, Query
from ..errors import PolicyError
from ..policy import ChainPolicy, Decision, Knob, Needs, TierInfo


class AgreementCascade(ChainPolicy):
    name = "agreement"
    summary = "accept an answer that at least min_agree earlier tiers of the chain gave too"
    knobs = (
        Knob("chain", "tier_list", "the tiers climbed, cheapest first; the first never accepts, the last always"),
        Knob("min_agree", "int", "earlier answers that must match for a tier to accept", low=1, high=3),
        Knob("answer_kind", "choice", "how answers are compared", choices=KINDS),
    )

    def __init__(self, tiers: Sequence[TierInfo], chain: Sequence[str] | None = None, min_agree: int = 1,
                 answer_kind: str = "auto"):
        super().__init__(tiers)
        self.chain = self.tier_list(list(chain) if chain is not None else [t.name for t in self.tiers])
        if isinstance(min_agree, bool) or not isinstance(min_agree, int) or min_agree < 1:
            raise PolicyError(f"min_agree must be a whole number >= 1, got {min_agree!r}")
        if min_agree > len(self.chain) - 2:
            raise PolicyError(f"min_agree={min_agree} can never be met on a chain of {len(self.chain)} tiers "
                              f"(at most {max(len(self.chain) - 2, 0)} earlier answers before the last tier)")
        if answer_kind not in KINDS:
            raise PolicyError(f"answer_kind must be one of {', '.join(KINDS)}, got {answer_kind!r}")
        self.min_agree = min_agree
        self.answer_kind = answer_kind

    def needs(self, tier: int) -> Needs:
        return Needs()

    def decide(self, query: Query, attempts: Sequence[Attempt]) -> Decision:
        cur = attempts[-1]
        later = self.rest_of_chain(cur)
        if not later:
            return Decision("accept", "last tier of the chain")
        mine = normalize_answer(cur.text, self.answer_kind)
        earlier = [a for a in attempts[:-1] if a.tier_index in self.chain]
        same = sum(mine is not None and normalize_answer(a.text, self.answer_kind) == mine for a in earlier)
        if same >= self.min_agree:
            return Decision("accept", f"answer matches {same} earlier tier(s)", score=float(same))
        return Decision("escalate", f"answer matches {same} of {len(earlier)} earlier tier(s), "
                                    f"needs {self.min_agree}", next_tier=later[0], score=float(same))

    def params(self) -> dict[str, Any]:
        return {"chain": [self.tiers[i].name for i in self.chain], "min_agree": self.min_agree,
                "answer_kind": self.answer_kind}

    @staticmethod
    def brief(params: Mapping[str, Any]) -> str:
        return f"min_agree={params['min_agree']} ({params['answer_kind']}): " + " > ".join(params["chain"])
