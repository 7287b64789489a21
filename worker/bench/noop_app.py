"""The benchmark's baseline: a Celery app with one no-op task, kept apart from the
production app so tier workers never run it. `cascade bench pipeline` starts a
worker on it (`celery -A worker.bench.noop_app:app`) to measure Celery's own
per-message cost on the same broker, in the same run."""
from __future__ import annotations

import redis
from celery import Celery

from worker.config.settings import Settings, get_settings
from worker.queue.app import base_app, without_builtin_tasks

NOOP_TASK = "cascade.bench.noop"
NOOP_QUEUE = "cascade.bench.noop"


def make_noop_app(settings: Settings) -> Celery:
    app = base_app(settings, "cascade-bench")
    clients: list[redis.Redis] = []  # made on first use: the broker may not be Redis where this is imported

    @app.task(name=NOOP_TASK, shared=False, ignore_result=True)
    def noop(counter_key: str) -> None:
        if not counter_key.startswith(noop_key_prefix(settings)):
            return  # never a key of someone else's: the broker is not a way to write Redis
        if not clients:
            clients.append(redis.Redis.from_url(settings.broker))
        clients[0].incr(counter_key)

    without_builtin_tasks(app)
    return app


def noop_key_prefix(settings: Settings) -> str:
    return f"{settings.redis_prefix}bench-noop-"


app = make_noop_app(get_settings())
