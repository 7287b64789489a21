"""What the decision layer knows about a query and about one model call on it.

Both the workers (from a live backend) and the offline evaluator (from a recorded
row) build these same objects, so a policy cannot tell the two apart.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True)
class Query:
    id: str
    prompt: str
    category: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    # A chat request's whole conversation ({role, content} each); `prompt` is then
    # its last user message, the text a policy reads. Empty for a plain prompt.
    messages: tuple[Mapping[str, str], ...] = ()
    # Per-request generation parameters (system, max_tokens, temperature, stop), for
    # the backend; a backend that cannot honour one refuses the job naming it.
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    # Alternatives at this position, {token: logprob}; empty unless asked for.
    top: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Attempt:
    """One tier's answer to one query, with the signals computed from it.

    `error` is set when the backend failed past its retries; such an attempt has no
    answer and its signals are empty, but its cost (if any was paid) still counts.
    """

    tier: str
    tier_index: int
    model: str
    text: str | None
    signals: Mapping[str, float] = field(default_factory=dict)
    cost_usd: float = 0.0
    latency_ms: float | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None
