"""Batches: read the input, commit the jobs, send their first stage, wait, report.

Every input line becomes a job row, good or bad: a line that cannot be a job (not
JSON, no prompt, an id used twice...) is stored as a failed job whose error names
the line, so the batch's counts add up and nothing is silently dropped. Re-running
the same batch resumes it: rows already there are kept, finished jobs are skipped,
unfinished ones get their current stage sent again (stages are idempotent).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from router import cascade
from router.policies import build_policy
from router.portfolio import Portfolio
from router.records import iter_lines

from .settings import Settings, get_settings
from .store import FAILED, QUEUED, Store, iter_chunks

MAX_KEY = 150
# Input fields kept on the job; recorded responses of a benchmarks file are not.
_DROP = ("responses",)


class BatchError(ValueError):
    pass


@dataclass
class Item:
    key: str
    seq: int
    data: dict[str, Any] | None = None  # id, prompt, ... (None when the line is bad)
    error: str | None = None


def item_from(raw: Any, seq: int, where: str) -> Item:
    """One input record -> a job's input, or an error naming the record and field."""
    if not isinstance(raw, dict):
        return Item(f"line-{seq}", seq, error=f"{where}: expected a JSON object, got {type(raw).__name__}")
    rid = raw.get("id")
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int)) or str(rid) == ""):
        return Item(f"line-{seq}", seq, error=f"{where}: id must be a non-empty string or integer")
    key = str(rid) if rid is not None else f"line-{seq}"
    if len(key) > MAX_KEY:
        return Item(f"line-{seq}", seq, error=f"{where}: id is longer than {MAX_KEY} characters")
    if "prompt" not in raw:
        return Item(key, seq, error=f"{where}: missing field 'prompt'")
    prompt = raw["prompt"]
    if not isinstance(prompt, str):
        return Item(key, seq, error=f"{where}: prompt must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        return Item(key, seq, error=f"{where}: empty prompt")
    data = {k: v for k, v in raw.items() if k not in _DROP}
    data["id"] = key
    return Item(key, seq, data=data)


def read_items(path: str | Path, *, split: str | None = None, limit: int | None = None) -> list[Item]:
    """Items of a JSONL (or .jsonl.gz) file, numbered by line; bad lines kept as errors."""
    p = Path(path)
    if not p.exists():
        raise BatchError(f"input file {str(p)!r} does not exist")
    items: list[Item] = []
    seen: dict[str, int] = {}
    try:
        for n, line in iter_lines(p):
            where = f"{p.name}: line {n}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                item = Item(f"line-{n}", n, error=f"{where}: not valid JSON ({e.msg} at column {e.colno})")
            else:
                if split is not None and isinstance(raw, dict) and raw.get("split") != split:
                    continue
                item = item_from(raw, n, where)
            if item.key in seen:
                item = Item(f"line-{n}", n, error=f"{where}: id {item.key!r} already used on line {seen[item.key]}")
            seen[item.key] = n
            items.append(item)
            if limit is not None and len(items) >= limit:
                break
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise BatchError(f"cannot read {p}: {e}") from None
    return items


def items_from_dicts(rows: Iterable[dict[str, Any]]) -> list[Item]:
    items, seen = [], {}
    for n, raw in enumerate(rows, 1):
        item = item_from(raw, n, f"item {n}")
        if item.key in seen:
            item = Item(f"line-{n}", n, error=f"item {n}: id {item.key!r} already used by item {seen[item.key]}")
        seen[item.key] = n
        items.append(item)
    return items


def default_batch_id(source: str, portfolio: Portfolio, selection: str = "") -> str:
    """Same input, selection and portfolio -> same batch, so a re-run resumes it."""
    stem = Path(source).name.split(".")[0][:40] or "batch"
    h = hashlib.sha256(f"{Path(source).resolve()}\n{portfolio.digest}\n{selection}".encode()).hexdigest()[:10]
    return f"{stem}-{h}"


@dataclass
class Submitted:
    batch_id: str
    new: int
    sent_jobs: int
    messages: int


def submit(app, portfolio: Portfolio, items: Sequence[Item], batch_id: str, *, source: str | None,
           chunk_size: int) -> Submitted:
    """Commit the batch's jobs, then send the first stage of every unfinished one."""
    from .celery_app import runtime_of

    rt = runtime_of(app)
    store = rt.store
    store.save_portfolio(portfolio.digest, portfolio.spec())
    batch = store.ensure_batch(batch_id, portfolio.digest, source)
    if batch["portfolio"] != portfolio.digest:
        raise BatchError(
            f"batch {batch_id!r} was started with another portfolio ({batch['portfolio']}); "
            f"this one is {portfolio.digest}: use another --batch name"
        )
    policy = build_policy(portfolio)
    rows = []
    for it in items:
        row: dict[str, Any] = {"id": f"{batch_id}:{it.key}", "item_key": it.key, "seq": it.seq,
                               "portfolio": portfolio.digest}
        if it.error is not None:
            row.update(input={"line": it.seq}, status=FAILED, error=it.error)
        else:
            from .stage import query_of

            start = cascade.start(policy, query_of({"id": row["id"], "input": it.data}))
            plan = {"first": start.plan.first, "allowed": None if start.plan.allowed is None else list(start.plan.allowed),
                    "note": start.plan.note}
            row.update(input=it.data, plan=plan, status=QUEUED, current_tier=portfolio.tiers[start.tier].name)
        rows.append(row)
    new = store.add_jobs(batch_id, rows)
    sent, messages = resend_open(app, portfolio, batch_id, chunk_size=chunk_size)
    return Submitted(batch_id, new, sent, messages)


def resend_open(app, portfolio: Portfolio, batch_id: str, *, chunk_size: int,
                idle_before=None) -> tuple[int, int]:
    """Send the current stage of the batch's unfinished jobs (of those idle since
    `idle_before`, if given). Safe at any time: a stage is idempotent, so a job
    whose message still exists is only looked at twice. Returns (jobs, messages)."""
    from .celery_app import runtime_of, send_stage

    open_jobs = runtime_of(app).store.open_jobs(batch_id, idle_before=idle_before)
    by_tier: dict[str, list[str]] = {}
    for job_id, tier in open_jobs:
        by_tier.setdefault(tier, []).append(job_id)
    messages = 0
    for tier, ids in by_tier.items():
        queue = portfolio.tier(tier).queue_name
        for chunk in iter_chunks(ids, chunk_size):
            send_stage(app, tier, queue, chunk)
            messages += 1
    return len(open_jobs), messages


def wait_for(store: Store, batch_id: str, *, progress: bool = True, alive=None, timeout: float | None = None,
             poll: float = 0.2, hint: str = "") -> dict:
    """Block until every job of the batch is final; a progress bar on stderr."""
    from tqdm import tqdm

    b = store.batch(batch_id)
    bar = tqdm(total=b["total"], initial=b["done"], desc=batch_id, unit="job", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    started = last_move = time.monotonic()
    last_done = b["done"]
    warned = False
    try:
        while b["done"] < b["total"]:
            time.sleep(poll)
            b = store.batch(batch_id)
            bar.update(b["done"] - bar.n)
            bar.set_postfix(failed=b["failed"], cost=f"${b['total_cost']:.4g}", refresh=False)
            now = time.monotonic()
            if b["done"] != last_done:
                last_done, last_move = b["done"], now
            if alive is not None and not alive():
                raise BatchError("an embedded worker stopped; re-run the same command to resume the batch")
            if timeout is not None and now - started > timeout:
                raise BatchError(f"batch {batch_id!r} not finished after {timeout:.0f}s "
                                 f"({b['done']}/{b['total']} done); re-run to resume")
            if hint and not warned and now - last_move > 30:
                print(f"\nno progress for 30s: {hint}", file=sys.stderr)
                warned = True
    finally:
        bar.close()
    return b


@dataclass
class BatchReport:
    batch_id: str
    batch: dict
    submitted: Submitted
    jobs: list[dict] = field(default_factory=list)

    def tier_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for j in self.jobs:
            if j["final_tier"]:
                out[j["final_tier"]] = out.get(j["final_tier"], 0) + 1
        return out


def job_results(store: Store, batch_id: str) -> list[dict]:
    """Every job of the batch in input order, with its attempts."""
    jobs = store.batch_jobs(batch_id)
    ats = store.attempts_of([j["id"] for j in jobs])
    out = []
    for j in jobs:
        attempts = [
            {k: a[k] for k in ("tier", "model", "answer", "signals", "cost_usd", "latency_ms", "tokens_in",
                               "tokens_out", "decision", "reason", "error", "meta")}
            for a in ats[j["id"]]
        ]
        final = next((a for a in attempts if a["tier"] == j["final_tier"]), None)
        correct = None if final is None else final["meta"].get("correct")
        out.append({
            "id": j["item_key"], "job_id": j["id"], "status": j["status"], "answer": j["final_answer"],
            "final_tier": j["final_tier"], "cost_usd": j["total_cost"], "error": j["error"],
            "correct": correct, "input": j["input"], "attempts": attempts,
        })
    return out


def write_results(jobs: Sequence[dict], out: str | Path) -> None:
    p = Path(out)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for j in jobs:
            row = {k: v for k, v in j.items() if k != "input"}
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    tmp.replace(p)


@contextlib.contextmanager
def _workers(app, portfolio: Portfolio, settings: Settings) -> Iterator[Any]:
    if settings.embedded:
        from .embedded import EmbeddedWorkers

        with EmbeddedWorkers(app, portfolio, concurrency=settings.worker_concurrency) as w:
            yield w.alive
    else:
        yield None


def prepare_database(settings: Settings) -> None:
    """Embedded: create/upgrade the SQLite schema. Distributed: insist it is current."""
    from .migrate import current, upgrade

    if settings.embedded:
        upgrade(settings.db_url)
        return
    if current(settings.db_url) is None:
        raise BatchError(f"the database at {settings.db_url} has no schema: run `cascade db upgrade` first")


def run_batch(items: Iterable[dict[str, Any]] | Sequence[Item], portfolio: Portfolio, *,
              settings: Settings | None = None, batch_id: str | None = None, source: str | None = None,
              progress: bool = True, wait: bool = True, timeout: float | None = None, app=None) -> BatchReport:
    """Run items through the portfolio's tiers and return every job with its attempts.

    In the embedded mode the tier workers run in this process for the duration of
    the call; in the distributed mode `cascade worker --tier NAME` pools do the work.
    """
    from .backends import validate_portfolio
    from .celery_app import make_app, runtime_of

    settings = settings or get_settings()
    items = list(items)
    if items and not isinstance(items[0], Item):
        items = items_from_dicts(items)
    validate_portfolio(portfolio)
    prepare_database(settings)
    app = app or make_app(settings)
    if batch_id is None:
        if source is None:
            raise BatchError("a batch needs an id or a source to derive one from")
        batch_id = default_batch_id(source, portfolio)
    store = runtime_of(app).store
    with _workers(app, portfolio, settings) as alive:
        sub = submit(app, portfolio, items, batch_id, source=source, chunk_size=settings.chunk_size)
        if not wait:
            return BatchReport(batch_id, store.batch(batch_id), sub)
        hint = "" if settings.embedded else (
            "are workers running? start one per tier: "
            + ", ".join(f"`cascade worker --tier {t.name}`" for t in portfolio.tiers))
        b = wait_for(store, batch_id, progress=progress, alive=alive, timeout=timeout, hint=hint)
    return BatchReport(batch_id, b, sub, job_results(store, batch_id))
