"""The lean publisher (worker.queue.publish) on real Redis: the message it writes is
the one Celery's send_task writes for the same call, field by field (only the
random parts differ: task id, delivery tag, send time), on the same Redis list; sent
from inside a task a worker runs (a stage escalating) it names that task as parent
and root, as Celery does, and a worker consumes it; and a broker restarted empty
mid-run costs no message and gets its queue declared again. That `cascade worker`
consumes these messages is shown by the pipeline tests (tests/pipeline), whose
stages are sent this way."""
from __future__ import annotations

import base64
import json
import re
import threading
import time

import pytest
import redis
from celery.contrib.testing.worker import start_worker
from helpers.env import REDIS

from worker.bench.faults import OwnRedis
from worker.config.settings import Settings
from worker.ops.metrics import sent_at
from worker.queue.app import base_app
from worker.queue.dispatch import STAGE_TASK, Dispatcher, stage_repr

pytestmark = pytest.mark.services

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def app_for(prefix: str, broker: str = REDIS):
    return base_app(Settings(broker_url=broker, redis_prefix=prefix))


def refuse(*args, **kwargs):
    raise AssertionError("send_task called: the lean publisher should have sent this message")


def decoded(raw: bytes) -> dict:
    """A message as the Redis list holds it, its body decoded, its random parts checked and taken out."""
    m = json.loads(raw)
    assert m["properties"]["body_encoding"] == "base64" and m["content-type"] == "application/json"
    m["body"] = json.loads(base64.b64decode(m["body"]))
    h, p = m["headers"], m["properties"]
    task_id = h.pop("id")
    assert p.pop("correlation_id") == task_id
    assert UUID.match(p.pop("delivery_tag"))
    assert abs(h.pop("sent_at") - time.time()) < 60
    m["task_id"] = task_id
    return m


def the_same_but_ids(kombu: dict, lean: dict) -> None:
    kombu, lean = dict(kombu), dict(lean)
    k_id, l_id = kombu.pop("task_id"), lean.pop("task_id")
    assert k_id != l_id
    for m, tid in ((kombu, k_id), (lean, l_id)):
        if m["headers"]["root_id"] == tid:  # sent from outside a task: its own root
            m["headers"]["root_id"] = "<own id>"
    assert lean == kombu


def the_same_text(kombu_raw: bytes, lean_raw: bytes) -> None:
    """Byte for byte, once the lean message's random parts are kombu's: what the lean
    publisher writes is what kombu's JSON encoder writes, in the same order."""
    k, m = json.loads(kombu_raw), json.loads(lean_raw)
    text = lean_raw.decode()
    for ours, theirs in ((json.dumps(m["headers"]["id"]), json.dumps(k["headers"]["id"])),
                         (m["properties"]["delivery_tag"], k["properties"]["delivery_tag"]),
                         (f'"sent_at": {m["headers"]["sent_at"]!r}', f'"sent_at": {k["headers"]["sent_at"]!r}')):
        assert ours in text
        text = text.replace(ours, theirs)
    assert text == kombu_raw.decode()


@pytest.mark.parametrize("queue, job_ids", [
    ("cascade.t0.interactive", ["job:1"]),
    ("cascade.t0", ["b:1", "b:2", "b:3"]),
    ("cascade.t2.interactive", ["köln:ß", 'quote"back\\slash', "\u2603"]),  # JSON escapes, as kombu writes them
    ("cascade.t1", [f"batch-{i:04d}" for i in range(1000)]),  # the largest chunk
])
def test_a_lean_message_is_the_one_send_task_writes(redis_prefix, monkeypatch, queue, job_ids):
    app = app_for(redis_prefix)
    d = Dispatcher(app, 1000)
    assert d.lean is not None
    d.send_one("t0", queue, job_ids)  # the queue's first message: send_task, which declares it
    monkeypatch.setattr(app, "send_task", refuse)
    d.send_one("t0", queue, job_ids)
    r = redis.Redis.from_url(REDIS)
    raw = r.lrange(redis_prefix + queue, 0, -1)  # LPUSH: the newest first
    assert len(raw) == 2
    lean, kombu = decoded(raw[0]), decoded(raw[1])
    the_same_but_ids(kombu, lean)
    the_same_text(raw[1], raw[0])
    # what the stage task and Flower read, spelt out
    assert lean["headers"]["task"] == STAGE_TASK and lean["body"][0] == ["t0", job_ids]
    assert lean["headers"]["argsrepr"] == lean["properties"]["argsrepr"] == stage_repr("t0", job_ids)
    assert lean["properties"]["delivery_info"] == {"exchange": "", "routing_key": queue}
    assert lean["properties"]["priority"] == 0 and lean["properties"]["delivery_mode"] == 2
    assert sent_at(raw[0]) <= time.time()  # the queue-age metric reads the header
    # the list has no priority suffix, and the queue's binding is kombu's, as a worker and Flower see it
    assert sorted(k.decode() for k in r.keys(redis_prefix + "*")) == sorted([
        redis_prefix + queue, f"{redis_prefix}_kombu.binding.{queue}", f"{redis_prefix}_kombu.binding_permanent.{queue}"])


