"""AutoMix (Aggarwal, Madaan et al., NeurIPS 2024), POMDP-lite meta-verifier.

The tier's self-verification probability (`p_true`) is binned; per non-last tier
of the chain the fitted params (router.lab.tuners.automix fits them on train) hold, for
the hidden states relative to the next tier of the chain
    good     = this tier right,
    needy    = this tier wrong, the next right,
    hopeless = both wrong,
their prior, P(bin | state), the mean accuracy gain of escalating in each state
(good: <= 0, needy: about +1, hopeless: about 0) and the next tier's mean cost.
Given the bin, the posterior over states gives the expected gain of escalating;
the query escalates when  E[gain | bin] - lam * cost_next > 0, else it stops on
this tier's answer. An absent signal leaves the prior as it is (no observation).
Chains longer than two tiers apply the rule step by step.
"""
from __future__ import annotations

from bisect import bisect_right
from typing import Any, Mapping, Sequence

from .. import pomdp
from ..attempt import Attempt, Query
from ..errors import PolicyError
from ..policy import ChainPolicy, Decision, Knob, TierInfo, finite_number
from ..signals import get

STATES = ("good", "needy", "hopeless")


class Step:
    def __init__(self, tier: str, d: Mapping[str, Any]):
        w = f"steps[{tier!r}]"
        if not isinstance(d, Mapping):
            raise PolicyError(f"{w} must be an object")
        for key in ("edges", "prior", "likelihood", "gain", "cost"):
            if key not in d:
                raise PolicyError(f"{w} lacks {key!r}")
        self.edges = [finite_number(x, f"{w}.edges") for x in d["edges"]]
        if any(b < a for a, b in zip(self.edges, self.edges[1:])):
            raise PolicyError(f"{w}.edges must be sorted")
        k = len(self.edges) + 1
        try:
            self.prior = {s: finite_number(d["prior"][s], f"{w}.prior.{s}") for s in STATES}
            self.gain = {s: finite_number(d["gain"][s], f"{w}.gain.{s}") for s in STATES}
            self.lik = {s: [finite_number(x, f"{w}.likelihood.{s}") for x in d["likelihood"][s]] for s in STATES}
        except (KeyError, TypeError):
            raise PolicyError(f"{w}: prior, gain and likelihood need the states {', '.join(STATES)}") from None
        if any(len(v) != k for v in self.lik.values()):
            raise PolicyError(f"{w}: each likelihood needs len(edges) + 1 = {k} values")
        if any(v < 0 for v in self.prior.values()) or sum(self.prior.values()) <= 0:
            raise PolicyError(f"{w}.prior must be >= 0 and not all 0")
        self.cost = finite_number(d["cost"], f"{w}.cost")
        self.raw = d

    def expected_gain(self, value: float | None) -> tuple[float, int | None]:
        b = None if value is None else bisect_right(self.edges, value)
        return pomdp.expected(pomdp.belief(self.prior, self.lik, b), self.gain), b

    def action(self, value: float | None, lam: float) -> tuple[str, float, int | None]:
        """The POMDP step: stop (reward 0: the answer stands) or escalate (the gain of the
        next tier's answer, at its cost), whichever is worth more under the belief."""
        b = None if value is None else bisect_right(self.edges, value)
        act, values = pomdp.best_action(pomdp.belief(self.prior, self.lik, b),
                                        {"accept": dict.fromkeys(STATES, 0.0), "escalate": self.gain},
                                        {"escalate": self.cost}, lam)
        return act, values["escalate"] + lam * self.cost, b


class AutoMix(ChainPolicy):
    name = "automix"
    summary = "AutoMix: escalate when the self-verification bin makes the expected gain beat lam x the next cost"
    knobs = (
        Knob("lam", "float", "price of quality: escalate when E[gain | bin] - lam*cost_next > 0", low=0.0),
        Knob("chain", "tier_list", "the tiers climbed, cheapest first (two in AutoMix)"),
        Knob("signal", "choice", "the self-verification signal that is binned (p_true)"),
    )

    def __init__(
        self,
        tiers: Sequence[TierInfo],
        steps: Mapping[str, Any] | None = None,
        lam: float = 0.0,
        chain: Sequence[str] | None = None,
        signal: str = "p_true",
    ):
        super().__init__(tiers)
        self.signal = self.signal_name(signal)
        self.lam = finite_number(lam, "lam", low=0.0)
        self.chain = self.tier_list(list(chain) if chain is not None else [t.name for t in self.tiers])
        self.steps: dict[int, Step] = {}
        for name, d in (steps or {}).items():
            self.steps[self.tier_index(name, "step for tier")] = Step(name, d)
        self.require_fitted(self.steps, "fitted step", "run `cascade tune --policy automix`")

    def decide(self, query: Query, attempts: Sequence[Attempt]) -> Decision:
        cur = attempts[-1]
        later = self.rest_of_chain(cur)
        if not later:
            return Decision("accept", "last tier of the chain")
        st = self.steps[cur.tier_index]
        value = get(cur.signals, self.signal)
        act, g, b = st.action(value, self.lam)
        seen = f"{self.signal} missing" if b is None else f"{self.signal}={value:.3g} (bin {b})"
        if act == "escalate":
            return Decision("escalate", f"{seen}: E[gain]={g:.3g} - lam*cost > 0", next_tier=later[0],
                            score=value)
        return Decision("accept", f"{seen}: E[gain]={g:.3g} - lam*cost <= 0", score=value)

    def params(self) -> dict[str, Any]:
        return {
            "signal": self.signal,
            "lam": self.lam,
            "chain": [self.tiers[i].name for i in self.chain],
            "steps": {self.tiers[i].name: dict(self.steps[i].raw) for i in self.chain[:-1]},
        }

    @staticmethod
    def brief(params: Mapping[str, Any]) -> str:
        return f"lam={float(params['lam']):.4g}: " + " > ".join(params["chain"])
