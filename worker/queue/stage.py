"""One stage: the jobs of one message, at one tier.

Load the jobs (and count their delivery) in one statement, call the tier's backend
for all of them at once (`generate_many`: an HTTP tier has many requests in flight,
a local model may decode them together; bounded retries per job), compute the
signals, ask the policy through `router.cascade` (the same code the offline
evaluator runs), then write every attempt and its consequence in one transaction
(one statement on PostgreSQL) and return the messages to send next. No Celery
here: the task wraps this.

Redelivery is safe by construction: a job already final is skipped; a job that
already has an attempt at this tier is not called again (its stored decision
stands, and its next message is sent again, which is harmless); a job another
worker's stage holds the lease of (worker.store.stages: until that worker went
`stale_after` without a heartbeat) is left to it. Every call is recorded as started,
with its estimated cost, before it is made (by the stage's start statement, else one
statement per delivery), and
finished by the record, so a worker killed mid-call leaves its calls known.
"""
from __future__ import annotations

import time
from datetime import datetime, timedelta
from typing import Any, Sequence

import structlog

from router.core import cascade
from router.core import signals as sig
from router.core.attempt import Attempt, Query
from router.core.errors import InternalError
from router.core.policy import Needs
from router.core.portfolio import Tier
from worker.config.logs import context
from worker.config.settings import Settings
from worker.job.codec import EXPIRED, FINAL, StageOutcome, attempt_from_row, plan_of, query_of
from worker.models.backends import Backend, BackendFailure, BackendResult, TransientBackendError
from worker.models.breaker import breaker_of
from worker.models.extra_calls import with_extra_calls
from worker.ops import metrics
from worker.queue.admission import call_bound
from worker.queue.dispatch import queue_for
from worker.queue.runtime import Runtime
from worker.store.errors import InterfaceError, OperationalError, StatementError
from worker.store.schema import now
from worker.store.stages import StageStore

log = structlog.get_logger("cascade.stage")


def call_backend(backend: Backend, tier: Tier, index: int, query: Query, needs: Needs,
                 settings: Settings, retries: int | None = None) -> tuple[Attempt, dict[str, Any]]:
    """One attempt at this tier: retries transient errors with doubling backoff
    (honouring a server's Retry-After), and turns a failure into a failed attempt.
    A call that crashes (not a BackendFailure) raises."""
    got = call_backend_many(backend, tier, index, [query], needs, settings, retries=retries)[0]
    if isinstance(got, BaseException):
        raise got
    return got


