"""Recorded traffic in the benchmarks format (one query per line, every model's
response nested): the replay backend serves it and the evaluator learns from it.
It is also the documented format for a user's own logged, labelled traffic.

    {"id": str, "prompt": str, "split": "train"|"test"|null, "category": str|null,
     "gold": str|null, "labels": str|null, "responses": {model: {"text", "correct", "cost_usd",
     "latency_ms", "tokens_in", "tokens_out", "logprob", "p_true"}}}

A row without a prompt is a live recording of a shared question (data/local-bench):
its prompt, gold and grades are joined from the shared files (router.core.questions).
`labels`, when given, says what `correct` means if it is not a real grade (pseudo-labels:
"agreement with <model>"). Every missing or malformed field is an error naming the file, line and field.
A model absent from a row, and `null` values, mean "not recorded", never zero.
"""
from __future__ import annotations

import gzip
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from . import signals as sig
from .attempt import Attempt, Query, TokenLogprob
from .errors import RecordsError
from .live_signals import CALL_KINDS, calls_needed, from_calls
from .questions import is_shared_question, join

RESPONSE_FIELDS = ("text", "correct", "cost_usd", "latency_ms", "tokens_in", "tokens_out", "logprob", "p_true", "signals",
                   "token_logprobs", "calls")


@dataclass(frozen=True)
class Response:
    text: str | None
    correct: float | None
    cost_usd: float | None
    latency_ms: float | None
    tokens_in: int | None
    tokens_out: int | None
    logprob: float | None
    p_true: float | None
    # further named confidence signals (router.core.signals names), e.g. from token log-probs
    signals: Mapping[str, float] = field(default_factory=dict)
    # a live recording's raw outputs (data/local-bench): the answer's [[token, logprob], ...] and
    # its extra calls {kind: [{text, cost_usd, latency_ms, tokens_in, tokens_out, token_logprobs}]};
    # the signals above are derived from them when the row is read, by the workers' own code
    token_logprobs: tuple[tuple[str, float], ...] | None = None
    calls: Mapping[str, tuple[Mapping[str, Any], ...]] = field(default_factory=dict)
    # a recorded `correct` that is no score in [0, 1] (a metric of -0.033, NaN): kept here,
    # `correct` is then None (unscored), and the evaluator drops the row naming why
    bad_correct: float | None = None

    def calls_cost(self, signals: Sequence[str], price=None) -> tuple[float, float]:
        """Cost and latency of the extra calls the named signals need (0 for none); a call
        without a recorded cost is priced at `price` on its tokens, as the workers do."""
        cost = latency = 0.0
        for kind in calls_needed(signals):
            for c in self.calls.get(kind, ()):
                if c.get("cost_usd") is not None:
                    cost += float(c["cost_usd"])
                elif price is not None:
                    cost += price.cost(c.get("tokens_in"), c.get("tokens_out"))
                latency += float(c.get("latency_ms") or 0.0)
        return cost, latency


@dataclass(frozen=True)
class Record:
    id: str
    prompt: str
    split: str | None
    category: str | None
    gold: str | None
    responses: Mapping[str, Response]
    line: int = 0
    # what `correct` means when it is not a real grade, e.g. "agreement with tier 'medium'"
    # (pseudo-labels: router.lab.pseudo_labels); None = graded against the truth
    labels: str | None = None

    def query(self) -> Query:
        return Query(self.id, self.prompt, self.category)


@dataclass
class Dataset:
    path: str
    records: list[Record]
    models: list[str]  # in first-seen order
    models_meta: list[dict[str, Any]] = field(default_factory=list)

    def split(self, name: str | None) -> list[Record]:
        return [r for r in self.records if name is None or r.split == name]

    @property
    def splits(self) -> list[str]:
        seen: list[str] = []
        for r in self.records:
            if r.split is not None and r.split not in seen:
                seen.append(r.split)
        return seen


def open_text(path: str | Path):
    p = Path(path)
    if p.suffix == ".gz":
        return gzip.open(p, "rt", encoding="utf-8")
    return open(p, encoding="utf-8")


def _num(v: Any, where: str, name: str, *, integer: bool = False) -> float | int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise RecordsError(f"{where}: {name} must be a number or null, got {v!r}")
    if integer:
        if isinstance(v, float) and not v.is_integer():
            raise RecordsError(f"{where}: {name} must be a whole number, got {v!r}")
        return int(v)
    return float(v)


