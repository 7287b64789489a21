"""Batches: commit the jobs, send their first stage, wait, report.

Job rows are committed before any message naming them is sent. Re-running the
same batch resumes it: rows already there are kept, finished jobs are skipped,
unfinished ones get their current stage sent again (stages are idempotent).
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Sequence

import structlog
from tqdm import tqdm

from router.core import cascade
from router.core.errors import UserError
from router.core.policy import Policy
from router.core.portfolio import Portfolio
from worker.config.credentials import redact_url
from worker.config.settings import Settings
from worker.job.codec import FAILED, QUEUED, query_of
from worker.ops.migrate import current, upgrade
from worker.queue.admission import Admission, job_row
from worker.queue.dispatch import Dispatcher
from worker.queue.items import MAX_BATCH_ID, Item, storable
from worker.queue.runtime import Runtime
from worker.store.batches import BatchStore, finished
from worker.store.errors import InterfaceError, OperationalError, ride_out
from worker.store.jobs import JobStore
from worker.store.schema import now

log = structlog.get_logger("cascade.batch")

TENANT = "default"  # the tenant of `cascade run`'s batches
SUBMIT_SLICE = (128, 2000)  # jobs planned, committed and sent at a time when a new batch is submitted: first, most


class BatchError(UserError):
    pass


def default_batch_id(source: str, portfolio: Portfolio, selection: str = "") -> str:
    """Same input, selection and portfolio -> same batch, so a re-run resumes it."""
    stem = Path(source).name.split(".")[0][:MAX_BATCH_ID - 11] or "batch"
    h = hashlib.sha256(f"{Path(source).resolve()}\n{portfolio.digest}\n{selection}".encode()).hexdigest()[:10]
    return f"{stem}-{h}"


@dataclass
class Submitted:
    batch_id: str
    new: int
    sent_jobs: int
    messages: int
    changed: list[str] = field(default_factory=list)  # items whose stored input differs from this input's
    missing: int = 0  # jobs of the batch no longer in the input

    def warning(self) -> str | None:
        """What a re-run whose input changed must say, instead of quietly reusing old answers."""
        parts = []
        if self.changed:
            shown = ", ".join(repr(k) for k in self.changed[:3]) + (" ..." if len(self.changed) > 3 else "")
            parts.append(f"{len(self.changed)} item(s) differ from the input the batch was first run with "
                         f"({shown}): their earlier jobs and results are kept")
        if self.missing:
            parts.append(f"{self.missing} job(s) of the batch are no longer in the input and stay in its results")
        if not parts:
            return None
        return (f"batch {self.batch_id!r}: " + "; ".join(parts)
                + ". To run the new input, give the batch another name (--batch).")


def submit(runtime: Runtime, dispatcher: Dispatcher, portfolio: Portfolio, items: Sequence[Item], batch_id: str, *,
           source: str | None) -> Submitted:
    """Commit the batch's jobs (plans computed here, in the submitter), then send the
    first stage of every unfinished one.

    The batch reads as unfinished (`submitting`) from its creation until its last line
    is in, so a submitter that stops half-way never leaves a batch that looks done; the
    same command again completes it. A database outage is ridden out, as the stages
    ride it out: every write is tried again with backoff for up to RECORD_WAIT."""
    jobs, batches = runtime.jobs, runtime.batches

    def durable(call, what: str):
        return ride_out(call, wait=runtime.settings.record_wait, what=what)

    runtime.add_portfolio(portfolio)
    durable(lambda: jobs.save_portfolio(portfolio.digest, portfolio.spec()), "submit: the portfolio")
    batch = durable(lambda: batches.ensure_batch(batch_id, portfolio.digest, source, submitting=True),
                    "submit: the batch")
    if batch["portfolio"] != portfolio.digest:
        raise BatchError(
            f"batch {batch_id!r} was started with another portfolio ({batch['portfolio']}); "
            f"this one is {portfolio.digest}: use another --batch name"
        )
    if not batch["submitting"]:
        durable(lambda: batches.begin_submission(batch_id), "submit: the batch")
    timeout = runtime.settings.job_timeout
    deadline = now() + timedelta(seconds=timeout) if timeout else None
    if not batch["total"]:
        # A new batch goes in slices: each slice's first stages leave as soon as its rows
        # are committed, so the workers start while the rest is planned and written.
        new = sent = messages = 0
        # the promoted policy version plans the batch's jobs (each keeps it to the end); read
        # again per slice, so a version promoted while a long batch is submitted takes over
        version, policy = runtime.current_policy(portfolio.digest)
        joint = type(policy).plan_batch is not Policy.plan_batch  # OptLLM plans them together
        planned = job_rows(batch_id, items, portfolio, policy=policy, version=version) if joint else None
        i, size = 0, SUBMIT_SLICE[0]
        stopped = False  # the tenant's budget stopped admitting (worker.queue.admission)
        while i < len(items):
            if not joint:
                version, policy = runtime.current_policy(portfolio.digest)
            rows = planned[i : i + size] if joint else job_rows(batch_id, items[i : i + size], portfolio,
                                                                policy=policy, version=version)
            i, size = i + size, min(size * 2, SUBMIT_SLICE[1])  # the first jobs leave soonest
            for r in rows if deadline else ():
                r.setdefault("deadline", deadline)
            tries, admission = [], Admission(TENANT, stopped=stopped)

            def insert(rows=rows, tries=tries, admission=admission):
                tries.append(1)
                return jobs.insert_jobs(batch_id, rows, admit=admission)

            ids = durable(insert, f"submit: lines {rows[0]['seq']}-{rows[-1]['seq']}")
            rows, stopped = admission.rows, admission.stopped
            # an insert tried again may have been committed before its connection went:
            # its rows' first stages leave anyway (a stage is idempotent)
            first = [(r["id"], r["current_tier"], runtime.queue_of(portfolio.digest, r["current_tier"]))
                     for r in rows if (r["id"] in ids or len(tries) > 1) and r["status"] == QUEUED]
            new, sent, messages = new + len(ids), sent + len(first), messages + dispatcher.send(first)
        durable(lambda: batches.end_submission(batch_id), "submit: the batch")
        return Submitted(batch_id, new, sent, messages)
    version, policy = runtime.current_policy(portfolio.digest)
    rows = job_rows(batch_id, items, portfolio, policy=policy, version=version)
    for r in rows if deadline else ():
        r.setdefault("deadline", deadline)
    new = durable(lambda: jobs.add_jobs(batch_id, rows, admit=Admission(TENANT)), "submit: the lines")
    changed, missing = durable(lambda: changed_items(jobs, batch_id, rows), "submit: the lines")
    durable(lambda: batches.end_submission(batch_id), "submit: the batch")
    sent, messages = durable(lambda: resend_open(runtime, dispatcher, batch_id), "submit: the open jobs")
    sub = Submitted(batch_id, new, sent, messages, changed, missing)
    if sub.warning():
        log.warning("submit.input_changed", batch=batch_id, changed=len(changed), missing=missing)
    return sub


def changed_items(store: JobStore, batch_id: str, rows: Sequence[dict[str, Any]]) -> tuple[list[str], int]:
    """A re-run: the item keys whose stored job was made from other input, and how
    many stored jobs this input no longer has."""
    stored = store.job_inputs(batch_id)
    changed = []
    for r in rows:
        before = stored.get(r["item_key"])
        now_ = (r["input"], r.get("error")) if r["status"] == FAILED else (r["input"], None)
        if before is not None and before != now_:
            changed.append(r["item_key"])
    keys = {r["item_key"] for r in rows}
    return changed, sum(1 for k in stored if k not in keys)


def _item_where(it: Item) -> str:
    return f"item {it.key}: "


def job_rows(batch_id: str, items: Sequence[Item], portfolio: Portfolio,
             where: Callable[[Item], str] = _item_where, *, policy: Policy | None = None,
             version: int = 1) -> list[dict[str, Any]]:
    """The batch's job rows, the pre-call decisions made for the whole batch at once
    (OptLLM under a batch budget). If the policy cannot plan the batch, each item is
    planned alone, so that an input it cannot plan fails alone. `where`: the prefix of
    an item's error (a tier of its plan cannot honour it)."""
    good = [it for it in items if it.error is None]
    try:
        starts = iter(cascade.start_batch(policy or portfolio.built_policy,
                                          [query_of(f"{batch_id}:{it.key}", it.data) for it in good]))
    except Exception:
        log.exception("submit.batch_plan_failed", batch=batch_id)
        starts = None
    return [_item_row(batch_id, it, portfolio, None if starts is None or it.error is not None else next(starts),
                      where(it), policy, version)
            for it in items]


