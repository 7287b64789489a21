"""The model backend interface: one tier's model, called once per attempt.

A backend is built once per worker process from its tier's spec and reused for
every job. `generate` either returns a result or raises one of the errors below,
which decide what the stage task does next:
- TransientBackendError: retried with backoff (a 429, a 5xx, a timeout), then
  treated as a failure of this tier;
- BackendFailure: this tier cannot answer this job (prompt too long, unknown
  record, server unreachable after retries): the job falls back to the next tier
  with the message recorded; on the last tier the job fails with it.
- BackendConfigError: raised at construction; the worker refuses to start.
"""
from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

from router.core.attempt import Query, TokenLogprob
from router.core.errors import CascadeError, UserError
from router.core.live_signals import CALLS_FOR
from router.core.policy import Needs
from router.core.portfolio import Tier

# The answer length of a call whose request and tier set no max_tokens, for the cost
# reserved against a tenant's budget: the openai backend's default, the largest of the
# backends' (test_budget_reservations checks it stays so).
DEFAULT_MAX_TOKENS = 256
# tokens a chat template may add per message, and once (roles, separators, BOS)
TEMPLATE_TOKENS = (16, 64)


class BackendConfigError(UserError):
    """A tier's backend options cannot work (checked before any job is sent)."""


class BackendFailure(CascadeError):
    """A call failed for good: recorded as a failed attempt; the job falls back."""


class TransientBackendError(BackendFailure):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class BackendResult:
    text: str
    tokens: list[TokenLogprob] | None = None  # per answer token, when the backend has them
    stop: tuple[str, ...] = ()  # stop sequences used, dropped from answer-span signals
    signals: dict[str, float] = field(default_factory=dict)  # recorded or extra-call signals (p_true, ...)
    tokens_in: int | None = None
    tokens_out: int | None = None
    latency_ms: float | None = None
    cost_usd: float | None = None  # None: computed from the tier's price and tokens
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. the recorded `correct` of a replay


class Backend(ABC):
    kind: ClassVar[str]
    # What it can return: subset of {"logprobs", "top_logprobs", "samples", "verify"}
    capabilities: ClassVar[frozenset[str]] = frozenset()
    # Celery pool that suits it: "threads" for I/O-bound, "solo" for an in-process model
    pool: ClassVar[str] = "threads"
    # stage threads a worker process runs by default (CASCADE_WORKER_CONCURRENCY or --concurrency
    # raise it): 2 lets an HTTP tier's next message start its requests while the last one records
    stage_threads: ClassVar[int] = 1
    # whether it calls a model (a server or a model in the process): the signal preflight
    # (worker.models.preflight) probes it; a replay serves recorded signals
    live: ClassVar[bool] = True

    def __init__(self, tier: Tier):
        self.tier = tier
        self.options = tier.backend.options

    def provides(self, signal: str) -> bool:
        """Whether this backend's results can carry this signal."""
        if signal in CALLS_FOR:  # live signals: extra calls any backend answers (worker.models.extra_calls)
            return True
        if signal == "p_true":
            return "verify" in self.capabilities
        return "logprobs" in self.capabilities

    @classmethod
    def stage_size(cls, tier: Tier, cap: int) -> int:
        """Jobs per stage message for this tier, at most `cap` (CASCADE_CHUNK_SIZE): as
        many as keep the backend busy, few enough that an interactive stage (its own
        queue, drained first) never waits long behind the message in progress. Default:
        the cap for a fast or remote backend, 16 for a model inside the worker process."""
        return cap if cls.pool == "threads" else min(cap, 16)

    @classmethod
    def check_options(cls, tier: Tier) -> None:
        """Cheap checks a submitter can run without loading a model (default: none)."""

    @classmethod
    def refuses(cls, tier: Tier, query: Query) -> str | None:
        """The request field this tier cannot honour (`params.<name>` or `messages`), or
        None. Read from the tier's options only, so the submitter asks it without
        building the backend; `generate` asks it again (a job submitted before a
        portfolio change)."""
        return None

    @classmethod
    def max_cost(cls, tier: Tier, query: Query) -> float:
        """The most one call of this tier can cost for this query, read from the tier's
        spec only (the submitter reserves it against the tenant's budget, without
        building the backend): the tier's price with the output at the answer's limit
        (`max_tokens`: the request's, the tier's, else DEFAULT_MAX_TOKENS) and the input
        at the prompt's UTF-8 bytes (a token is at least one byte) and what a template adds."""
        return tier.price.cost(input_bound(tier, query), answer_limit(tier, query))

    def check_request(self, query: Query) -> None:
        refused = self.refuses(self.tier, query)
        if refused is not None:
            raise BackendFailure(f"tier {self.tier.name!r}: the {self.kind} backend cannot honour the request's "
                                 f"{refused}")

    def check_needs(self, needs: Needs) -> None:
        wanted = set()
        if needs.logprobs:
            wanted.add("logprobs")
        if needs.top_logprobs:
            wanted.add("top_logprobs")
        if needs.samples > 1:
            wanted.add("samples")
        if needs.verify:
            wanted.add("verify")
        for name in needs.signals:
            if not self.provides(name):
                raise BackendConfigError(
                    f"tier {self.tier.name!r}: the policy reads the signal {name!r}, which the "
                    f"{self.kind} backend cannot produce"
                )
        missing = wanted - self.capabilities
        if missing:
            raise BackendConfigError(
                f"tier {self.tier.name!r}: the policy needs {sorted(missing)} but the "
                f"{self.kind} backend cannot provide it"
            )

    @abstractmethod
    def generate(self, query: Query, needs: Needs) -> BackendResult: ...

    def generate_many(self, queries: Sequence[Query], needs: Needs) -> list[BackendResult | Exception]:
        """One call per query of a stage, in order; a query whose call failed gets its
        BackendFailure in its place, so one bad job never costs the others their answers
        (and a query whose call crashed, any other exception: the stage records that job
        as crashed and sends it again alone). The stage retries transient failures and
        applies the breaker (worker.queue.stage.call_backend_many). This default calls one at
        a time; a backend that serves many requests at once (an HTTP server, batched
        local decoding) overrides it."""
        out: list[BackendResult | Exception] = []
        for q in queries:
            try:
                out.append(self.generate(q, needs))
            except Exception as e:  # noqa: BLE001 - kept in its query's place; the stage sorts it
                out.append(e)
        return out

    def close(self) -> None:
        pass