def parse_response(raw: Any, where: str) -> Response:
    if not isinstance(raw, dict):
        raise RecordsError(f"{where}: expected an object, got {type(raw).__name__}")
    unknown = set(raw) - set(RESPONSE_FIELDS)
    if unknown:
        raise RecordsError(f"{where}: unknown field(s) {sorted(unknown)}; known: {', '.join(RESPONSE_FIELDS)}")
    text = raw.get("text")
    if text is not None and not isinstance(text, str):
        raise RecordsError(f"{where}: text must be a string or null")
    correct = _num(raw.get("correct"), where, "correct")
    bad_correct = None
    if correct is not None and not (0.0 <= correct <= 1.0):
        # not a score: the row cannot be scored with this model, like a null `correct`
        # (router.lab.labelled drops it with a counted reason); never clamped into a score
        bad_correct, correct = correct, None
    cost = _num(raw.get("cost_usd"), where, "cost_usd")
    if cost is not None and (not math.isfinite(cost) or cost < 0):
        raise RecordsError(f"{where}: cost_usd must be a finite number >= 0, got {cost}")
    # Confidences may legitimately be -inf/NaN in logged data; they are kept here
    # and dropped as "absent" by router.signals, never turned into a number.
    tokens = _token_logprobs(raw.get("token_logprobs"), where, "token_logprobs")
    calls = _calls(raw.get("calls"), where)
    signals = _signals(raw.get("signals"), where)
    if tokens:
        signals = {**sig.from_tokens([TokenLogprob(t, lp) for t, lp in tokens]), **signals}
    if calls:
        signals = {**from_calls(text, calls), **signals}
    return Response(
        text=text,
        correct=correct,
        cost_usd=cost,
        latency_ms=_num(raw.get("latency_ms"), where, "latency_ms"),
        tokens_in=_num(raw.get("tokens_in"), where, "tokens_in", integer=True),
        tokens_out=_num(raw.get("tokens_out"), where, "tokens_out", integer=True),
        logprob=_num(raw.get("logprob"), where, "logprob"),
        p_true=_num(raw.get("p_true"), where, "p_true"),
        signals=signals,
        token_logprobs=tokens,
        calls=calls,
        bad_correct=bad_correct,
    )


def _token_logprobs(raw: Any, where: str, name: str) -> tuple[tuple[str, float], ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str)
                                            for p in raw):
        raise RecordsError(f"{where}: {name} must be a list of [token, logprob] pairs")
    return tuple((p[0], float(_num(p[1], where, name))) for p in raw)


