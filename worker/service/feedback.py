"""Graded outcomes of production jobs (`cascade feedback`): read a grades file,
store the grades, and export graded jobs in the benchmarks format so a policy can
be re-tuned (`cascade tune --data EXPORT`) on live traffic.

A grades line is a JSON object:
    {"id": ITEM_KEY | "job": JOB_ID, "correct": 0..1, "gold": "...", "tiers": {TIER: 0..1}}
`correct` grades the job's final answer; `tiers` optionally grades the answers of
other tiers it called (re-tuning a cascade needs every tier's grade on a row:
rows where a model's `correct` is unknown are dropped by the tuner, which says so).
"""
from __future__ import annotations

import gzip
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from router.core.errors import UserError
from worker.ops.migrate import current
from worker.queue.batch import job_results
from worker.store.batches import BatchStore
from worker.store.feedback import FeedbackStore
from worker.store.jobs import JobStore

FEEDBACK_REVISION = "0002"


class FeedbackError(UserError):
    """A grades file or request that cannot be recorded."""


@dataclass(frozen=True)
class FeedbackStores:
    """What recording and exporting grades reads and writes."""

    feedback: FeedbackStore
    jobs: JobStore
    batches: BatchStore


def feedback_store(db_url: str) -> FeedbackStores:
    """The stores at `db_url`, once its schema has the feedback table; else an error naming the fix."""
    rev = current(db_url)
    if rev is None:
        raise FeedbackError("the database has no schema yet: nothing has run (or run `cascade db upgrade`)")
    if rev < FEEDBACK_REVISION:
        raise FeedbackError(f"the database schema is at revision {rev}, feedback needs {FEEDBACK_REVISION}: "
                            f"run `cascade db upgrade`")
    return FeedbackStores(FeedbackStore(db_url), JobStore(db_url), BatchStore(db_url))


def _known_batch(store: FeedbackStores, batch_id: str) -> None:
    if store.batches.batch(batch_id) is None:
        raise FeedbackError(f"no batch {batch_id!r} (list them with `cascade status`)")


def _grade(v: Any, where: str) -> float:
    if isinstance(v, bool):
        return float(v)
    if not isinstance(v, (int, float)) or not math.isfinite(v) or not 0.0 <= v <= 1.0:
        raise FeedbackError(f"{where}: a grade must be a number in [0, 1] (or true/false), got {v!r}")
    return float(v)


def parse_grades(lines: Sequence[str], name: str) -> list[dict[str, Any]]:
    """Grades lines -> [{"key" or "job", "correct", "gold", "tiers", "line"}]; a bad line is an error naming it."""
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{name}: line {n}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as e:
            raise FeedbackError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(raw, dict):
            raise FeedbackError(f"{where}: expected a JSON object")
        unknown = sorted(set(raw) - {"id", "job", "correct", "gold", "tiers"})
        if unknown:
            raise FeedbackError(f"{where}: unknown field(s) {unknown}; known: id, job, correct, gold, tiers")
        if ("id" in raw) == ("job" in raw):
            raise FeedbackError(f"{where}: give exactly one of 'id' (the item's key) and 'job' (a job id)")
        if "correct" not in raw:
            raise FeedbackError(f"{where}: missing field 'correct'")
        tiers = raw.get("tiers") or {}
        if not isinstance(tiers, dict):
            raise FeedbackError(f"{where}: 'tiers' must be an object tier -> grade")
        gold = raw.get("gold")
        out.append({"key": None if "id" not in raw else str(raw["id"]), "job": raw.get("job"),
                    "correct": _grade(raw["correct"], where), "gold": None if gold is None else str(gold),
                    "tiers": {str(t): _grade(g, f"{where}: tier {t!r}") for t, g in tiers.items()}, "line": n})
    if not out:
        raise FeedbackError(f"{name}: no grades in the file")
    return out


