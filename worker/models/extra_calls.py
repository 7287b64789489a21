"""The extra model calls of the live-signal methods, made through the tier's own backend.

A policy that reads `p_verify` (AutoMix), `neg_semantic_entropy` (semantic-entropy
routing) or `self_ref` (Self-REF, prompt-based) declares it in `needs().signals`; after
the answer call the stage calls `with_extra_calls`, which derives queries from the job's
and sends them with `backend.generate`, like any job:

- samples: `SAMPLES - 1` more answers at temperature `TEMPERATURE` (the greedy answer
  is the first sample);
- verify: `VERIFY_K` answers, at temperature `TEMPERATURE`, to a prompt that shows the
  question and the model's answer and asks whether it is correct (few-shot through the
  tier's own prompt template: its question/answer examples);
- self_ref: one answer to "certain or uncertain?" after the question and the answer
  (with token log-probs asked for: its confidence is the verdict token's probability);
- p_true: on a backend with the "verify" capability (openai), one greedy answer to the
  verification prompt with the verdict tokens' alternatives (`top_logprobs`): P(True)
  is the probability of "yes" against "no" (Kadavath et al. 2022). A replay reads
  p_true from its records instead.

Generic: any backend that answers a prompt serves them (llamacpp, openai; the replay
backend serves the recorded ones, keyed `<id>#<kind><n>`). The signals are computed
by `router.core.live_signals`; the calls' tokens, cost and latency are added to the
attempt's (so every report counts them), and their texts are kept in the attempt's meta.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

from router.core.attempt import Query
from router.core.live_signals import calls_needed, from_calls
from router.core.policy import Needs
from worker.models.backends.base import Backend, BackendResult

SAMPLES = 4  # answers for semantic entropy, the greedy one included
VERIFY_K = 3  # sampled verdicts for AutoMix's verifier probability
TEMPERATURE = 0.7
VERDICT_TOKENS = 3  # "Yes" / "No" / "certain" / "uncertain" and a little room
P_TRUE_TOP = 10  # alternatives of the verdict token asked for: "yes" and "no" are among them

# Tried on the pilot's questions: with a Q/A few-shot template, a verification question that
# embeds the question in one line ("Question: ... Proposed answer: ... Correct?") is read as
# the question itself (the models answer it again: a number, a letter); put the question
# first and the yes/no request last, and all three models reply yes or no.
VERIFY_PROMPT = "{question}\nProposed answer: {answer}\nIs the proposed answer correct? Reply yes or no."
SELF_REF_PROMPT = (
    "{question}\nYour answer: {answer}\n"
    "Are you certain or uncertain that your answer is right? Reply with one word: certain or uncertain."
)


def derived_id(query_id: str, kind: str, n: int) -> str:
    return f"{query_id}#{kind}{n}"


def derived_queries(query: Query, answer: str, kind: str, needs: Needs) -> list[Query]:
    """The queries of one kind of extra call for this job and its answer."""
    if kind == "samples":
        k = max(needs.samples, SAMPLES) - 1
        return [dataclasses.replace(query, id=derived_id(query.id, kind, i),
                                    params={**query.params, "temperature": TEMPERATURE}) for i in range(k)]
    if kind == "verify":
        prompt = VERIFY_PROMPT.format(question=query.prompt, answer=_one_line(answer))
        return [Query(derived_id(query.id, kind, i), prompt, query.category,
                      params={"temperature": TEMPERATURE, "max_tokens": VERDICT_TOKENS}) for i in range(VERIFY_K)]
    if kind == "self_ref":
        prompt = SELF_REF_PROMPT.format(question=query.prompt, answer=answer)
        return [Query(derived_id(query.id, kind, 0), prompt, query.category,
                      params={"temperature": 0.0, "max_tokens": VERDICT_TOKENS})]
    if kind == "p_true":
        prompt = VERIFY_PROMPT.format(question=query.prompt, answer=_one_line(answer))
        return [Query(derived_id(query.id, kind, 0), prompt, query.category,
                      params={"temperature": 0.0, "max_tokens": VERDICT_TOKENS})]
    raise ValueError(f"unknown extra call kind {kind!r}")


# An estimate, for the cost reserved against a tenant's budget: the bytes of one answer
# token when a verification prompt quotes the answer (whitespace collapsed).
ANSWER_BYTES_PER_TOKEN = 8


def extra_queries_bound(query: Query, needs: Needs, answer_tokens: int) -> list[Query]:
    """The extra calls a job's answer may bring (the live signals `needs` reads), their
    prompts quoting an answer of `answer_tokens` tokens at ANSWER_BYTES_PER_TOKEN each."""
    kinds = calls_needed(needs.signals)
    if not kinds:
        return []
    answer = "x" * (answer_tokens * ANSWER_BYTES_PER_TOKEN)
    return [q for kind in kinds for q in derived_queries(query, answer, kind, needs)]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def call_record(r: BackendResult, backend: Backend) -> dict[str, Any]:
    """One extra call as stored: text, tokens, cost at the tier's price, latency, token log-probs."""
    cost = r.cost_usd if r.cost_usd is not None else backend.tier.price.cost(r.tokens_in, r.tokens_out)
    out: dict[str, Any] = {"text": r.text, "cost_usd": float(cost), "latency_ms": r.latency_ms,
                           "tokens_in": r.tokens_in, "tokens_out": r.tokens_out}
    if r.tokens:
        out["token_logprobs"] = [[t.token, t.logprob if math.isfinite(t.logprob) else None] for t in r.tokens]
    return out