def _calls(raw: Any, where: str) -> dict[str, tuple[dict[str, Any], ...]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or set(raw) - set(CALL_KINDS):
        raise RecordsError(f"{where}: calls must be an object with the kinds {', '.join(CALL_KINDS)}")
    out = {}
    for kind, calls in raw.items():
        if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
            raise RecordsError(f"{where}: calls.{kind} must be a list of objects")
        for i, c in enumerate(calls):
            w = f"calls.{kind}[{i}]"
            if c.get("text") is not None and not isinstance(c["text"], str):
                raise RecordsError(f"{where}: {w}.text must be a string or null")
            for key in ("cost_usd", "latency_ms", "tokens_in", "tokens_out"):
                _num(c.get(key), where, f"{w}.{key}")
            _token_logprobs(c.get("token_logprobs"), where, f"{w}.token_logprobs")
        out[kind] = tuple(calls)
    return out


def _signals(raw: Any, where: str) -> dict[str, float]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RecordsError(f"{where}: signals must be an object of signal name -> number")
    out = {}
    for name, v in raw.items():
        try:
            sig.check_signal_name(name)
        except sig.SignalError as e:
            raise RecordsError(f"{where}: signals: {e}") from None
        x = _num(v, where, f"signals.{name}")
        if x is not None:
            out[name] = x
    return out


def parse_record(raw: Any, where: str, line: int = 0) -> Record:
    if not isinstance(raw, dict):
        raise RecordsError(f"{where}: expected a JSON object per line")
    for key in ("id", "prompt", "responses"):
        if key not in raw:
            raise RecordsError(f"{where}: missing field {key!r}")
    rid = raw["id"]
    if not isinstance(rid, (str, int)) or isinstance(rid, bool) or str(rid) == "":
        raise RecordsError(f"{where}: id must be a non-empty string")
    if not isinstance(raw["prompt"], str):
        raise RecordsError(f"{where}: prompt must be a string")
    if not isinstance(raw["responses"], dict) or not raw["responses"]:
        raise RecordsError(f"{where}: responses must be a non-empty object of model -> response")
    split = raw.get("split")
    if split is not None and not isinstance(split, str):
        raise RecordsError(f"{where}: split must be a string or null")
    responses = {
        str(m): parse_response(r, f"{where}: responses[{m!r}]") for m, r in raw["responses"].items()
    }
    gold = raw.get("gold")
    labels = raw.get("labels")
    if labels is not None and not isinstance(labels, str):
        raise RecordsError(f"{where}: labels must be a string or null")
    return Record(
        id=str(rid),
        prompt=raw["prompt"],
        split=split,
        category=raw.get("category"),
        gold=None if gold is None else str(gold),
        responses=responses,
        line=line,
        labels=labels,
    )


def iter_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    with open_text(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield n, line


def load_dataset(path: str | Path) -> Dataset:
    p = Path(path)
    if not p.exists():
        raise RecordsError(f"no such data file: {str(p)!r}")
    records: list[Record] = []
    models: list[str] = []
    seen_ids: dict[str, int] = {}
    try:
        for n, line in iter_lines(p):
            where = f"{p.name}:{n}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordsError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if isinstance(raw, dict) and "prompt" not in raw and is_shared_question(raw.get("id")):
                raw = join(raw, where)  # a live recording: the question from the shared files
            rec = parse_record(raw, where, n)
            if rec.id in seen_ids:
                raise RecordsError(f"{where}: id {rec.id!r} already used on line {seen_ids[rec.id]}")
            seen_ids[rec.id] = n
            for m in rec.responses:
                if m not in models:
                    models.append(m)
            records.append(rec)
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise RecordsError(f"{p}: cannot read: {e}") from None
    if not records:
        raise RecordsError(f"{p}: no rows")
    meta_path = p.with_name(p.name.removesuffix(".gz").removesuffix(".jsonl") + ".models.json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else []
    return Dataset(str(p), records, models, meta)


def attempt_from_response(
    tier: str, tier_index: int, model: str, resp: Response | None, *, price=None, signals: Sequence[str] = ()
) -> Attempt:
    """The attempt a replayed call yields: recorded text, cost and confidences.

    A model not recorded for this row is a failed call (the worker falls back),
    never an empty answer. Cost: the recorded `cost_usd`; where the source did not
    record one, the tier's price applied to the recorded tokens (0 without a price).
    `signals`: what the policy reads at this tier; the recorded extra calls those
    need (live signals) add their cost and latency, as they do in the workers.
    """
    if resp is None:
        return Attempt(tier, tier_index, model, None, error=f"no recorded response of model {model!r}")
    cost = resp.cost_usd
    if cost is None:
        cost = price.cost(resp.tokens_in, resp.tokens_out) if price is not None else 0.0
    extra_cost, extra_ms = resp.calls_cost(signals, price)
    return Attempt(
        tier=tier,
        tier_index=tier_index,
        model=model,
        text=resp.text,
        signals={**{k: v for k, v in resp.signals.items() if sig.get(resp.signals, k) is not None},
                 **sig.from_record(resp.logprob, resp.p_true)},
        cost_usd=cost + extra_cost,
        latency_ms=None if resp.latency_ms is None else resp.latency_ms + extra_ms,
        tokens_in=resp.tokens_in,
        tokens_out=resp.tokens_out,
    )


def record_json(rec: Record, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A record as one line of the benchmarks format (what `parse_record` reads back)."""
    def response(r: Response) -> dict[str, Any]:
        out: dict[str, Any] = {k: getattr(r, k) for k in RESPONSE_FIELDS if k not in ("signals", "token_logprobs",
                                                                                        "calls")}
        if r.signals:
            out["signals"] = dict(r.signals)
        if r.token_logprobs is not None:
            out["token_logprobs"] = [list(p) for p in r.token_logprobs]
        if r.calls:
            out["calls"] = {k: [dict(c) for c in v] for k, v in r.calls.items()}
        return out

    return {"id": rec.id, **(dict(extra) if extra else {}), "split": rec.split, "category": rec.category,
            "prompt": rec.prompt, "gold": rec.gold, **({"labels": rec.labels} if rec.labels else {}),
            "responses": {m: response(r) for m, r in rec.responses.items()}}


def write_records(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Write benchmarks-format rows (from `record_json`) atomically; gzip for a .gz name."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(tmp, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(p)
    return p
