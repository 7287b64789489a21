"""Labelled traffic for evaluation and tuning: which rows and models can be scored,
what "cost" means for the file, which confidence signal it records, and the
train/test split (or cross-fitting folds).

The input is the benchmarks format (`router.records`), for the shared benchmark
files and for a user's own logged traffic alike. Handling of incomplete input is
explicit and reported, never a silent zero:

- A row that lacks one of the evaluated models, or where that model's `correct`
  is null or no score in [0, 1] (a metric of -0.033, NaN), cannot be scored: it is
  dropped, and the count (per reason, with the first line) is part of every result. If more than half the rows would go, it is
  an error naming the model (exclude it with `models=`/`--models`).
- Cost: if every evaluated cell records `cost_usd`, cost is US dollars per query
  ("usd"). If no cell does (the RouteLLM files), cost is the share of queries that
  call the strongest model ("strong_calls": RouteLLM's "% calls to the strong
  model"); the strongest model is the most accurate on the tuning rows, ties: the
  later in file order. A mix of recorded and missing costs is an error naming the
  model and the first line (costs are never guessed).
- Confidence: `logprob` or `p_true`, whichever the evaluated cells record more
  often (or the one asked for). A NaN, infinite or null confidence counts as
  absent: a threshold cascade escalates past that tier (the rule of the policy),
  and the number of such cells per model is reported.
- Split: rows with split "train" tune, rows with split "test" score. A file with
  no train split or no test split (e.g. only "test") is scored by k-fold
  cross-fitting over all its rows: tune on k-1 folds, score the k-th, so every row
  is scored once by knobs that never saw it. Folds are a seeded permutation
  (`numpy.random.default_rng(seed).permutation`), row i of it in fold i mod k.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from router.core.errors import RecordsError
from router.core.portfolio import Price
from router.core.records import Dataset, Record, attempt_from_response, load_dataset
from router.core.signals import from_record
from router.core.signals import get as get_signal

from .simulate import TierModel

CONFIDENCE_SIGNALS = ("logprob", "p_true")


class DataError(RecordsError):
    """Labelled data that cannot be evaluated as asked (a clear, user-facing error)."""


@dataclass
class Labelled:
    path: str
    name: str
    models: list[str]
    records: list[Record]  # the rows that can be scored, in file order
    total_rows: int
    dropped: dict[str, Any]
    cost_unit: str  # "usd" | "strong_calls"
    signal: str | None
    signal_missing: dict[str, int]  # model -> rows without a finite confidence
    signal_note: str = ""

    # -- tiers ----------------------------------------------------------------
    def strongest(self, records: Sequence[Record]) -> str:
        """Most accurate model on `records` (ties: later in file order)."""
        best, best_acc = self.models[0], -1.0
        for m in self.models:
            acc = sum(r.responses[m].correct for r in records) / max(len(records), 1)
            if acc >= best_acc:
                best, best_acc = m, acc
        return best

    def tiers(self, tuning_records: Sequence[Record], names: dict[str, str] | None = None) -> list[TierModel]:
        """One tier per model, named by the model id (or `names[model]`).

        In "strong_calls" mode the strongest model on the tuning rows costs 1 per
        call and the others 0, so a simulated outcome's cost is 1 exactly when the
        query called the strong model: mean cost = share of strong calls.
        """
        names = names or {}
        strong = self.strongest(tuning_records) if self.cost_unit == "strong_calls" else None
        return [
            TierModel(names.get(m, m), m, Price(per_call=1.0) if m == strong else Price())
            for m in self.models
        ]

    @property
    def cost_label(self) -> str:
        return "USD per query" if self.cost_unit == "usd" else "share of queries calling the strongest model"

    # -- splits ---------------------------------------------------------------
    def split_mode(self) -> str:
        splits = {r.split for r in self.records}
        return "train/test" if {"train", "test"} <= splits else "cross-fit"

    def train_test(self) -> tuple[list[Record], list[Record]]:
        return [r for r in self.records if r.split == "train"], [r for r in self.records if r.split == "test"]

    def folds(self, k: int = 5, seed: int = 0) -> list[tuple[list[Record], list[Record]]]:
        n = len(self.records)
        if n < 2 * k:
            raise DataError(f"{self.name}: {n} scorable rows are too few for {k}-fold cross-fitting (need {2 * k})")
        perm = np.random.default_rng(seed).permutation(n)
        fold = np.empty(n, dtype=int)
        fold[perm] = np.arange(n) % k
        out = []
        for f in range(k):
            train = [r for r, g in zip(self.records, fold) if g != f]
            test = [r for r, g in zip(self.records, fold) if g == f]
            out.append((train, test))
        return out

    def split_note(self) -> str:
        present = sorted({str(r.split) for r in self.records})
        return f"the file has split(s) {', '.join(present)}, not both 'train' and 'test'"



def _first_line(records: Iterable[Record]) -> int | None:
    for r in records:
        return r.line
    return None


def prepare(
    data: str | Path | Dataset,
    *,
    models: Sequence[str] | None = None,
    signal: str | None = None,
    max_drop_share: float = 0.5,
) -> Labelled:
    ds = data if isinstance(data, Dataset) else load_dataset(data)
    name = Path(ds.path).name
    if models:
        unknown = [m for m in models if m not in ds.models]
        if unknown:
            raise DataError(f"{name}: model(s) {unknown} are not in the file; models there: {', '.join(ds.models)}")
        used = list(dict.fromkeys(models))
    else:
        used = list(ds.models)
    if len(used) < 1:
        raise DataError(f"{name}: no models to evaluate")

    # rows that can be scored: every used model present with a non-null `correct`
    kept: list[Record] = []
    reasons: dict[str, dict[str, Any]] = {}

    def note(reason: str, rec: Record) -> None:
        slot = reasons.setdefault(reason, {"rows": 0, "first_line": rec.line})
        slot["rows"] += 1

    for rec in ds.records:
        absent = [m for m in used if m not in rec.responses]
        unscored = [m for m in used if m in rec.responses and rec.responses[m].bad_correct is not None]
        unlabelled = [m for m in used if m in rec.responses and rec.responses[m].correct is None]
        if absent:
            note(f"{_models_phrase(absent, used)} absent from the row", rec)
        elif unscored:
            note(f"`correct` outside [0, 1] for {_models_phrase(unscored, used)}", rec)
        elif unlabelled:
            note(f"`correct` is null for {_models_phrase(unlabelled, used)}", rec)
        else:
            kept.append(rec)
    dropped = {"rows": len(ds.records) - len(kept), "reasons": reasons}
    if len(kept) < len(ds.records) * (1 - max_drop_share) or not kept:
        worst = max(reasons.items(), key=lambda kv: kv[1]["rows"])
        raise DataError(
            f"{name}: only {len(kept)} of {len(ds.records)} rows have every model with a `correct` label; "
            f"most often: {worst[0]} ({worst[1]['rows']} rows, first on line {worst[1]['first_line']}). "
            f"Evaluate a subset of models (--models) or fix the file"
        )

    # cost: all recorded, or none
    with_cost = {m: sum(r.responses[m].cost_usd is not None for r in kept) for m in used}
    if all(v == len(kept) for v in with_cost.values()):
        cost_unit = "usd"
    elif not any(with_cost.values()):
        cost_unit = "strong_calls"
    else:
        m = next(m for m in used if with_cost[m] != len(kept))
        first = _first_line(r for r in kept if r.responses[m].cost_usd is None)
        raise DataError(
            f"{name}: cost_usd is recorded for {with_cost[m]} of {len(kept)} rows of model {m!r} "
            f"(first missing on line {first}); evaluation needs cost_usd on every row or on none "
            f"(then cost = share of calls to the strongest model)"
        )

    # confidence signal
    counts = {
        s: sum(get_signal(_signals(r, m), s) is not None for r in kept for m in used) for s in CONFIDENCE_SIGNALS
    }
    signal_note = ""
    if signal is not None:
        if signal not in CONFIDENCE_SIGNALS:
            raise DataError(f"signal {signal!r}: recorded files carry {' or '.join(CONFIDENCE_SIGNALS)}")
        chosen: str | None = signal
        if counts[signal] == 0:
            raise DataError(f"{name}: no finite {signal!r} confidence recorded for the evaluated models")
    else:
        best = max(CONFIDENCE_SIGNALS, key=lambda s: counts[s])
        chosen = best if counts[best] > 0 else None
        if chosen is None:
            signal_note = "no confidence (logprob or p_true) recorded: confidence cascades are not applicable"
    missing = {}
    if chosen is not None:
        for m in used:
            k = sum(get_signal(_signals(r, m), chosen) is None for r in kept)
            if k:
                missing[m] = k
    return Labelled(
        path=str(ds.path), name=name, models=used, records=kept, total_rows=len(ds.records),
        dropped=dropped, cost_unit=cost_unit, signal=chosen, signal_missing=missing, signal_note=signal_note,
    )


def _models_phrase(models: list[str], used: list[str]) -> str:
    if len(models) == 1:
        return f"model {models[0]!r}"
    if len(models) == len(used):
        return "every model"
    if len(models) > len(used) / 2:
        rest = [m for m in used if m not in models]
        return f"every model but {', '.join(map(repr, rest))}"
    return f"models {', '.join(map(repr, models))}"


def _signals(rec: Record, model: str) -> dict[str, float]:
    r = rec.responses[model]
    # a live recording's logprob comes from its token log-probs (under `signals`)
    return {**{s: r.signals[s] for s in CONFIDENCE_SIGNALS if s in r.signals}, **from_record(r.logprob, r.p_true)}


@dataclass
class Table:
    """Per (tier, row) arrays, built cell by cell with `attempt_from_response`, i.e.
    the very attempt a replayed call gives the policy (cost and signals included),
    so the vectorised search in `router.tuning` sees what `router.simulate` sees."""

    ids: list[str]
    tiers: list[TierModel]
    correct: np.ndarray  # (k, n)
    cost: np.ndarray  # (k, n)
    conf: dict[str, np.ndarray]  # signal -> (k, n), NaN where absent
    latency: np.ndarray  # (k, n), NaN where not recorded
    records: list[Record] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.ids)

    def accuracy(self) -> np.ndarray:
        return self.correct.mean(axis=1)

    def mean_cost(self) -> np.ndarray:
        return self.cost.mean(axis=1)


def build_table(records: Sequence[Record], tiers: Sequence[TierModel], signals: Sequence[str] = ()) -> Table:
    """`signals`: what the policy to be tuned reads; the recorded extra calls of live
    signals among them add their cost and latency to every cell (as in simulate)."""
    k, n = len(tiers), len(records)
    correct = np.full((k, n), np.nan)
    cost = np.zeros((k, n))
    latency = np.full((k, n), np.nan)
    # the two recorded confidences, plus any further named signal the records carry
    names = list(CONFIDENCE_SIGNALS) + sorted({s for rec in records for r in rec.responses.values()
                                               for s in r.signals} - set(CONFIDENCE_SIGNALS))
    conf = {s: np.full((k, n), np.nan) for s in names}
    for j, rec in enumerate(records):
        for i, tm in enumerate(tiers):
            resp = rec.responses.get(tm.model)
            if resp is None or resp.correct is None:
                raise DataError(f"line {rec.line}: model {tm.model!r} has no scorable response (prepare() drops such rows)")
            a = attempt_from_response(tm.name, i, tm.model, resp, price=tm.price, signals=signals)
            correct[i, j] = resp.correct
            cost[i, j] = a.cost_usd
            if a.latency_ms is not None and math.isfinite(a.latency_ms):
                latency[i, j] = a.latency_ms
            for s in names:
                v = get_signal(a.signals, s)
                if v is not None:
                    conf[s][i, j] = v
    return Table([r.id for r in records], list(tiers), correct, cost, conf, latency, list(records))