def call_backend_many(backend: Backend, tier: Tier, index: int, queries: Sequence[Query], needs: Needs,
                      settings: Settings, retries: int | None = None) -> list[tuple[Attempt, dict[str, Any]] | Exception]:
    """One attempt per query at this tier, all through `backend.generate_many` (an
    HTTP backend has many requests in flight, a local one may decode them together).

    The rules of one call hold per query: transient errors are retried with doubling
    backoff (a server's Retry-After honoured), in rounds: the queries still failing
    are sent again together after the longest wait any of them was asked for. Once a
    query exhausted its retries (the server is down or overloaded), the others still
    failing give up with it, the breaker opens, and their jobs fall back now instead
    of each waiting out the whole backoff. A query whose call crashed (an exception
    that is not a BackendFailure) gets its exception in its place: the stage records
    it and sends that job again alone."""
    started = time.perf_counter()
    retries = settings.backend_retries if retries is None else retries
    breaker = breaker_of(backend)
    why = breaker.blocked() if settings.backend_breaker_cooldown else None
    if why:
        return [(_failed(tier, index, backend, why, started), {"tries": 0, "circuit_open": True}) for _ in queries]
    out: list[Any] = [None] * len(queries)
    tries = [0] * len(queries)
    pending = list(range(len(queries)))
    delay = settings.backend_retry_backoff
    while pending:
        call_started = time.perf_counter()
        got = _generate_many(backend, [queries[i] for i in pending], needs)
        # wall time of the round that answered (a replay's latency_ms is the recorded one)
        backend_ms = (time.perf_counter() - call_started) * 1000
        again: list[int] = []
        waits: list[float] = []
        errors: dict[int, TransientBackendError] = {}
        gave_up: TransientBackendError | None = None
        for i, r in zip(pending, got):
            if isinstance(r, BackendResult):
                r = _with_extra_calls(backend, queries[i], needs, r)
            if isinstance(r, BackendResult):
                out[i] = (_attempt(backend, tier, index, r, started), {**r.meta, "tries": tries[i] + 1,
                                                                        "backend_ms": backend_ms})
            elif isinstance(r, TransientBackendError):
                tries[i] += 1
                if tries[i] > retries:
                    gave_up = r
                    out[i] = _gave_up(tier, index, backend, r, tries[i], started)
                else:
                    again.append(i)
                    errors[i] = r
                    waits.append(min(settings.backend_retry_max_delay,
                                     r.retry_after if r.retry_after is not None else delay))
                    log.warning("backend.retry", tier=tier.name, query=queries[i].id, error=str(r), attempt=tries[i],
                                wait_s=waits[-1])
            elif isinstance(r, BackendFailure):
                out[i] = (_failed(tier, index, backend, str(r), started), {"tries": tries[i] + 1})
            else:
                out[i] = r if isinstance(r, Exception) else TypeError(f"generate_many returned {type(r).__name__}")
        if any(isinstance(r, BackendResult) for r in got):
            breaker.close()
        if gave_up is not None:
            for i in again:  # one give-up: the others stop retrying with it
                out[i] = _gave_up(tier, index, backend, errors[i], tries[i], started)
            again = []
            if settings.backend_breaker_cooldown:
                breaker.trip(str(gave_up), settings.backend_breaker_cooldown)
        if again:
            time.sleep(max(waits))
            delay *= 2
        pending = again
    return out


def _generate_many(backend: Backend, queries: list[Query], needs: Needs) -> list[Any]:
    """backend.generate_many, each query's crash kept in its place: if the whole call
    raises, the queries are called one at a time so the culprit alone carries it."""
    try:
        got = backend.generate_many(queries, needs)
        if len(got) != len(queries):
            raise InternalError(f"{backend.kind} generate_many answered {len(got)} of {len(queries)} queries")
        return list(got)
    except Exception as e:
        if len(queries) == 1:
            return [e]
        log.warning("backend.many_crashed", tier=backend.tier.name, queries=len(queries), error=str(e)[:200])
        return [r for q in queries for r in _generate_many(backend, [q], needs)]


def _with_extra_calls(backend: Backend, query: Query, needs: Needs, r: BackendResult) -> Any:
    """The live-signal calls a policy asked for, after the answer; their failure is the
    attempt's (a transient one retries the query like its answer call would)."""
    try:
        return with_extra_calls(backend, query, needs, r)
    except BackendFailure as e:
        return e


def _attempt(backend: Backend, tier: Tier, index: int, r: BackendResult, started: float) -> Attempt:
    signals = sig.from_tokens(r.tokens, r.stop) if r.tokens else {}
    signals.update({k: v for k, v in r.signals.items() if sig.get(r.signals, k) is not None})
    cost = r.cost_usd if r.cost_usd is not None else tier.price.cost(r.tokens_in, r.tokens_out)
    latency = r.latency_ms if r.latency_ms is not None else (time.perf_counter() - started) * 1000
    return Attempt(tier.name, index, _model_name(backend), r.text, signals, float(cost), float(latency),
                   r.tokens_in, r.tokens_out)


def _gave_up(tier: Tier, index: int, backend: Backend, e: TransientBackendError, tries: int,
             started: float) -> tuple[Attempt, dict[str, Any]]:
    error = f"{e} (gave up after {tries} {'try' if tries == 1 else 'tries'})"
    return _failed(tier, index, backend, error, started), {"tries": tries, "gave_up": True}