def _item_row(batch_id: str, it: Item, portfolio: Portfolio, start: cascade.Start | None,
              where: str, policy: Policy | None = None, version: int = 1) -> dict[str, Any]:
    job_id = f"{batch_id}:{it.key}"
    try:
        return job_row(job_id, it.key, it.seq, portfolio, it.data, it.error, where, start, policy, version)
    except Exception as e:  # a policy that cannot plan this one input fails it, not the batch
        log.exception("submit.plan_failed", item=it.key)
        return job_row(job_id, it.key, it.seq, portfolio, None, f"item {it.key!r} (line {it.seq}): the policy "
                                                                   f"could not plan it: {type(e).__name__}: {e}")


def check_batch_id(batch_id: str) -> None:
    if not batch_id or len(batch_id) > MAX_BATCH_ID or storable(batch_id) or any(c.isspace() for c in batch_id):
        raise BatchError(f"batch name {batch_id[:60]!r}: use 1 to {MAX_BATCH_ID} characters, no spaces or NUL")


def holder_gone(holder: str) -> bool:
    """Whether a lease holder (`host:pid`, worker.queue.runtime) is a process of this host
    that no longer runs. One of another host, or a pid alive again, is not known gone."""
    host, _, pid = holder.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def resend_open(runtime: Runtime, dispatcher: Dispatcher, batch_id: str, *, idle_before=None) -> tuple[int, int]:
    """Send the current stage of the batch's unfinished jobs (of those idle since
    `idle_before`, if given). Safe at any time: a stage is idempotent, so a job
    whose message still exists is only looked at twice. Returns (jobs, messages)."""
    batch = runtime.batches.batch(batch_id)
    if batch is None:
        raise BatchError(f"no batch {batch_id!r}")
    # a process of this host that held jobs and is gone (a `cascade run` killed mid-batch) cannot
    # renew its leases: give them up, or the stages sent again would wait out the lease (in the
    # embedded mode no sweeper sends them a second time, and the run would wait for ever)
    runtime.jobs.release_leases(batch_id, [h for h in runtime.jobs.lease_holders(batch_id) if holder_gone(h)])
    open_jobs = runtime.jobs.open_jobs(batch_id, idle_before=idle_before)
    digest = batch["portfolio"]
    messages = dispatcher.send((job_id, tier, runtime.queue_of(digest, tier)) for job_id, tier in open_jobs)
    return len(open_jobs), messages