def test_an_escalation_names_the_running_task_as_parent_and_is_consumed(redis_prefix, monkeypatch):
    """A real worker (Celery's test worker, in a thread, on the real Redis) runs a task that
    sends two stage messages as an escalating stage does: the first through send_task, the
    second lean. Both name the running task as parent and root; then a worker consumes
    the lean one."""
    app = app_for(redis_prefix)
    sink = "cascade.tsink"
    d = Dispatcher(app, 16)
    consumed: list = []

    @app.task(name="probe.escalate", bind=True, shared=False)
    def escalate(self, job_ids):
        d.send_one("t1", sink, job_ids)
        d.send_one("t1", sink, job_ids)
        return self.request.id

    @app.task(name=STAGE_TASK, bind=True, shared=False)
    def stage(self, tier, job_ids):
        consumed.append((tier, job_ids, self.request.parent_id, self.request.root_id, self.request.sent_at))

    app.conf.task_default_queue = "cascade.tprobe"
    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
        parent = app.send_task("probe.escalate", args=[["e:1", "e:2"]], queue="cascade.tprobe").id
        r = redis.Redis.from_url(REDIS)
        deadline = time.monotonic() + 30
        while r.llen(redis_prefix + sink) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    raw = r.lrange(redis_prefix + sink, 0, -1)
    assert len(raw) == 2, raw
    lean, kombu = decoded(raw[0]), decoded(raw[1])
    for m in (lean, kombu):
        assert m["headers"]["parent_id"] == parent and m["headers"]["root_id"] == parent
    assert d.lean.ready(sink)  # the second one was lean
    the_same_but_ids(kombu, lean)
    the_same_text(raw[1], raw[0])

    # a worker of the sink queue runs the lean message (the newest: the first popped is the oldest)
    r.lpop(redis_prefix + sink)  # drop it and keep the lean one
    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10, queues=[sink]):
        deadline = time.monotonic() + 30
        while not consumed and time.monotonic() < deadline:
            time.sleep(0.05)
    assert len(consumed) == 1
    tier, job_ids, parent_id, root_id, sent = consumed[0]
    assert (tier, job_ids, parent_id, root_id) == ("t1", ["e:1", "e:2"], parent, parent)
    assert abs(sent - time.time()) < 60


def test_a_broker_restarted_empty_loses_no_message(tmp_path, monkeypatch):
    """Redis stopped with messages sent lean, restarted empty while a send waits: the send
    goes through once it is back (send_task's retries), declares the queue again (its
    binding, which a restart without persistence lost), and the sends after it are lean again."""
    own = OwnRedis(tmp_path, "pw")
    own.start()
    try:
        broker = f"redis://cascade:pw@127.0.0.1:{own.port}/0"
        app = app_for("lean:", broker)
        d = Dispatcher(app, 16, publish_wait=60)
        q = "cascade.t0.interactive"
        d.send_one("t0", q, ["a:1"])
        d.send_one("t0", q, ["a:2"])
        assert d.lean.ready(q)
        own.stop()
        own.wipe()
        threading.Timer(2.0, own.start).start()
        d.send_one("t0", q, ["a:3"])  # fails lean, waits in send_task for the broker
        assert d.lean.ready(q)
        monkeypatch.setattr(app, "send_task", refuse)
        d.send_one("t0", q, ["a:4"])
        d.send_one("t0", q, ["a:5"])
        c = own.client()
        got = [json.loads(base64.b64decode(json.loads(m)["body"]))[0][1] for m in c.lrange(f"lean:{q}", 0, -1)]
        assert got == [["a:5"], ["a:4"], ["a:3"]]  # a:1 and a:2 were lost with the data, as with any sender
        assert c.smembers(f"lean:_kombu.binding.{q}") == {f"{q}\x06\x16\x06\x16{q}".encode()}
    finally:
        own.stop()