def _model_name(backend: Backend) -> str:
    # the backend's own name for its model (a pack name like "tiny" resolves to the real one)
    name = getattr(backend, "model_name", None)
    return str(name or backend.options.get("model") or backend.options.get("model_path") or backend.kind)


def _failed(tier: Tier, index: int, backend: Backend, error: str, started: float) -> Attempt:
    return Attempt(tier.name, index, _model_name(backend), None, {}, 0.0,
                   (time.perf_counter() - started) * 1000, error=error)


def record(store: StageStore, outcomes: list[StageOutcome]) -> list[StageOutcome]:
    """record_stage; if the database refuses a value (not an outage: a number out of
    a column's range, say), each outcome alone, and one it still refuses fails its
    own job with its attempt and cost recorded: the others of the stage go on."""
    try:
        return store.record_stage(outcomes)
    except StatementError as e:
        if not refused(e):
            raise
        log.warning("stage.record_refused", jobs=len(outcomes), error=str(e.orig or e)[:300])
    applied = []
    for o in outcomes:
        try:
            applied += store.record_stage([o])
        except StatementError as e:
            if not refused(e):
                raise
            log.error("stage.unstorable", job=o.job_id, tier=o.attempt.tier, error=str(e.orig or e)[:300])
            applied += store.record_stage([o.unstorable(f"{type(e.orig or e).__name__}: {e.orig or e}")])
    return applied


def record_durably(store: StageStore, outcomes: list[StageOutcome], wait: float) -> list[StageOutcome]:
    """Record the stage's outcomes, waiting out a database outage here, for up to
    `wait` seconds, rather than raising: the models were called and paid for, and a
    retried stage would call them again with the first calls lost from the books."""
    started = time.monotonic()
    delay = 0.5
    while True:
        try:
            return record(store, outcomes)
        except StatementError as e:
            if refused(e) or time.monotonic() - started + delay > wait:
                raise
            log.warning("stage.record_waiting", jobs=len(outcomes), error=str(e.orig or e).splitlines()[0][:200],
                        retry_in_s=delay)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)  # short: record soon after the database is back


def refused(e: StatementError) -> bool:
    """The database refused a statement's values (as opposed to being unreachable)."""
    return not isinstance(e, (OperationalError, InterfaceError)) and not getattr(e, "connection_invalidated", False)


def run_stage(rt: Runtime, tier_name: str, job_ids: Sequence[str]) -> list[tuple[str, str, str]]:
    """Run one stage message; returns the stages to send next as (job id, tier, queue).

    Bulk: one statement reads the message's jobs and counts their delivery
    (StageStore.start_stage), one `generate_many` calls the tier for all of them (an HTTP
    backend with many requests in flight), and one statement records every result
    (StageStore.record_stage): a message costs the same few round trips whatever its size.

    Dead letters: every run counts a delivery on its jobs (`deliveries`, per tier).
    A first delivery calls its jobs and records them in one transaction. A job that
    raises is recorded with its error and sent again on its own; a job already
    delivered before (its worker died mid-stage) is run careful: one job at a time,
    each recorded at once, so the culprit alone accumulates deliveries and, at
    `max_deliveries`, fails with its last error while the rest of the message completes.
    A job past its deadline expires instead of being called.
    Jobs another thread of this process is running are left to it.
    """
    with rt.running(job_ids) as mine:
        return _run_stage(rt, tier_name, mine) if mine else []


