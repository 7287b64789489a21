"""The one interface every routing/cascading method decides through.

A policy sees the tiers (names and prices), never a queue, a database or a model.
- `plan(query)`: before any call, which tier goes first and which tiers may be used
  at all (pre-call routers answer here; pruning hybrids narrow `allowed`).
- `decide(query, attempts)`: after each call, accept the answer, escalate to
  another tier, or reject (abstain), given every attempt so far.
- `needs(tier)`: what a call on that tier must return (token log-probs, top-k,
  extra samples, a self-verification), declared up front so a worker whose
  backend cannot provide it refuses at start-up rather than mid-batch.
- `params()`: the knobs, as plain JSON; `Policy(tiers, **params())` rebuilds it.

The workers and the offline evaluator both drive policies through
`router.cascade`, so what the evaluator reports is what the workers do.
"""
from __future__ import annotations

import difflib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Container, Literal, Protocol, Sequence

from .attempt import Attempt, Query
from .errors import PolicyError
from .live_signals import CALLS_FOR
from .signals import check_signal_name


def finite_number(x: Any, what: str, *, low: float | None = None) -> float:
    """A policy parameter as a finite float (at least `low`), or a PolicyError naming it."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise PolicyError(f"{what} must be a number, got {x!r}") from None
    if not math.isfinite(v):
        raise PolicyError(f"{what} must be finite, got {x!r}")
    if low is not None and v < low:
        raise PolicyError(f"{what} must be >= {low:g}, got {x!r}")
    return v


@dataclass(frozen=True)
class TierInfo:
    name: str
    index: int
    price_in_per_mtok: float = 0.0
    price_out_per_mtok: float = 0.0
    price_per_call: float = 0.0


class _PricedTier(Protocol):
    name: str

    @property
    def price(self) -> Any: ...


def tier_infos(tiers: Sequence[_PricedTier]) -> list[TierInfo]:
    """What a policy may know of a ladder of tiers (a portfolio's, or the lab's
    recorded models): names, positions and prices; never a backend or a queue."""
    return [TierInfo(t.name, i, t.price.input_per_mtok, t.price.output_per_mtok, t.price.per_call)
            for i, t in enumerate(tiers)]


@dataclass(frozen=True)
class Needs:
    signals: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    samples: int = 1
    verify: bool = False


@dataclass(frozen=True)
class Plan:
    first: int
    # Tier indices the policy may use for this query, in the order it would climb
    # them; None means every tier in portfolio order.
    allowed: tuple[int, ...] | None = None
    note: str = ""


Action = Literal["accept", "escalate", "reject"]


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    next_tier: int | None = None
    # Which attempt's answer becomes final on accept (index into attempts); the
    # last one when None. Lets a policy return the best answer seen, not the latest.
    answer_from: int | None = None
    score: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Knob:
    name: str
    kind: Literal["float", "int", "choice", "per_tier_float", "tier_list"]
    doc: str
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()


class Policy(ABC):
    name: ClassVar[str]
    summary: ClassVar[str] = ""
    knobs: ClassVar[tuple[Knob, ...]] = ()

    def __init__(self, tiers: Sequence[TierInfo]):
        if not tiers:
            raise PolicyError("a policy needs at least one tier")
        self.tiers = tuple(tiers)
        self._by_name = {t.name: t for t in self.tiers}

    # -- helpers for subclasses -------------------------------------------------
    def tier_index(self, name: str, what: str = "tier") -> int:
        t = self._by_name.get(name)
        if t is None:
            near = difflib.get_close_matches(str(name), list(self._by_name), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise PolicyError(f"{what} {name!r} is not a tier of this portfolio{hint}; tiers: {', '.join(self._by_name)}")
        return t.index

    def tier_list(self, names: Sequence[str] | None, what: str = "chain") -> tuple[int, ...]:
        """Tier names -> indices, in order; an empty list, an unknown tier or a
        repeated one is an error naming `what`."""
        if isinstance(names, str) or not names:
            raise PolicyError(f"{what} must be a non-empty list of tiers")
        chain = tuple(self.tier_index(str(n), f"{what} tier") for n in names)
        if len(set(chain)) != len(chain):
            raise PolicyError(f"{what} names a tier twice: {list(names)}")
        return chain

    @staticmethod
    def signal_name(name: str) -> str:
        """A known confidence signal name, or a PolicyError naming the near miss."""
        try:
            return check_signal_name(name)
        except ValueError as e:
            raise PolicyError(str(e)) from None

    @property
    def last(self) -> int:
        return len(self.tiers) - 1

    # -- the interface ----------------------------------------------------------
    def needs(self, tier: int) -> Needs:
        return Needs()

    @abstractmethod
    def plan(self, query: Query) -> Plan: ...

    def plan_batch(self, queries: Sequence[Query]) -> list[Plan]:
        """Pre-call plans for a whole batch the submitter holds at once; a policy that
        decides jointly (OptLLM under a batch budget) overrides this."""
        return [self.plan(q) for q in queries]

    @abstractmethod
    def decide(self, query: Query, attempts: Sequence[Attempt]) -> Decision: ...

    @abstractmethod
    def params(self) -> dict[str, Any]: ...

    def describe(self) -> str:
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in self.params().items())})"


class ChainPolicy(Policy):
    """A policy that climbs `self.chain` (tier indices, cheapest first) reading one
    confidence signal: it starts at the chain's first tier, may use only the chain,
    and declares its signal so a backend can produce it."""

    chain: tuple[int, ...]
    signal: str

    def needs(self, tier: int) -> Needs:
        if tier == self.chain[-1] and (self.signal in CALLS_FOR or self.signal == "p_true"):
            # its answer is always accepted: no extra calls for a signal it would not read
            # (live signals; p_true, a call on a live backend)
            return Needs()
        return Needs(signals=(self.signal,))

    def plan(self, query: Query) -> Plan:
        return Plan(first=self.chain[0], allowed=self.chain)

    def require_fitted(self, fitted: Container[int], what: str, remedy: str) -> None:
        """A PolicyError naming the chain's non-last tiers that `fitted` lacks: the last
        tier always accepts, so only the others need fitted knobs."""
        missing = [self.tiers[i].name for i in self.chain[:-1] if i not in fitted]
        if missing:
            raise PolicyError(f"no {what} for tier(s) {missing}: every tier but the last of the chain needs one "
                              f"({remedy})")

    def rest_of_chain(self, attempt: Attempt) -> tuple[int, ...]:
        """The chain's tiers after this attempt's (empty on the last tier)."""
        return self.chain[self.chain.index(attempt.tier_index) + 1 :]
