"""Replay backend: serves the recorded responses of one model from a file in the
benchmarks format, so real recorded LLM traffic flows through the pipeline with
its real cost, latency, correctness and confidences.

Options: file (path), model (model id in the file), sleep (bool: wait the
recorded latency, default false).

A live recording (data/local-bench) also holds each answer's token log-probs and its
extra calls (samples, self-verifications, Self-REF): the answer is served with its
tokens, and an extra call of `worker.models.extra_calls` (id `<row id>#<kind><n>`) with the
recorded output of that call, so the live-signal policies replay as they ran.
"""
from __future__ import annotations

import difflib
import re
import threading
import time
from functools import lru_cache

from router.core.attempt import Query, TokenLogprob
from router.core.live_signals import CALL_KINDS, CALLS_FOR
from router.core.policy import Needs
from router.core.portfolio import Tier
from router.core.records import Dataset, RecordsError, load_dataset
from router.core.signals import SIGNALS, from_record
from worker.models.backends.base import (
    Backend,
    BackendConfigError,
    BackendFailure,
    BackendResult,
    option,
    refused_field,
    reject_unknown_options,
)

_lock = threading.Lock()
_DERIVED = re.compile(rf"(.+)#({'|'.join(CALL_KINDS)})(\d+)")


@lru_cache(maxsize=8)
def _dataset(path: str) -> tuple[Dataset, dict[str, int], dict[str, int]]:
    ds = load_dataset(path)
    by_id = {r.id: i for i, r in enumerate(ds.records)}
    by_prompt: dict[str, int] = {}
    for i, r in enumerate(ds.records):
        by_prompt.setdefault(r.prompt, i)
    return ds, by_id, by_prompt


def dataset(path: str):
    with _lock:  # one load per file per process, even with many threads
        return _dataset(path)


class ReplayBackend(Backend):
    kind = "replay"
    live = False  # recorded signals: nothing to probe

    def __init__(self, tier: Tier):
        super().__init__(tier)
        reject_unknown_options(tier, {"file", "model", "sleep"})
        self.path = option(tier, "file", str)
        self.model = option(tier, "model", str)
        self.sleep = option(tier, "sleep", bool, False)
        try:
            self.ds, self.by_id, self.by_prompt = dataset(self.path)
        except RecordsError as e:
            raise BackendConfigError(f"tier {tier.name!r}: replay file: {e}") from None
        if self.model not in self.ds.models:
            near = difflib.get_close_matches(self.model, self.ds.models, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise BackendConfigError(
                f"tier {tier.name!r}: model {self.model!r} is not in {self.path}{hint}; "
                f"models there: {', '.join(self.ds.models)}"
            )

    def provides(self, signal: str) -> bool:
        # recorded confidences, token signals and live signals (served from the recorded calls);
        # a file may still lack them on some rows (then absent)
        if signal in ("logprob", "p_true"):
            return True
        if signal in CALLS_FOR:
            return self._recorded("calls")
        return signal in SIGNALS and self._recorded("token_logprobs")

    def _recorded(self, what: str) -> bool:
        return any(getattr(r.responses.get(self.model), what, None) for r in self.ds.records)

    @classmethod
    def check_options(cls, tier: Tier) -> None:
        cls(tier)  # cheap: the file is parsed once per process and cached

    @classmethod
    def refuses(cls, tier: Tier, query: Query) -> str | None:
        # a recording answers one prompt, as it was sent: no parameter or chat history changes it
        return refused_field(query, frozenset(), chat=False)

    @classmethod
    def max_cost(cls, tier: Tier, query: Query) -> float:
        """What the recording charges for this call (a replay answers at its recorded
        cost, so the reservation is exact); nothing when no recording answers it (the
        call fails, at no cost)."""
        ds, by_id, by_prompt = dataset(option(tier, "file", str))
        model = option(tier, "model", str)
        derived = _DERIVED.fullmatch(query.id)
        if derived and derived.group(1) in by_id:
            resp = ds.records[by_id[derived.group(1)]].responses.get(model)
            calls = () if resp is None else resp.calls.get(derived.group(2), ())
            n = int(derived.group(3))
            if n >= len(calls):
                return 0.0
            c = calls[n]
            return c["cost_usd"] if c.get("cost_usd") is not None else tier.price.cost(c.get("tokens_in"),
                                                                                         c.get("tokens_out"))
        i = by_id.get(query.id)
        if i is None:
            i = by_prompt.get(query.prompt)
        resp = None if i is None else ds.records[i].responses.get(model)
        if resp is None:
            return 0.0
        return resp.cost_usd if resp.cost_usd is not None else tier.price.cost(resp.tokens_in, resp.tokens_out)

    def generate(self, query: Query, needs: Needs) -> BackendResult:
        derived = _DERIVED.fullmatch(query.id)
        if derived and derived.group(1) in self.by_id:
            return self._extra_call(*derived.groups())
        self.check_request(query)
        i = self.by_id.get(query.id)
        if i is None:
            i = self.by_prompt.get(query.prompt)
        if i is None:
            raise BackendFailure(f"replay: no recorded row with id {query.id!r} (nor that prompt) in {self.path}")
        rec = self.ds.records[i]
        if rec.id == query.id and rec.prompt != query.prompt:
            raise BackendFailure(f"replay: row {query.id!r} of {self.path} has another prompt than the job")
        resp = rec.responses.get(self.model)
        if resp is None:  # the same rule as router.records.attempt_from_response
            raise BackendFailure(f"replay: model {self.model!r} has no recorded response for row {rec.id!r}")
        if self.sleep and resp.latency_ms:
            time.sleep(resp.latency_ms / 1000)
        return BackendResult(
            text=resp.text or "",
            tokens=_tokens(resp.token_logprobs),
            signals=from_record(resp.logprob, resp.p_true),
            tokens_in=resp.tokens_in,
            tokens_out=resp.tokens_out,
            latency_ms=resp.latency_ms,
            cost_usd=resp.cost_usd,
            meta={"correct": resp.correct, "record": rec.id},
        )

    def _extra_call(self, row_id: str, kind: str, n: str) -> BackendResult:
        rec = self.ds.records[self.by_id[row_id]]
        resp = rec.responses.get(self.model)
        calls = () if resp is None else resp.calls.get(kind, ())
        if int(n) >= len(calls):
            raise BackendFailure(f"replay: row {row_id!r} of {self.path} has no recorded {kind} call {n} of model "
                                 f"{self.model!r} ({len(calls)} recorded)")
        c = calls[int(n)]
        if self.sleep and c.get("latency_ms"):
            time.sleep(c["latency_ms"] / 1000)
        return BackendResult(text=c.get("text") or "", tokens=_tokens(c.get("token_logprobs")),
                             tokens_in=c.get("tokens_in"), tokens_out=c.get("tokens_out"),
                             latency_ms=c.get("latency_ms"), cost_usd=c.get("cost_usd"),
                             meta={"record": row_id})


def _tokens(pairs) -> list[TokenLogprob] | None:
    if not pairs:
        return None
    return [TokenLogprob(t, float("nan") if lp is None else float(lp)) for t, lp in pairs]
