"""Liveness that proves consumption: a worker process can stay alive while its
consumer has stopped (cancelled, or a broker reconnect gone wrong), and a
process check or a ping (answered by another consumer) would not notice.

Each tier worker also consumes a queue of its own, `<tier queue>.canary.<node>`,
and a thread of the worker sends a canary task there every `canary_interval`
seconds. The same consumer that takes stage messages takes the canary (Redis
alternates between a worker's queues), so the time since the last canary was
consumed says whether this worker consumes at all. It is a metric
(`cascade_canary_age_seconds{tier}`, `cascade_canary_latency_seconds{tier}`) and
the `/healthz` answer (503 past `canary_max_age`, which must exceed the longest
stage: a worker busy with one long stage takes its canary only after it).
"""
from __future__ import annotations

import threading
import time

import structlog
from celery import Celery
from prometheus_client import Gauge

log = structlog.get_logger("cascade.canary")

CANARY_TASK = "cascade.canary"

AGE = Gauge("cascade_canary_age_seconds", "seconds since this worker last consumed its canary "
            "(since it started, if never)", ["tier"])
LATENCY = Gauge("cascade_canary_latency_seconds", "send-to-consume time of the last canary", ["tier"])
CONSUMED = Gauge("cascade_canary_last_consumed_timestamp_seconds", "when the last canary was consumed", ["tier"])

_canaries: dict[str, "Canary"] = {}


def canary_queue(tier_queue: str, node: str) -> str:
    return f"{tier_queue}.canary.{node}"


class Canary(threading.Thread):
    def __init__(self, app: Celery, tier: str, queue: str, *, interval: float, max_age: float):
        super().__init__(name=f"canary-{tier}", daemon=True)
        self.app, self.tier, self.queue = app, tier, queue
        self.interval, self.max_age = interval, max_age
        self.started = time.time()
        self.last: float | None = None
        _canaries[tier] = self
        AGE.labels(tier).set_function(self.age)

    def run(self) -> None:
        while True:  # a daemon thread: it ends with the worker process
            try:
                # expires: a canary older than two intervals proves nothing; the consumer drops it
                self.app.send_task(CANARY_TASK, args=[self.tier, time.time()], queue=self.queue,
                                   routing_key=self.queue, expires=2 * self.interval)
            except Exception as e:  # the broker is away: the canary's age grows, which is the point
                log.warning("canary.send_failed", tier=self.tier, error=str(e))
            time.sleep(self.interval)

    def consumed(self, sent_at: float) -> None:
        self.last = time.time()
        LATENCY.labels(self.tier).set(max(0.0, self.last - sent_at))
        CONSUMED.labels(self.tier).set(self.last)

    def age(self) -> float:
        return time.time() - (self.last if self.last is not None else self.started)

    def health(self) -> tuple[bool, str]:
        age = self.age()
        if age <= self.max_age:
            return True, f"ok: tier {self.tier} consumed its canary {age:.1f}s ago"
        return False, (f"not consuming: tier {self.tier}'s last canary was consumed {age:.0f}s ago "
                       f"(limit {self.max_age:.0f}s)")


def consumed(tier: str, sent_at: float) -> None:
    """Called by the canary task in the worker that consumed it."""
    c = _canaries.get(tier)
    if c is not None:
        c.consumed(sent_at)
