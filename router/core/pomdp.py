"""AutoMix's POMDP meta-verifier, the maths: a belief over hidden states from one
observation, and the action of highest expected reward under it. Pure.

Hidden states say how the current tier and the next one fare on the query (AutoMix's
"performance" states: here good = this tier right, needy = this tier wrong and the next
right, hopeless = both wrong). The observation is the binned verifier probability (with
k sampled verdicts, the count of yes). `belief` is Bayes' rule on the fitted prior and
P(observation | state); `best_action` picks, among the actions, the one maximising
E[reward | belief] - lam * cost. One step of the POMDP per tier of the chain: stopping
ends the episode, escalating moves to the next tier, where the next observation is made.
"""
from __future__ import annotations

from typing import Mapping, Sequence


def belief(prior: Mapping[str, float], likelihood: Mapping[str, Sequence[float]],
           obs: int | None) -> dict[str, float]:
    """P(state | obs) (normalised); the prior when obs is None (nothing observed) or when
    no state explains the observation."""
    post = {s: prior[s] * (1.0 if obs is None else likelihood[s][obs]) for s in prior}
    z = sum(post.values())
    if z <= 0:
        post, z = dict(prior), sum(prior.values())
    return {s: v / z for s, v in post.items()}


def expected(b: Mapping[str, float], reward: Mapping[str, float]) -> float:
    return sum(p * reward[s] for s, p in b.items())


def best_action(b: Mapping[str, float], rewards: Mapping[str, Mapping[str, float]],
                costs: Mapping[str, float], lam: float = 0.0) -> tuple[str, dict[str, float]]:
    """The action maximising E[reward | b] - lam * cost (ties: the first listed), and every
    action's value."""
    values = {a: expected(b, r) - lam * costs.get(a, 0.0) for a, r in rewards.items()}
    best = max(values, key=lambda a: values[a])  # max keeps the first of equal values
    return best, values
