"""Prometheus metrics of a worker process, and the HTTP endpoint that serves them.

Counters move only for what PostgreSQL recorded: a stage counts the outcomes its
transaction applied (a duplicate delivery that lost the race counts nothing), so
`cascade_calls_total{tier}` equals the attempt rows of that tier written by this
process. Pools are threads or solo, so one process is one exporter: with several
worker processes, Prometheus scrapes each and sums (no multiprocess directory).

Cost saved against always using the top tier is `cascade_top_tier_cost_usd_total -
cascade_job_cost_usd_total`: two counters, because a job that climbed every tier
costs more than the top tier alone and a counter cannot go down. The top tier's
cost of a job that never reached it is its price on the job's own tokens.

Queue depth and the age of a queue's oldest message are read from Redis at scrape
time (the age from the `sent_at` header `worker.queue.dispatch` puts on every message).
`/healthz` answers 200 while this worker's canary (`worker.ops.canary`) is consumed in
time, else 503; the same endpoint serves an API process (`serve`, `asgi_app`).
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable, Sequence

import redis
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Histogram, generate_latest, make_asgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from worker.job.codec import StageOutcome

log = structlog.get_logger("cascade.metrics")

CALLS = Counter("cascade_calls", "model calls recorded, per tier", ["tier"])
DECISIONS = Counter("cascade_decisions", "policy decisions after a call: accept, escalate or reject", ["tier", "decision"])
FAILURES = Counter("cascade_call_failures", "calls that failed for good (the job fell back or failed)", ["tier"])
DEAD_LETTERS = Counter("cascade_dead_letters", "jobs failed because their stage kept crashing", ["tier"])
LEASED_ELSEWHERE = Counter("cascade_leased_elsewhere", "jobs a delivery left alone: another worker's stage holds "
                           "their lease (a re-sent or duplicate message)", ["tier"])
EXPIRED = Counter("cascade_expired_jobs", "jobs failed because they were open past their deadline", ["tier"])
LATENCY = Histogram("cascade_call_latency_seconds", "model call latency", ["tier"],
                    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
TOKENS = Counter("cascade_tokens", "tokens of recorded calls", ["tier", "direction"])
COST = Counter("cascade_cost_usd", "cost of recorded calls", ["tier"])
JOB_COST = Counter("cascade_job_cost_usd", "total cost of finished jobs, by the tier that finished them", ["tier"])
DB_STATEMENTS = Counter("cascade_db_statements", "SQL statements this process sent to the database, by their "
                        "first word (an executemany counts once)", ["kind"])
SIGNAL_MISSING = Counter("cascade_signal_missing", "policy decisions taken without a signal the policy reads "
                         "at that tier (the answer lacked it: a server without token log-probs, say)",
                         ["tier", "signal"])
TOP_COST = Counter("cascade_top_tier_cost_usd",
                   "what the same finished jobs would have cost calling only the top tier", ["tier"])


def observe_stage(tier: str, applied: Sequence[StageOutcome]) -> None:
    """Count the outcomes one stage transaction applied (summed first: a bulk stage of
    a thousand jobs moves each counter once, not a thousand times)."""
    if not applied:
        return
    decisions: dict[str, int] = {}
    missing: dict[str, int] = {}
    failures = tokens_in = tokens_out = 0
    cost = job_cost = top_cost = 0.0
    latency = LATENCY.labels(tier)
    for o in applied:
        a = o.attempt
        decisions[o.decision] = decisions.get(o.decision, 0) + 1
        for signal in o.meta.get("missing_signals") or ():  # set by the stage (worker.queue.stage)
            missing[signal] = missing.get(signal, 0) + 1
        failures += a.error is not None
        if a.latency_ms is not None:
            latency.observe(a.latency_ms / 1000)
        tokens_in += a.tokens_in or 0
        tokens_out += a.tokens_out or 0
        cost += a.cost_usd
        if o.decision != "escalate":
            job_cost += o.total_cost
            top_cost += o.top_tier_cost
    CALLS.labels(tier).inc(len(applied))
    for decision, n in decisions.items():
        DECISIONS.labels(tier, decision).inc(n)
    for signal, n in missing.items():
        SIGNAL_MISSING.labels(tier, signal).inc(n)
    if failures:
        FAILURES.labels(tier).inc(failures)
    if tokens_in:
        TOKENS.labels(tier, "in").inc(tokens_in)
    if tokens_out:
        TOKENS.labels(tier, "out").inc(tokens_out)
    COST.labels(tier).inc(cost)
    if len(applied) > decisions.get("escalate", 0):  # some became final
        JOB_COST.labels(tier).inc(job_cost)
        TOP_COST.labels(tier).inc(top_cost)


_statement_counters: dict[str, Any] = {}


def count_statement(statement: str) -> None:
    """Count one statement sent to the database (cascade_db_statements_total{kind}): what a
    stage costs the database, read off a running worker (worker.store hooks it in)."""
    kind = statement.lstrip()[:6].upper().rstrip()
    c = _statement_counters.get(kind)
    if c is None:
        c = _statement_counters[kind] = DB_STATEMENTS.labels(kind)
    c.inc()


class QueueCollector(Collector):
    """Depth and oldest-message age of the watched queues, read from Redis per scrape."""

    def __init__(self, broker_url: str, prefix: str):
        self.client = redis.Redis.from_url(broker_url, socket_timeout=2, socket_connect_timeout=2)
        self.prefix = prefix
        self.queues: dict[str, str] = {}  # queue -> tier

    def watch(self, tier: str, queue: str) -> None:
        self.queues[queue] = tier

    def collect(self) -> Iterable[GaugeMetricFamily]:
        depth = GaugeMetricFamily("cascade_queue_depth", "messages waiting in a tier's queue", labels=["tier", "queue"])
        age = GaugeMetricFamily("cascade_queue_oldest_age_seconds", "age of the oldest waiting message (0 if none)",
                                labels=["tier", "queue"])
        now = time.time()
        for queue, tier in sorted(self.queues.items()):
            key = self.prefix + queue
            try:
                n = self.client.llen(key)
                oldest = self.client.lindex(key, -1) if n else None  # kombu pushes left, pops right
            except redis.RedisError as e:
                log.warning("metrics.queue_unreadable", queue=queue, error=str(e))
                continue
            depth.add_metric([tier, queue], n)
            age.add_metric([tier, queue], max(0.0, now - sent_at(oldest)) if oldest else 0.0)
        yield depth
        yield age


def sent_at(raw: bytes) -> float:
    try:
        return float(json.loads(raw)["headers"]["sent_at"])
    except (ValueError, KeyError, TypeError):
        return time.time()  # a message sent without the header (another sender): age unknown, shown as 0


_queues: QueueCollector | None = None
_lock = threading.Lock()


def watch_queues(broker_url: str, prefix: str, tiers: Iterable[tuple[str, str]]) -> None:
    """Report these (tier, queue) pairs' depth and age (Redis brokers only)."""
    global _queues
    if not broker_url.startswith(("redis://", "rediss://", "unix://")):
        return
    with _lock:
        if _queues is None:
            _queues = QueueCollector(broker_url, prefix)
            REGISTRY.register(_queues)
        for tier, queue in tiers:
            _queues.watch(tier, queue)


def asgi_app():
    """The /metrics endpoint for an ASGI server (the API mounts it)."""
    return make_asgi_app(REGISTRY)


def serve(port: int, host: str = "0.0.0.0", health: Callable[[], tuple[bool, str]] | None = None) -> ThreadingHTTPServer:
    """Serve /metrics (and /healthz when `health` is given) from a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the http.server API)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
            elif path == "/healthz" and health is not None:
                ok, why = health()
                self._send(200 if ok else 503, (why + "\n").encode(), "text/plain; charset=utf-8")
            else:
                self._send(404, b"not found: /metrics, /healthz\n", "text/plain; charset=utf-8")

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # scrapes every few seconds: not worth a log line each
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