def _run_stage(rt: Runtime, tier_name: str, job_ids: Sequence[str]) -> list[tuple[str, str, str]]:
    took = time.monotonic()
    jobs, prior, started = rt.stages.start_stage(tier_name, job_ids, rt.holder, rt.lease_until())
    # the calls the start recorded (PostgreSQL); if its answer came late, half a lease or more,
    # the lease may have gone to another worker since: checked again before any call is made
    recorded = {j["id"]: j["call_id"] for j in jobs if j.get("call_id") is not None}
    rt.note_calls(recorded.values())
    if recorded and time.monotonic() - took > rt.settings.stale_after / 2:
        recorded = keep_calls(rt, recorded)
    if len(jobs) != len(set(job_ids)):
        log.error("stage.unknown_jobs", tier=tier_name, missing=sorted(set(job_ids) - {j["id"] for j in jobs}))
    todo: list[dict] = []
    resend: dict[str, list[str]] = {}
    for job in jobs:
        if job["status"] in FINAL:
            continue
        if any(a["tier"] == tier_name for a in prior[job["id"]]):
            # done here before (a redelivery): make sure the job's next message exists
            if job["current_tier"] != tier_name:
                resend.setdefault(job["current_tier"], []).append(job["id"])
            continue
        if job["current_tier"] != tier_name:
            log.warning("stage.stale_message", job=job["id"], tier=tier_name, job_tier=job["current_tier"])
            continue
        todo.append(job)
    todo = _drop_overdue_and_dead(rt, tier_name, todo)
    kept = {job["id"] for job in todo}
    unused = [i for j, i in recorded.items() if j not in kept]
    if unused:  # recorded by the start, then expired before their call: never made
        rt.stages.void_calls(unused)
        rt.note_calls(unused, finished=True)
    careful = any(j["deliveries"] for j in todo)
    if not careful:
        rest = [j["id"] for j in todo if j["id"] not in started]
        if rest:  # not started by start_stage (another delivery's start overtook it): only if the lease is free
            started |= rt.stages.start_delivery(tier_name, rest, rt.holder, rt.lease_until())
            todo = _leased_elsewhere(tier_name, todo, started)

    applied: list[StageOutcome] = []
    if careful:
        applied = _run_careful(rt, tier_name, todo, prior, resend, started, recorded)
    else:
        outcomes = []
        for job, o in _run_together(rt, tier_name, todo, prior, recorded):
            if isinstance(o, StageOutcome):
                outcomes.append(o)
            else:
                _crashed(rt, tier_name, job, o, resend)
        applied = record_durably(rt.stages, outcomes, rt.settings.record_wait)
        rt.note_calls([o.call_id for o in outcomes if o.call_id is not None], finished=True)
    metrics.observe_stage(tier_name, applied)
    without = [o for o in applied if o.meta.get("missing_signals")]
    if without:
        log.warning("stage.signal_missing", tier=tier_name, jobs=len(without), of=len(applied),
                    signals=sorted({s for o in without for s in o.meta["missing_signals"]}),
                    why=why_missing(without[0].meta))
    for o in applied:
        if o.decision == "escalate":
            resend.setdefault(o.next_tier, []).append(o.job_id)
    by_id = {j["id"]: j for j in jobs}
    return [(job_id, tier, queue_for(rt.queue_of(by_id[job_id]["portfolio"], tier), by_id[job_id]["input"].get("priority")))
            for tier, ids in resend.items() for job_id in ids]


def _run_careful(rt: Runtime, tier_name: str, todo: list[dict], prior: dict[str, list[dict]],
                 resend: dict[str, list[str]], started: set[str], recorded: dict[str, int]) -> list[StageOutcome]:
    """A redelivered message (its worker died mid-stage): one job at a time, each
    counted (unless the stage's start counted it) and recorded at once, so a job that
    kills its worker is the only one whose deliveries grow."""
    applied: list[StageOutcome] = []
    gave_up = False
    for job in todo:
        if job["id"] not in started:
            if not rt.stages.start_delivery(tier_name, [job["id"]], rt.holder, rt.lease_until()):
                _leased_elsewhere(tier_name, [job], set())
                continue
        with context(job=job["id"], batch=job["batch_id"], tier=tier_name, tenant=job["tenant"]):  # on every line
            try:
                o = _run_job(rt, tier_name, job, prior[job["id"]], retries=0 if gave_up else None,
                             recorded=recorded.get(job["id"]))
            except OperationalError:
                raise  # the database is away: the task retries the whole (idempotent) stage
            except Exception as e:
                _crashed(rt, tier_name, job, e, resend)
                continue
        if o is None:  # its lease went to another worker while this stage waited
            continue
        gave_up = gave_up or bool(o.meta.get("gave_up"))
        applied += record_durably(rt.stages, [o], rt.settings.record_wait)
        rt.note_calls([o.call_id] if o.call_id is not None else [], finished=True)
    return applied


