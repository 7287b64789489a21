"""Replay backend: serves the recorded responses of one model from a file in the
benchmarks format, so real recorded LLM traffic flows through the pipeline with
its real cost, latency, correctness and confidences.

Options: file (path), model (model id in the file), sleep (bool: wait the
recorded latency, default false).
"""
from __future__ import annotations

import difflib
import threading
import time
from functools import lru_cache

from router.core.attempt import Query
from router.core.policy import Needs
from router.core.portfolio import Tier
from router.core.records import Dataset, RecordsError, load_dataset
from router.core.signals import from_record

from .base import (
    Backend,
    BackendConfigError,
    BackendFailure,
    BackendResult,
    option,
    refused_field,
    reject_unknown_options,
)

_lock = threading.Lock()


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
        # recorded confidences only; a file may still lack them on some rows (then absent)
        return signal in ("logprob", "p_true")

    @classmethod
    def check_options(cls, tier: Tier) -> None:
        cls(tier)  # cheap: the file is parsed once per process and cached

    @classmethod
    def refuses(cls, tier: Tier, query: Query) -> str | None:
        # a recording answers one prompt, as it was sent: no parameter or chat history changes it
        return refused_field(query, frozenset(), chat=False)

    def generate(self, query: Query, needs: Needs) -> BackendResult:
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
            signals=from_record(resp.logprob, resp.p_true),
            tokens_in=resp.tokens_in,
            tokens_out=resp.tokens_out,
            latency_ms=resp.latency_ms,
            cost_usd=resp.cost_usd,
            meta={"correct": resp.correct, "record": rec.id},
        )