# what each kind of extra call asks of the backend besides the text
_CALL_NEEDS = {"samples": Needs(), "verify": Needs(), "self_ref": Needs(logprobs=True),
               "p_true": Needs(logprobs=True, top_logprobs=P_TRUE_TOP)}


def wants_p_true(backend: Backend, needs: Needs, r: BackendResult) -> bool:
    """Whether p_true comes from an extra call here: the policy reads it, the backend
    verifies by a call ("verify" capability) and its answer did not carry it already."""
    return (("p_true" in needs.signals or needs.verify) and "verify" in backend.capabilities
            and "p_true" not in r.signals)


def _first_top(r: BackendResult) -> dict[str, float]:
    """The alternatives of the first token that is not whitespace (the verdict word)."""
    for t in r.tokens or ():
        if t.token.strip():
            return {k: (v if math.isfinite(v) else None) for k, v in t.top.items()}
    return {}


def with_extra_calls(backend: Backend, query: Query, needs: Needs, r: BackendResult) -> BackendResult:
    """The answer `r` with the live signals `needs` asks for (and p_true, on a backend
    that verifies by a call), from extra calls through `backend`; their tokens, cost and
    latency added to the answer's. Unchanged when none is asked for. A failing extra
    call fails the attempt (BackendFailure)."""
    kinds = calls_needed(needs.signals) + (("p_true",) if wants_p_true(backend, needs, r) else ())
    if not kinds:
        return r
    started = time.perf_counter()
    calls: dict[str, list[dict[str, Any]]] = {}
    for kind in kinds:
        calls[kind] = []
        for q in derived_queries(query, r.text, kind, needs):
            got = backend.generate(q, _CALL_NEEDS[kind])
            rec = call_record(got, backend)
            if kind == "p_true":
                rec["top_logprobs"] = _first_top(got)
            calls[kind].append(rec)
    wall_ms = (time.perf_counter() - started) * 1000
    every = [c for cs in calls.values() for c in cs]
    main_cost = r.cost_usd if r.cost_usd is not None else backend.tier.price.cost(r.tokens_in, r.tokens_out)
    extra = {
        "calls": len(every),
        "tokens_in": sum(c["tokens_in"] or 0 for c in every),
        "tokens_out": sum(c["tokens_out"] or 0 for c in every),
        "cost_usd": math.fsum(c["cost_usd"] for c in every),
        # a backend that reports no latency (None) is timed here
        "latency_ms": math.fsum(c["latency_ms"] for c in every) if all(c["latency_ms"] is not None for c in every)
        else wall_ms,
        "outputs": calls,
    }
    return dataclasses.replace(
        r,
        signals={**r.signals, **from_calls(r.text, calls)},
        tokens_in=None if r.tokens_in is None else r.tokens_in + extra["tokens_in"],
        tokens_out=None if r.tokens_out is None else r.tokens_out + extra["tokens_out"],
        cost_usd=float(main_cost) + extra["cost_usd"],
        latency_ms=None if r.latency_ms is None else r.latency_ms + extra["latency_ms"],
        meta={**r.meta, "extra_calls": extra},
    )