def record(store: FeedbackStores, batch_id: str | None, grades: list[dict[str, Any]], source: str) -> int:
    """Store the grades; every line must name a job that exists (of the batch, for item keys)."""
    keys = [g["key"] for g in grades if g["key"] is not None]
    if keys and batch_id is None:
        raise FeedbackError("grades that name items by 'id' need the batch (cascade feedback add BATCH --file ...)")
    by_key = store.jobs.job_ids(batch_id, keys) if keys else {}
    named = [g["job"] for g in grades if g["job"] is not None]
    known = store.jobs.existing_jobs(named) if named else set()
    rows = []
    for g in grades:
        job = by_key.get(g["key"]) if g["key"] is not None else (g["job"] if g["job"] in known else None)
        if job is None:
            what = f"item {g['key']!r} is not in batch {batch_id!r}" if g["key"] is not None else f"no job {g['job']!r}"
            raise FeedbackError(f"{source}: line {g['line']}: {what}")
        rows.append({"job_id": job, "correct": g["correct"], "gold": g["gold"], "tiers": g["tiers"], "source": source})
    return store.feedback.record_feedback(rows)


def record_file(store: FeedbackStores, batch_id: str | None, path: str | Path) -> int:
    """Store the grades of a grades file (item ids are `batch_id`'s items)."""
    if batch_id is not None:
        _known_batch(store, batch_id)
    p = Path(path)
    grades = parse_grades(p.read_text(encoding="utf-8").splitlines(), p.name)
    return record(store, batch_id, grades, p.name)


def record_one(store: FeedbackStores, batch_id: str | None, job_id: str, correct: float, gold: str | None) -> int:
    """Store one job's grade."""
    if batch_id is not None:
        _known_batch(store, batch_id)
    return record(store, batch_id, [{"key": None, "job": job_id, "correct": correct, "gold": gold, "tiers": {},
                                     "line": 1}], "--job")


def export_rows(store: FeedbackStores, batch_id: str, split: str = "train") -> list[dict[str, Any]]:
    """The batch's graded jobs as benchmarks-format rows: one response per model the
    batch called (text, cost, latency, tokens, logprob/p_true as recorded; `correct`
    from the grades: the final tier's from `correct`, others from `tiers`, else null)."""
    grades = store.feedback.feedback_of(batch_id)
    jobs = [j for j in job_results(store.jobs, batch_id) if j["job_id"] in grades]
    models = sorted({a["model"] for j in jobs for a in j["attempts"]})
    rows = []
    for j in jobs:
        g = grades[j["job_id"]]
        inp = j["input"]
        responses: dict[str, dict[str, Any]] = {m: {"text": None, "correct": None, "cost_usd": None,
                                                    "latency_ms": None, "tokens_in": None, "tokens_out": None,
                                                    "logprob": None, "p_true": None} for m in models}
        for a in j["attempts"]:
            if a["error"] is not None:
                continue
            graded = g["correct"] if a["tier"] == j["final_tier"] else g["tiers"].get(a["tier"])
            sig = a["signals"] or {}
            responses[a["model"]] = {"text": a["answer"], "correct": graded, "cost_usd": a["cost_usd"],
                                     "latency_ms": a["latency_ms"], "tokens_in": a["tokens_in"],
                                     "tokens_out": a["tokens_out"], "logprob": sig.get("logprob"),
                                     "p_true": sig.get("p_true")}
        rows.append({"id": j["id"] or j["job_id"], "dataset": "feedback", "source": f"cascade feedback {batch_id}",
                     "split": split, "category": inp.get("category"), "prompt": inp.get("prompt"),
                     "gold": g["gold"], "responses": responses})
    return rows


def write_export(rows: list[dict[str, Any]], out: str | Path) -> Path:
    p = Path(out)
    p.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if p.name.endswith(".gz") else open
    tmp = p.with_name(p.name + ".tmp")
    with opener(tmp, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(p)
    return p


def export(store: FeedbackStores, batch_id: str, out: str | Path, split: str = "train") -> int:
    """Write `batch_id`'s graded jobs to `out` (`export_rows`, `write_export`): how many."""
    _known_batch(store, batch_id)
    rows = export_rows(store, batch_id, split)
    if not rows:
        raise FeedbackError(f"batch {batch_id!r} has no graded jobs (record some with `cascade feedback add`)")
    write_export(rows, out)
    return len(rows)