def wait_for(store: BatchStore, batch_id: str, *, progress: bool = True, alive=None, timeout: float | None = None,
             poll: float = 0.2, hint: str = "", max_cost: float | None = None) -> dict:
    """Block until every job of the batch is final; a progress bar on stderr. With
    `max_cost`, once the finished jobs' cost passes it the open jobs are cancelled."""
    started = time.monotonic()
    b = _read_batch(store, batch_id, started, timeout)
    bar = tqdm(total=b["total"], initial=b["done"], desc=batch_id, unit="job", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    last_move = time.monotonic()
    last_done = b["done"]
    warned = False
    try:
        while not finished(b):
            time.sleep(poll)
            b = _read_batch(store, batch_id, started, timeout, b)
            bar.update(b["done"] - bar.n)
            bar.set_postfix(failed=b["failed"], cost=f"${b['total_cost']:.4g}", refresh=False)
            now = time.monotonic()
            if b["done"] != last_done:
                last_done, last_move = b["done"], now
            if max_cost is not None and b["total_cost"] > max_cost:
                n = store.cancel_batch(batch_id)
                raise BatchError(f"batch {batch_id!r} spent ${b['total_cost']:.6g}, over the cap ${max_cost:g}: "
                                 f"its {n} unfinished jobs are cancelled")
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


def _read_batch(store: BatchStore, batch_id: str, started: float, timeout: float | None, last: dict | None = None) -> dict:
    """The batch row; while the database is away, the last one read (the waiting
    submitter rides out an outage: the workers finish the jobs once it is back)."""
    while True:
        try:
            b = store.batch(batch_id)
            if last is not None and last.get("_outage"):
                log.warning("wait.database_back", batch=batch_id)
            return b
        except (OperationalError, InterfaceError) as e:
            if last is not None and not last.get("_outage"):
                log.warning("wait.database_unavailable", batch=batch_id, error=str(e.orig or e).splitlines()[0][:200])
            if last is not None:
                return {**last, "_outage": True}
                return last
            if timeout is not None and time.monotonic() - started > timeout:
                raise BatchError(f"the database stayed unavailable for {timeout:.0f}s; re-run to resume") from None
            time.sleep(1.0)


@dataclass
class BatchReport:
    batch_id: str
    batch: dict
    submitted: Submitted
    jobs: list[dict] = field(default_factory=list)
    # wall-clock seconds: "start" = workers up (embedded: models loaded), "serve" = from
    # the first submission to the last result (the time a warm service takes)
    timing: dict[str, float] = field(default_factory=dict)

    def tier_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for j in self.jobs:
            if j["final_tier"]:
                out[j["final_tier"]] = out.get(j["final_tier"], 0) + 1
        return out


def job_results(store: JobStore, batch_id: str) -> list[dict]:
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


def prepare_database(settings: Settings) -> None:
    """Embedded: create/upgrade the SQLite schema. Distributed: insist it is current."""
    if settings.embedded:
        upgrade(settings.db_url)
        return
    if current(settings.db_url) is None:
        raise BatchError(f"the database at {redact_url(settings.db_url)} has no schema: run `cascade db upgrade` first")