def _run_together(rt: Runtime, tier_name: str, todo: list[dict], prior: dict[str, list[dict]],
                  recorded: dict[str, int]) -> list[tuple[dict, StageOutcome | Exception]]:
    """A first delivery: every job of the message called at once (per portfolio, one
    `generate_many`), then decided one by one; a job whose call or decision crashed
    gets its exception instead of an outcome. The calls the start did not record
    (`recorded`: job id -> call record) are recorded here first."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for job in todo:
        groups.setdefault((job["portfolio"], policy_version(job)), []).append(job)
    out: list[tuple[dict, StageOutcome | Exception]] = []
    gave_up = False
    queries_of = {k: [query_of(j["id"], j["input"]) for j in group] for k, group in groups.items()}
    calls = begin_calls(rt, tier_name, [(j, q, rt.portfolio(k[0])) for k, group in groups.items()
                                        for j, q in zip(group, queries_of[k]) if j["id"] not in recorded])
    calls.update({j["id"]: recorded[j["id"]] for j in todo if j["id"] in recorded})
    for k in list(groups):  # only the jobs whose lease is still this stage's are called
        kept = [(j, q) for j, q in zip(groups[k], queries_of[k]) if j["id"] in calls]
        _leased_elsewhere(tier_name, groups[k], set(calls))
        groups[k], queries_of[k] = [j for j, _ in kept], [q for _, q in kept]
        if not kept:
            del groups[k]
    for (digest, version), group in groups.items():
        portfolio = rt.portfolio(digest)
        policy = rt.policy(digest, version)
        tier = portfolio.tier(tier_name)
        index = portfolio.index(tier_name)
        queries = queries_of[(digest, version)]
        with context(tier=tier_name, jobs=len(group)):
            got = call_backend_many(rt.backend(tier), tier, index, queries, policy.needs(index), rt.settings,
                                    retries=0 if gave_up else None)
        for job, query, r in zip(group, queries, got):
            if isinstance(r, Exception):
                out.append((job, r))
                continue
            attempt, meta = r
            gave_up = gave_up or bool(meta.get("gave_up"))
            # the decision (router.core: pure, it logs nothing) needs no per-job log context; a
            # crash is logged with it by _crashed
            try:
                o = _decide(portfolio, policy, version, tier_name, job, query, prior[job["id"]], attempt, meta)
                o.call_id = calls.get(job["id"])
                out.append((job, o))
            except Exception as e:
                out.append((job, e))
    return out


def begin_calls(rt: Runtime, tier_name: str, jobs: list[tuple[dict, Query, Any]]) -> dict[str, int]:
    """Record the calls about to be made, (job, query, portfolio), as started with their
    estimated cost (the tier's bound for the query, as the budget reserves it), in one
    statement: a worker killed or cut off during the calls leaves them known and priced.
    (A stage's start records them itself where it can: StageStore.start_stage.)"""
    if not jobs:
        return {}
    calls = [(job["id"], tier_name, call_bound(portfolio.tier(tier_name), query)) for job, query, portfolio in jobs]
    got = rt.stages.begin_calls(calls, rt.holder, rt.lease_until(), known=rt.known_calls())
    rt.note_calls(got.values())
    return got


def keep_calls(rt: Runtime, recorded: dict[str, int]) -> dict[str, int]:
    """The recorded calls whose job's lease this worker still has (renewed); the others'
    records are void: another worker took those jobs over while this one waited."""
    kept = rt.stages.keep_calls(recorded, rt.holder, rt.lease_until())
    rt.note_calls([i for j, i in recorded.items() if j not in kept], finished=True)
    return kept


def _leased_elsewhere(tier_name: str, todo: list[dict], started: set[str]) -> list[dict]:
    """The jobs this delivery started; the others are held by a live stage elsewhere
    (their lease has not expired), or were recorded here by another delivery since this
    one read them: left to it, never called a second time."""
    for j in todo:
        if j["id"] not in started:
            log.warning("stage.leased_elsewhere", job=j["id"], tier=tier_name)
            metrics.LEASED_ELSEWHERE.labels(tier_name).inc()
    return [j for j in todo if j["id"] in started]


def _crashed(rt: Runtime, tier_name: str, job: dict, e: BaseException, resend: dict[str, list[str]]) -> None:
    """A job whose stage raised: recorded with its error and sent again alone, or at
    `max_deliveries` failed as a dead letter."""
    runs = job["deliveries"] + 1  # this run included
    with context(job=job["id"], batch=job["batch_id"], tier=tier_name, tenant=job["tenant"]):
        log.error("stage.job_crashed", deliveries=runs, exc_info=e)
    error = f"{type(e).__name__}: {e}"
    if runs >= rt.settings.max_deliveries:
        _dead_letter(rt, tier_name, job, runs, error)
    else:
        rt.stages.note_error(job["id"], error, rt.holder)  # its lease given up: the re-send runs at once
        resend.setdefault(tier_name, []).append(job["id"])  # its next delivery counts


def _drop_overdue_and_dead(rt: Runtime, tier_name: str, todo: list[dict]) -> list[dict]:
    """Fail the jobs past their deadline, and those whose stage here has run
    `max_deliveries` times without a result; the others remain to run."""
    t = now()
    # A run that ended without a result comes back one visibility timeout later (the
    # message returns unacknowledged); a run stamped more recently may still be going
    # on (a duplicate delivery overtook it), so it is left alone, not declared dead.
    quiet_since = t - timedelta(seconds=rt.settings.visibility_timeout / 2)
    keep = []
    for job in todo:
        if job["deadline"] is not None and job["deadline"] < t:
            rt.stages.fail_open_jobs([job["id"]], EXPIRED)
            metrics.EXPIRED.labels(tier_name).inc()
            log.warning("stage.expired", job=job["id"], tier=tier_name)
        elif job["deliveries"] < rt.settings.max_deliveries:
            keep.append(job)
        elif job["updated_at"] < quiet_since:
            _dead_letter(rt, tier_name, job, job["deliveries"],
                         job["error"] or "the worker stopped while running it (killed, out of memory or crashed)",
                         unchanged_since=job["updated_at"])
        else:
            log.warning("stage.maybe_running_elsewhere", job=job["id"], tier=tier_name, deliveries=job["deliveries"])
    return keep


def _dead_letter(rt: Runtime, tier_name: str, job: dict, runs: int, cause: str,
                 unchanged_since: datetime | None = None) -> None:
    """`unchanged_since`: the job's `updated_at` as this stage read it, when the verdict
    rests on that read alone: a delivery that recorded the job since wins."""
    if not rt.stages.fail_open_jobs([job["id"]], f"dead letter: its stage at tier {tier_name} ran {runs} times "
                                                 f"without a result; last error: {cause}",
                                    unchanged_since=unchanged_since):
        log.warning("stage.dead_letter_overtaken", job=job["id"], tier=tier_name)
        return
    metrics.DEAD_LETTERS.labels(tier_name).inc()
    log.error("stage.dead_letter", job=job["id"], tier=tier_name, deliveries=runs, error=cause)


def _run_job(rt: Runtime, tier_name: str, job: dict, prior: list[dict], retries: int | None,
             recorded: int | None = None) -> StageOutcome | None:
    """Call this job's tier and ask its policy what follows (None: its lease went to
    another worker meanwhile, nothing called). `recorded`: its call's record, made by
    the stage's start (its lease is checked again: the jobs before it took their time)."""
    portfolio = rt.portfolio(job["portfolio"])
    version = policy_version(job)
    policy = rt.policy(job["portfolio"], version)
    tier = portfolio.tier(tier_name)
    index = portfolio.index(tier_name)
    query = query_of(job["id"], job["input"])
    if recorded is not None:
        calls = keep_calls(rt, {job["id"]: recorded})
    else:
        calls = begin_calls(rt, tier_name, [(job, query, portfolio)])
    if job["id"] not in calls:
        _leased_elsewhere(tier_name, [job], set())
        return None
    attempt, meta = call_backend(rt.backend(tier), tier, index, query, policy.needs(index), rt.settings,
                                 retries=retries)
    o = _decide(portfolio, policy, version, tier_name, job, query, prior, attempt, meta)
    o.call_id = calls.get(job["id"])
    return o


def policy_version(job: dict) -> int:
    """The policy version that decides this job: the one that planned it at submission
    (`plan.policy_version`, worker.queue.admission), so a job finishes under the version it
    started with; 1 (the portfolio file's) for a job planned before versions existed."""
    return int((job["plan"] or {}).get("policy_version") or 1)


def _decide(portfolio, policy, version: int, tier_name: str, job: dict, query: Query, prior: list[dict],
            attempt: Attempt, meta: dict[str, Any]) -> StageOutcome:
    """Ask the job's policy (at its version) what follows this attempt (router.core.cascade.step)."""
    meta = {**meta, "policy_version": version}  # every attempt says which version decided it
    history = [attempt_from_row(a) for a in prior] + [attempt]
    d = cascade.step(policy, query, plan_of(job["plan"]), history)
    reason = d.reason
    missing = missing_signals(policy.needs(portfolio.index(tier_name)), attempt)
    if missing:
        # decided without a signal the policy reads: said in the reason and counted (metrics), never silent
        meta = {**meta, "missing_signals": missing}
        reason = f"{reason} [{', '.join(missing)} not in the answer: {why_missing(meta)}]"
    o = StageOutcome(job["id"], job["batch_id"], len(history) - 1, attempt, d.action, reason, meta,
                     total_cost=sum(a.cost_usd for a in history))
    if d.action == "escalate":
        o.next_tier = portfolio.tiers[d.next_tier].name
    else:
        o.top_tier_cost = top_tier_cost(portfolio, history)
        if d.action == "accept":
            final = cascade.final_attempt(history, d)
            o.final_answer, o.final_tier = final.text, final.tier
        else:
            o.error = d.reason
    return o


def missing_signals(needs: Needs, attempt: Attempt) -> list[str]:
    """The signals the policy reads at this tier that an answered attempt lacks."""
    if attempt.error is not None:
        return []
    return [s for s in needs.signals if sig.get(attempt.signals, s) is None]


def why_missing(meta: dict[str, Any]) -> str:
    """Why an answer lacked a signal, as far as the call tells: a server that sent no token
    log-probs (the worker's preflight refuses one that never does, unless started with
    --allow-missing-signals), or an answer that did not yield it (an empty answer, a
    verdict that says neither yes nor no)."""
    if meta.get("logprobs_missing"):
        return (f"{meta.get('server') or 'the server'} sent no token log-probs although they were asked for "
                f"(`cascade check` probes it)")
    return "the answer did not yield it"


def top_tier_cost(portfolio, history: Sequence[Attempt]) -> float:
    """The job's cost had it called only the top tier: that call's cost if it was made,
    else the top tier's price on the job's own tokens (those of its last answer)."""
    top = portfolio.tiers[-1]
    for a in history:
        if a.tier == top.name:
            return a.cost_usd
    ref = next((a for a in reversed(history) if a.error is None), None)
    return top.price.cost(ref.tokens_in if ref else None, ref.tokens_out if ref else None)