def answer_limit(tier: Tier, query: Query) -> int:
    """The most tokens a call answers: the request's max_tokens, the tier's, DEFAULT_MAX_TOKENS."""
    limit = query.params.get("max_tokens") or tier.backend.options.get("max_tokens") or DEFAULT_MAX_TOKENS
    return int(limit) if isinstance(limit, (int, float)) and not isinstance(limit, bool) else DEFAULT_MAX_TOKENS


def input_bound(tier: Tier, query: Query) -> int:
    """The most tokens a call's input can have: every byte of its text a token (the
    prompt or the chat, the request's or the tier's system prompt, the tier's prompt
    template), and what a chat template adds."""
    texts = [m.get("content") or "" for m in query.messages] if query.messages else [query.prompt or ""]
    opts = tier.backend.options
    texts += [str(query.params.get("system") or opts.get("system") or ""), str(opts.get("prompt_template") or "")]
    per_message, once = TEMPLATE_TOKENS
    return sum(len(t.encode("utf-8", "replace")) for t in texts) + per_message * max(1, len(query.messages)) + once


def option(tier: Tier, key: str, typ: type | tuple[type, ...], default: Any = ..., *, where: str = "") -> Any:
    """A backend option, type-checked, with an error naming the tier and key."""
    opts = tier.backend.options
    if key not in opts:
        if default is ...:
            raise BackendConfigError(f"tier {tier.name!r}: backend {tier.backend.kind!r} needs option {key!r}{where}")
        return default
    v = opts[key]
    if not isinstance(v, typ) or (isinstance(v, bool) and typ in (int, float, (int, float))):
        raise BackendConfigError(f"tier {tier.name!r}: backend option {key!r} has the wrong type: {v!r}")
    return v


def reject_unknown_options(tier: Tier, known: set[str]) -> None:
    for k in tier.backend.options:
        if k not in known:
            near = difflib.get_close_matches(k, sorted(known), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else f"; known: {', '.join(sorted(known))}"
            raise BackendConfigError(f"tier {tier.name!r}: unknown {tier.backend.kind} backend option {k!r}{hint}")


def refused_field(query: Query, params: frozenset[str] | set[str], chat: bool) -> str | None:
    """The first of the query's parameters not in `params`, or `messages` when it is a
    chat (several turns, or a system message) and `chat` is False."""
    for key in query.params:
        if key not in params:
            return f"params.{key}"
    if not chat and len(query.messages) > 1:
        return "messages"
    return None
