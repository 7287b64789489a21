"""A lean publisher of stage messages on a Redis broker: the message kombu's Redis
transport writes for `app.send_task(name, args=..., queue=q, routing_key=q, task_id=...,
headers=..., argsrepr=...)`, written with one LPUSH on a pooled redis-py connection.

Why: a send through Celery and kombu costs about 1.8 ms here, most of it Python
(routing, the task message, maybe_declare, the exchange's binding lookup, a new
Redis client object per put) for what ends as one LPUSH; a stage message is sent at
every submission and every escalation, on the interactive path.

What stays kombu's: declaring a queue (its exchange and binding in Redis, which Flower
and `cascade status` read) and every retry. A queue is written to here only after a
`send_task` to it went through in this process; after any error the publisher forgets
every queue, so the next send to each goes through `send_task` again and declares
again, as kombu does after a reconnect (worker.queue.dispatch.Dispatcher.send_one).

The message is Celery's task protocol v2, field for field as Celery 5 and kombu 5
write it for that call (tests/worker/test_lean_publish.py compares the two on a real
Redis, and a real worker consumes it in the pipeline tests): headers (task, id,
root_id/parent_id from the task being run, argsrepr, kwargsrepr, origin, ...; then
ours, sent_at), properties (correlation_id, reply_to, argsrepr, delivery_mode 2,
delivery_info with the anonymous exchange and the queue as routing key, priority 0,
body_encoding base64, a random delivery_tag), a base64 JSON body. Priority 0 means
no priority suffix on the list's key, which is the transport's global key prefix and
the queue's name.
"""
from __future__ import annotations

import base64
import json
import os
import threading
import uuid
from typing import Any, Callable, Sequence

import redis
import structlog
from celery import Celery, signals
from celery.utils.nodenames import anon_nodename
from kombu.transport import redis as kombu_redis

log = structlog.get_logger("cascade.dispatch")

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
# what a failed LPUSH raises; kombu raises them as OperationalError, which send_one retries
ERRORS: tuple[type[BaseException], ...] = (redis.exceptions.RedisError, OSError)

_dumps = json.dumps  # kombu's JSON encoder writes the same text for str, int, float, None, list and dict
_q: Callable[[str], str] = json.encoder.encode_basestring_ascii  # a str as json.dumps writes it (ensure_ascii)


def _json(v: Any) -> str:
    return _q(v) if type(v) is str else _dumps(v)

_b64 = base64.b64encode
_BODY_END = ', {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]'

# origin is "gen<pid>@<host>": worked out once per process, again in a forked child
_origin: list[str | None] = [None]
os.register_at_fork(after_in_child=lambda: _origin.__setitem__(0, None))


def _origin_now() -> str:
    o = _origin[0]
    if o is None:
        o = _origin[0] = anon_nodename()
    return o


def usable(app: Celery) -> bool:
    """Whether this app's stage messages may go through the lean publisher: a Redis
    broker, and nothing configured that changes what send_task writes for them."""
    conf = app.conf
    return (str(conf.broker_url or "").startswith(REDIS_SCHEMES) and not conf.task_routes
            and not conf.task_inherit_parent_priority and not conf.task_compression
            and conf.task_serializer == "json" and conf.task_protocol == 2
            and conf.task_default_delivery_mode in (2, "persistent") and not conf.task_send_sent_event)


class RedisPublisher:
    def __init__(self, app: Celery):
        self.app = app
        self._lock = threading.Lock()
        self._client: redis.Redis | None = None
        self._prefix = ""
        # queues this process sent to through send_task (which declared them) since the last error
        self._declared: set[str] = set()

    def ready(self, queue: str) -> bool:
        # a receiver of Celery's publish signals (Sentry's integration, say) would miss a lean send
        return (queue in self._declared and not signals.before_task_publish.receivers
                and not signals.after_task_publish.receivers)

    def declared(self, queue: str) -> None:
        """After a send_task to `queue` went through: later sends to it may be lean.
        Never raises: the message is sent, and a failure here only leaves the next one to send_task."""
        if self._client is None:
            try:
                with self._lock:
                    if self._client is None and not self._connect():
                        return
            except Exception as e:  # noqa: BLE001 - the broker went away since the send: send_task again next time
                log.info("dispatch.lean_unavailable", error=str(e)[:200])
                return
        self._declared.add(queue)

    def forget(self) -> None:
        self._declared = set()

    def _connect(self) -> bool:
        # kombu's own connection settings (host, db, TLS, credentials, socket and health-check
        # timeouts, the key prefix), read from the channel that has just sent
        with self.app.producer_or_acquire() as producer:
            channel = producer.channel
            if type(channel) is not kombu_redis.Channel:  # Sentinel, or a transport of another kind
                return False
            source = channel.pool
            self._prefix = channel.global_keyprefix or ""
        # redis-py's default cap (100), not kombu's 10: a pool refuses a connection over its cap
        # rather than wait, and a worker's threads or a service's requests may send at once
        pool = redis.ConnectionPool(connection_class=source.connection_class, **source.connection_kwargs)
        self._client = redis.Redis(connection_pool=pool)
        return True

    def message(self, name: str, task_id: str, args: Sequence[Any], queue: str, argsrepr: str,
                sent_at: float) -> str:
        parent = self.app.current_worker_task  # a stage escalating: Celery names its task as parent and root
        if parent is not None:
            parent_id = _json(parent.request.id)
            root_id = _json(parent.request.root_id or parent.request.id)
        else:
            parent_id, root_id = "null", _q(task_id)
        tid, rep = _q(task_id), _q(argsrepr)
        body = _b64(("[" + _dumps(args) + _BODY_END).encode()).decode()
        # the text json.dumps writes for kombu's dict, in its order (test_lean_publish compares the two)
        return "".join((
            '{"body": "', body, '", "content-encoding": "utf-8", "content-type": "application/json", '
            '"headers": {"lang": "py", "task": ', _q(name), ', "id": ', tid, ', "shadow": null, "eta": null, '
            '"expires": null, "group": null, "group_index": null, "retries": 0, "timelimit": [null, null], '
            '"root_id": ', root_id, ', "parent_id": ', parent_id, ', "argsrepr": ', rep, ', "kwargsrepr": "{}", '
            '"origin": ', _q(_origin_now()), ', "ignore_result": null, "replaced_task_nesting": 0, '
            '"stamped_headers": null, "stamps": {}, "sent_at": ', float.__repr__(sent_at), '}, '
            '"properties": {"correlation_id": ', tid, ', "reply_to": ', _q(self.app.thread_oid), ', "argsrepr": ',
            rep, ', "delivery_mode": 2, "delivery_info": {"exchange": "", "routing_key": ', _q(queue), '}, '
            '"priority": 0, "body_encoding": "base64", "delivery_tag": "', str(uuid.uuid4()), '"}}'))

    def send(self, name: str, task_id: str, args: Sequence[Any], queue: str, argsrepr: str,
             sent_at: float) -> None:
        client = self._client
        assert client is not None
        client.lpush(self._prefix + queue, self.message(name, task_id, args, queue, argsrepr, sent_at))
