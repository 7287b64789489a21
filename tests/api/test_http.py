"""The HTTP service against real Redis, PostgreSQL and a worker process per replay
tier: the official `openai` client round trip (streaming too), jobs with idempotency
keys, bad input refused with the field named and nothing written, OpenAI batch files
in and out, webhooks, priorities, and schemathesis against /openapi.json."""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import openai
import pytest
import redis
from helpers.api import Serve
from helpers.env import REDIS, REPO, private_database, private_redis_prefix
from helpers.portfolios import write_portfolio
from helpers.workers import Workers
from sqlalchemy import func, select

from router.core.records import load_dataset
from worker.config.settings import Settings
from worker.ops.migrate import upgrade
from worker.service.tenants import Tenants
from worker.store.engine import engine_for
from worker.store.schema import attempts, batches, jobs
from worker.store.tenants import TenantStore

pytestmark = pytest.mark.services
MODELS = ["llama3.2-3b", "llama3.1-70b"]
FINAL = ("completed", "failed", "cancelled", "expired")  # OpenAI's batch statuses that no longer change


@dataclass
class Deployment:
    settings: Settings
    serve: Serve
    workers: Workers
    env: dict
    keys: dict  # tenant -> API key
    portfolio: Path

    @property
    def url(self) -> str:
        return self.serve.url

    def http(self, tenant: str = "a", **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 60),
                            headers={"Authorization": f"Bearer {self.keys[tenant]}"}, **kw)

    def logs(self) -> str:
        return f"--- serve\n{self.serve.output()}\n{self.workers.logs()}"


@pytest.fixture(scope="module")
def deployment(bench, tmp_path_factory):
    """One running deployment for the module: a private PostgreSQL database and Redis
    prefix, a `cascade worker` process per replay tier, and `cascade serve`."""
    tmp = tmp_path_factory.mktemp("api")
    with private_database() as pg_url, private_redis_prefix() as prefix:
        upgrade(pg_url)
        env = {"CASCADE_BROKER_URL": REDIS, "CASCADE_DATABASE_URL": pg_url, "CASCADE_REDIS_PREFIX": prefix,
               "CASCADE_HOME": str(tmp / "home"), "CASCADE_VISIBILITY_TIMEOUT": "10",
               "CASCADE_WEBHOOK_SECRET": "s3cret", "CASCADE_WEBHOOK_BACKOFF": "0.2"}
        path = write_portfolio(tmp / "p.toml", bench, MODELS, [-0.3])
        w = Workers(env, path, tmp)
        for t in ("t0", "t1"):
            w.start(t)
        settings = Settings(broker_url=REDIS, database_url=pg_url, redis_prefix=prefix)
        tenants = Tenants(TenantStore(pg_url), settings)
        keys = {t: tenants.create_key(t)[1] for t in ("a", "b", "poor", "busy", "thrifty", "rival")}
        tenants.store.upsert_tenant("busy", rate_per_min=1)
        tenants.store.upsert_tenant("thrifty", budget_usd=0.001)
        tenants.store.upsert_tenant("rival", budget_usd=0.001)
        tenants.close()
        serve = Serve(env, path, tmp / "serve.log")
        try:
            yield Deployment(settings, serve.wait_ready(), w, env, keys, path)
        finally:
            serve.stop()
            w.stop_all()


def rows(bench, n, split="test"):
    return load_dataset(bench / "rc-mmlu.jsonl.gz").split(split)[:n]


def recorded(bench, prompt, model="llama3.2-3b"):
    r = next(r for r in load_dataset(bench / "rc-mmlu.jsonl.gz").records if r.prompt == prompt)
    return r.responses[model].text


def count(d, table, *where) -> int:
    with engine_for(d.settings.db_url).connect() as c:
        return c.execute(select(func.count()).select_from(table).where(*where)).scalar()


def test_openai_client_round_trip_and_streaming(bench, deployment):
    d = deployment
    client = openai.OpenAI(base_url=f"{d.url}/v1", api_key=d.keys["a"], max_retries=0)
    assert "cascade/default" in [m.id for m in client.models.list()]
    prompt = rows(bench, 1)[0].prompt
    r = client.chat.completions.create(model="cascade/default", messages=[{"role": "user", "content": prompt}])
    ext = r.model_extra["cascade"]
    assert r.choices[0].message.content == recorded(bench, prompt, {"t0": "llama3.2-3b", "t1": "llama3.1-70b"}[ext["tier"]])
    assert ext["status"] == "succeeded" and ext["attempts"][-1]["decision"] == "accept"
    assert ext["cost_usd"] == pytest.approx(sum(a["cost_usd"] for a in ext["attempts"]))
    stream = client.chat.completions.create(model="cascade/default", stream=True,
                                            messages=[{"role": "user", "content": prompt}])
    parts = list(stream)
    assert "".join(p.choices[0].delta.content or "" for p in parts) == r.choices[0].message.content
    assert parts[-1].choices[0].finish_reason == "stop" and parts[-1].model_extra["cascade"]["tier"] == ext["tier"]
    with pytest.raises(openai.NotFoundError, match="unknown portfolio 'cascade/nope'"):
        client.chat.completions.create(model="cascade/nope", messages=[{"role": "user", "content": prompt}])
    with pytest.raises(openai.BadRequestError, match="temperature: tier 't0'"):
        client.chat.completions.create(model="cascade/default", temperature=0.5,
                                       messages=[{"role": "user", "content": prompt}])


def test_jobs_idempotency_key_returns_the_same_job_with_one_set_of_attempts(bench, deployment):
    d = deployment
    prompt = rows(bench, 2)[1].prompt
    with d.http() as h:
        first = h.post("/v1/jobs", json={"prompt": prompt, "metadata": {"order": 7}}, headers={"Idempotency-Key": "k1"})
        assert first.status_code == 202 and first.headers["Location"] == f"/v1/jobs/{first.json()['id']}"
        job_id = first.json()["id"]
        done = h.get(f"/v1/jobs/{job_id}", params={"wait": 30}).json()
        assert done["status"] == "succeeded" and done["answer"] and done["metadata"] == {"order": 7}
        assert all({"signals", "decision", "reason"} <= set(a) for a in done["attempts"])
        again = h.post("/v1/jobs", json={"prompt": prompt, "metadata": {"order": 7}}, headers={"Idempotency-Key": "k1"})
        assert again.status_code == 200 and again.json()["id"] == job_id
        assert count(d, attempts, attempts.c.job_id == job_id) == len(done["attempts"])
        clash = h.post("/v1/jobs", json={"prompt": "something else"}, headers={"Idempotency-Key": "k1"})
        assert clash.status_code == 409 and clash.json()["error"]["param"] == "Idempotency-Key"
        assert h.get("/v1/jobs/job-nope").status_code == 404


@pytest.mark.parametrize("body, status, param", [
    (b'{"prompt": "hi"', 422, "body"),
    (json.dumps({"prompt": 5}).encode(), 422, "prompt"),
    (json.dumps({"prompt": "x" * 200_001}).encode(), 400, "prompt"),
    (json.dumps({"prompt": "a\u0000b"}).encode(), 400, "prompt"),
    (json.dumps({"prompt": "hi", "portfolio": "cascade/nope"}).encode(), 404, "model"),
    (json.dumps({"prompt": "hi", "params": {"temperature": "warm"}}).encode(), 422, "params.temperature"),
    (json.dumps({"prompt": "hi", "params": {"max_tokens": 3}}).encode(), 400, "params.max_tokens"),
    (json.dumps({"messages": [{"role": "user", "content": "a\u0000"}]}).encode(), 400, "messages[0].content"),
    (json.dumps({"prompt": "hi", "metadata": {"k": "\u0000"}}).encode(), 400, "metadata.k"),
    (json.dumps({"prompt": "hi", "colour": "red"}).encode(), 422, "colour"),
    # issue #23: text PostgreSQL cannot store (a lone surrogate) is refused naming the field, as NUL is
    (json.dumps({"prompt": "hi", "metadata": {"k": "\ud800"}}).encode(), 400, "metadata.k"),
    (json.dumps({"prompt": "a\ud800b"}).encode(), 400, "prompt"),
    (json.dumps({"messages": [{"role": "user", "content": "\ud800"}]}).encode(), 400, "messages[0].content"),
    # issue #23: a body that cannot be parsed is a 422 in the OpenAI shape, whatever the reason
    (b'{"prompt": "caf\xe9"}', 422, "body"),                                   # not UTF-8
    (b'{"prompt": "hi", "metadata": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 422, "body"),  # nesting
    (b'{"prompt": "hi", "metadata": {"n": ' + b"9" * 5000 + b"}}", 422, "body"),  # an integer too large
])
def test_bad_input_is_a_4xx_naming_the_field_and_writes_nothing(deployment, body, status, param):
    d = deployment
    before = count(d, jobs), count(d, batches)
    with d.http() as h:
        r = h.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param, r.text
    assert (count(d, jobs), count(d, batches)) == before


@pytest.mark.parametrize("query, status, param", [
    ({"completion_window": "forever"}, 400, "completion_window"),
    ({"model": "cascade/nope"}, 404, "model"),
    ({"webhook_url": "ftp://x"}, 422, "webhook_url"),
])
def test_bad_batch_options_are_refused_before_anything_is_written(deployment, query, status, param):
    d = deployment
    before = count(d, jobs), count(d, batches)
    with d.http() as h:
        r = h.post("/v1/batches", params=query, content=b'{"prompt": "hi"}\n')
    assert (r.status_code, r.json()["error"]["param"]) == (status, param), r.text
    assert (count(d, jobs), count(d, batches)) == before


def test_openai_batch_file_in_results_and_errors_out(bench, deployment):
    d = deployment
    rs = rows(bench, 6)
    lines = [json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": "cascade/default", "messages": [{"role": "user", "content": r.prompt}]}})
             for i, r in enumerate(rs)]
    lines.insert(2, "[1, 2]")  # not an object
    lines.insert(3, json.dumps({"custom_id": "hot", "method": "POST", "url": "/v1/chat/completions",
                                "body": {"model": "cascade/default", "temperature": 1.0,
                                         "messages": [{"role": "user", "content": rs[0].prompt}]}}))
    lines.insert(4, json.dumps({"custom_id": "other", "method": "POST", "url": "/v1/chat/completions",
                                "body": {"model": "cascade/other", "messages": [{"role": "user", "content": "x"}]}}))
    with d.http() as h:
        r = h.post("/v1/batches", content=("\n".join(lines) + "\n").encode(),
                   headers={"Content-Type": "application/jsonl"})
        assert r.status_code == 202, r.text
        batch_id = r.json()["id"]
        deadline = time.time() + 60
        while (b := h.get(f"/v1/batches/{batch_id}").json())["status"] not in FINAL and time.time() < deadline:
            time.sleep(0.05)
        assert b["status"] == "completed" and b["request_counts"] == {"total": 9, "completed": 6, "failed": 3}
        assert b["cascade"]["counts"] == {"total": 9, "done": 9, "succeeded": 6, "failed": 3, "cancelled": 0, "open": 0}, b
        assert sum(t["answered"] for t in b["cascade"]["tiers"].values()) == 6 and b["cascade"]["cost_usd"] > 0
        assert sum(t["share"] for t in b["cascade"]["tiers"].values()) == pytest.approx(6 / 9)
        results = [json.loads(x) for x in h.get(f"/v1/batches/{batch_id}/results").text.splitlines()]
        errors = [json.loads(x) for x in h.get(f"/v1/batches/{batch_id}/errors").text.splitlines()]
    assert [x["custom_id"] for x in results] == [f"r{i}" for i in range(6)]
    ok = results[0]
    assert ok["error"] is None and ok["response"]["status_code"] == 200
    assert ok["response"]["body"]["object"] == "chat.completion" and "cascade" in ok["response"]["body"]
    errs = {x["custom_id"]: x["error"]["message"] for x in errors}
    assert errs == {"line-3": "line 3: expected a JSON object, got list",
                    "hot": "line 4: params.temperature: tier 't0' (replay backend) cannot honour it",
                    "other": "line 5: body.model: is 'cascade/other' but this batch runs 'cascade/default'"}
    assert all(x["response"] is None for x in errors)


class Receiver:
    """A webhook receiver that answers 500 twice, then 200; it keeps each event once (by id)."""

    def __init__(self):
        self.calls, self.events = [], {}
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.calls.append((dict(self.headers), body))
                ok = len(outer.calls) > 2
                if ok:
                    outer.events.setdefault(self.headers["Cascade-Event-Id"], json.loads(body))
                self.send_response(200 if ok else 500)
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_webhook_retried_until_accepted_signed_and_deduplicated_by_event_id(bench, deployment):
    d = deployment
    rcv = Receiver()
    body = "\n".join(json.dumps({"id": f"q{i}", "prompt": r.prompt}) for i, r in enumerate(rows(bench, 3)))
    with d.http() as h:
        r = h.post("/v1/batches", params={"webhook_url": rcv.url}, content=body.encode())
        batch_id = r.json()["id"]
        deadline = time.time() + 60
        while len(rcv.events) < 1 and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # a delivered event is not sent again
        assert h.get(f"/v1/batches/{batch_id}").json()["cascade"]["webhook"] == "delivered"
    rcv.server.shutdown()
    assert len(rcv.calls) == 3 and len({c[0]["Cascade-Event-Id"] for c in rcv.calls}) == 1
    (event,) = rcv.events.values()
    assert event["type"] == "batch.completed" and event["data"]["id"] == batch_id
    assert event["data"]["counts"]["succeeded"] == 3
    headers, raw = rcv.calls[-1]
    t, v1 = (p.split("=", 1)[1] for p in headers["Cascade-Signature"].split(","))
    assert v1 == hmac.new(b"s3cret", f"{t}.".encode() + raw, hashlib.sha256).hexdigest()


@pytest.mark.slow
def test_an_interactive_job_finishes_before_a_queued_20000_item_batch(bench, deployment):
    d = deployment
    rs = load_dataset(bench / "rc-mmlu.jsonl.gz").records
    body = "".join(json.dumps({"id": f"b{i}", "prompt": rs[i % len(rs)].prompt}) + "\n" for i in range(20_000))
    with d.http(timeout=300) as h:
        batch_id = h.post("/v1/batches", content=body.encode()).json()["id"]
        job = h.post("/v1/jobs", json={"prompt": rs[0].prompt}).json()["id"]
        done = h.get(f"/v1/jobs/{job}", params={"wait": 60}).json()
        b = h.get(f"/v1/batches/{batch_id}").json()
        h.post(f"/v1/batches/{batch_id}/cancel")
    assert done["status"] == "succeeded"
    assert b["cascade"]["counts"]["open"] > 0, b["cascade"]["counts"]  # the batch was still running when the job was done


@pytest.mark.slow
def test_schemathesis_finds_no_server_error(deployment, tmp_path):
    d = deployment
    st = [sys.executable, "-m", "schemathesis.cli", "run", f"{d.url}/openapi.json", "--checks", "not_a_server_error",
          "-H", f"Authorization: Bearer {d.keys['b']}",
          "--max-examples", "15", "--max-time", "60", "--request-timeout", "30", "--no-color",
          "--generation-deterministic", "--phases", "examples,coverage,fuzzing"]
    r = subprocess.run(st, capture_output=True, text=True, timeout=240, cwd=tmp_path)  # its cache goes there
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:] + d.logs()


# -- issue #23: the bodies schemathesis did not find, as explicit cases ------------------

CHAT_REFUSED = [
    ({"metadata": {"k": "\ud800"}}, "metadata.k"),
    ({"messages": [{"role": "user", "content": "a\ud800"}]}, "messages[0].content"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("extra, param", CHAT_REFUSED)
def test_chat_completion_with_unstorable_text_is_a_400_naming_the_field(deployment, extra, param, stream):
    d = deployment
    before = count(d, jobs), count(d, batches)
    body = {"model": "cascade/default", "messages": [{"role": "user", "content": "hi"}], "stream": stream, **extra}
    with d.http() as h:
        r = h.post("/v1/chat/completions", content=json.dumps(body).encode(),
                   headers={"Content-Type": "application/json"})
    assert (r.status_code, r.json()["error"]["param"]) == (400, param), r.text
    assert "lone surrogate" in r.json()["error"]["message"]
    assert (count(d, jobs), count(d, batches)) == before


def wait_batch(h: httpx.Client, batch_id: str, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while (b := h.get(f"/v1/batches/{batch_id}").json())["status"] not in FINAL and time.time() < deadline:
        time.sleep(0.2)
    return b


def outputs(h: httpx.Client, batch_id: str) -> tuple[list[dict], list[dict]]:
    results = [json.loads(x) for x in h.get(f"/v1/batches/{batch_id}/results").text.splitlines()]
    errors = [json.loads(x) for x in h.get(f"/v1/batches/{batch_id}/errors").text.splitlines()]
    return results, errors


def post_batch(h: httpx.Client, lines: list[bytes | str]) -> httpx.Response:
    body = b"".join((x.encode() if isinstance(x, str) else x) + b"\n" for x in lines)
    return h.post("/v1/batches", content=body, headers={"Content-Type": "application/jsonl"})


def test_a_duplicate_id_in_a_4_line_upload_is_an_error_line_counted_in_the_total(bench, deployment):
    d = deployment
    rs = rows(bench, 4)
    lines = [json.dumps({"id": "q1", "prompt": rs[0].prompt}), json.dumps({"id": "q1", "prompt": rs[1].prompt}),
             json.dumps({"id": "q2", "prompt": rs[2].prompt}), json.dumps({"id": "q3", "prompt": rs[3].prompt})]
    with d.http() as h:
        r = post_batch(h, lines)
        assert r.status_code == 202, r.text
        b = wait_batch(h, r.json()["id"])
        results, errors = outputs(h, b["id"])
    assert b["cascade"]["counts"]["total"] == b["cascade"]["counts"]["done"] == 4, json.dumps(b)
    assert sorted(x["custom_id"] for x in results) == ["q1", "q2", "q3"]
    assert [(x["custom_id"], x["error"]["message"]) for x in errors] == [
        ("line-2", "line 2: id 'q1' already used on line 1")]


def test_an_id_equal_to_another_lines_automatic_key_loses_no_line(bench, deployment):
    d = deployment
    rs = rows(bench, 4)
    lines = [json.dumps({"prompt": rs[0].prompt}), json.dumps({"id": "line-1", "prompt": rs[1].prompt}),
             json.dumps({"prompt": rs[2].prompt}), json.dumps({"id": "line-3", "prompt": rs[3].prompt})]
    with d.http() as h:
        r = post_batch(h, lines)
        assert r.status_code == 202, r.text
        b = wait_batch(h, r.json()["id"])
        results, errors = outputs(h, b["id"])
    assert b["cascade"]["counts"]["total"] == b["cascade"]["counts"]["done"] == 4, json.dumps(b)
    assert errors == []
    # the explicit ids keep them; the lines without an id step aside
    assert [x["custom_id"] for x in results] == ["line-1~2", "line-1", "line-3~2", "line-3"]


def test_duplicates_across_the_chunks_of_an_upload_lose_no_line(bench, deployment):
    d = deployment
    rs = load_dataset(bench / "rc-mmlu.jsonl.gz").records
    lines = [json.dumps({"id": "dup", "prompt": rs[0].prompt})]
    lines += [json.dumps({"id": f"r{i}", "prompt": rs[i].prompt}) for i in range(1, 999)]
    lines += [json.dumps({"prompt": rs[999].prompt})]                       # line 1000: key line-1000
    lines += [json.dumps({"id": "dup", "prompt": rs[1000].prompt}),         # line 1001, the next chunk
              json.dumps({"id": "line-1000", "prompt": rs[1001].prompt}),   # line 1002: line 1000's key
              json.dumps({"prompt": rs[1002].prompt})]                      # line 1003
    with d.http(timeout=300) as h:
        r = post_batch(h, lines)
        assert r.status_code == 202, r.text
        b = wait_batch(h, r.json()["id"], timeout=300)
        results, errors = outputs(h, b["id"])
    assert b["cascade"]["counts"]["total"] == b["cascade"]["counts"]["done"] == 1003, b
    assert len(results) + len(errors) == 1003
    assert len({x["custom_id"] for x in results + errors}) == 1003
    errs = {x["custom_id"]: x["error"]["message"] for x in errors if "already used" in x["error"]["message"]}
    assert errs == {"line-1001": "line 1001: id 'dup' already used on line 1",
                    "line-1002": "line 1002: id 'line-1000' already used on line 1000"}


def test_lines_that_cannot_be_parsed_fail_alone_and_no_upload_answers_500(bench, deployment):
    d = deployment
    rs = rows(bench, 2)
    lines = [json.dumps({"id": "ok1", "prompt": rs[0].prompt}),
             b'{"id": "deep", "prompt": "x", "deep": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # line 2
             b'{"id": "latin1", "prompt": "caf\xe9"}',                                        # line 3
             b'{"id": "big", "prompt": "x", "n": ' + b"9" * 5000 + b"}",                      # line 4
             b'{"id": "nan", "prompt": "x", "n": NaN}',                                       # line 5
             json.dumps({"id": "long", "prompt": "x" * (2 << 20)}),                           # line 6: 2 MiB
             json.dumps({"id": "sur", "prompt": "x", "note": "\ud800"}),                      # line 7
             json.dumps({"id": "ok2", "prompt": rs[1].prompt})]
    with d.http() as h:
        before = count(d, batches)
        r = post_batch(h, lines)
        assert r.status_code == 202, r.text
        b = wait_batch(h, r.json()["id"])
        results, errors = outputs(h, b["id"])
    assert count(d, batches) == before + 1
    assert b["cascade"]["counts"]["total"] == b["cascade"]["counts"]["done"] == 8 and b["cascade"]["counts"]["succeeded"] == 2, b
    assert sorted(x["custom_id"] for x in results) == ["ok1", "ok2"]
    msg = {x["custom_id"]: x["error"]["message"] for x in errors}
    assert msg["line-2"] == "line 2: nested deeper than 64 levels"
    assert msg["line-3"].startswith("line 3: not valid UTF-8")
    assert msg["line-4"].startswith("line 4: not valid JSON (Exceeds the limit")
    assert msg["line-5"].startswith("line 5: not valid JSON (NaN")
    assert msg["line-6"].startswith("line 6: ") and "longer than" in msg["line-6"]
    assert msg["sur"].startswith("line 7: note: contains a lone surrogate")


def test_an_upload_cut_short_leaves_no_empty_batch_row(deployment):
    d = deployment
    before = count(d, batches)
    with socket.create_connection(("127.0.0.1", d.serve.port)) as s:
        s.sendall(b"POST /v1/batches HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  + f"Authorization: Bearer {d.keys['a']}\r\n".encode()
                  + b"Content-Type: application/jsonl\r\nContent-Length: 100000\r\n\r\n" + b'{"prompt": "h')
        deadline = time.time() + 10
        while count(d, batches) == before and time.time() < deadline:  # the row of the upload in progress
            time.sleep(0.05)
    deadline = time.time() + 20
    while count(d, batches) != before and time.time() < deadline:
        time.sleep(0.1)
    assert count(d, batches) == before, d.serve.output()


def test_tenants_see_only_their_own_jobs_and_batches(bench, deployment):
    d = deployment
    with d.http("a") as a, d.http("b") as b:
        job = a.post("/v1/jobs", json={"prompt": rows(bench, 3)[2].prompt}).json()["id"]
        batch = a.post("/v1/batches", content=json.dumps({"id": "x", "prompt": "hi"}).encode()).json()["id"]
        for path in (f"/v1/jobs/{job}", f"/v1/batches/{batch}", f"/v1/batches/{batch}/results"):
            assert b.get(path).status_code == 404 and a.get(path).status_code == 200
        assert b.post(f"/v1/jobs/{job}/cancel").status_code == 404
        assert b.post(f"/v1/batches/{batch}/cancel").status_code == 404
        # the same idempotency key in two tenants: two jobs
        ka = a.post("/v1/jobs", json={"prompt": "hi there"}, headers={"Idempotency-Key": "same"}).json()["id"]
        kb = b.post("/v1/jobs", json={"prompt": "hi there"}, headers={"Idempotency-Key": "same"}).json()["id"]
        assert ka != kb
    with httpx.Client(base_url=d.url) as anon:
        r = anon.get(f"/v1/jobs/{job}")
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
        bad = anon.get(f"/v1/jobs/{job}", headers={"Authorization": "Bearer csk_000000000000_forged"})
        assert bad.status_code == 401


@pytest.mark.parametrize("path, body", [("/v1/chat/completions", {"model": 3, "messages": []}),
                                        ("/v1/jobs", {"prompt": "hi", "colour": "red"})])
def test_a_caller_without_a_valid_key_hears_401_before_what_is_wrong_with_its_body(deployment, path, body):
    d = deployment
    before = count(d, jobs)
    with httpx.Client(base_url=d.url) as anon:
        for auth in ({}, {"Authorization": "Bearer csk_000000000000_forged"}):
            for content in (json.dumps(body).encode(), b'{"model": "caf\xe9"}'):  # invalid; not UTF-8
                r = anon.post(path, content=content, headers={**auth, "Content-Type": "application/json"})
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
                assert r.headers["WWW-Authenticate"] == "Bearer"
    with d.http() as h:  # admitted, the body's fault is named
        r = h.post(path, json=body)
        assert r.status_code == 422 and r.json()["error"]["param"] in ("model", "colour"), r.text
    assert count(d, jobs) == before


def test_keys_cli_revokes_a_key_at_once(deployment):
    d = deployment
    env = {**os.environ, **d.env}
    run = lambda *a: subprocess.run([sys.executable, "-m", "worker.cli", "keys", *a], env=env,  # noqa: E731
                                    capture_output=True, text=True, timeout=60, cwd=REPO)
    made = run("create", "--tenant", "c", "--name", "svc")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip().splitlines()[-1]
    with httpx.Client(base_url=d.url, headers={"Authorization": f"Bearer {key}"}) as h:
        assert h.get("/v1/models").status_code == 200
        listed = run("list", "--tenant", "c").stdout
        key_id = key.split("_")[1]
        assert key_id in listed and "active" in listed and key not in listed  # the key itself is not stored
        assert run("revoke", key_id).returncode == 0
        assert h.get("/v1/models").status_code == 401


def test_exhausted_budget_is_402_and_rate_limit_429_with_nothing_enqueued(bench, deployment):
    d = deployment
    r = redis.Redis.from_url(REDIS)
    queues = [f"{d.settings.redis_prefix}{q}" for q in ("cascade.t0", "cascade.t0.interactive")]
    with d.http("poor") as h:
        first = h.post("/v1/jobs", json={"prompt": rows(bench, 4)[3].prompt}).json()["id"]
        assert h.get(f"/v1/jobs/{first}", params={"wait": 30}).json()["cost_usd"] > 1e-9
        TenantStore(d.settings.db_url).upsert_tenant("poor", budget_usd=1e-9)  # now spent
        before = count(d, jobs, jobs.c.tenant == "poor"), [r.llen(q) for q in queues]
        refused = h.post("/v1/jobs", json={"prompt": "one more"})
        assert refused.status_code == 402 and refused.json()["error"]["code"] == "budget_exhausted", refused.text
        client = openai.OpenAI(base_url=f"{d.url}/v1", api_key=d.keys["poor"], max_retries=0)
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model="cascade/default", messages=[{"role": "user", "content": "x"}])
        assert e.value.status_code == 402
        assert h.post("/v1/batches", content=b'{"prompt": "x"}').status_code == 402
        assert (count(d, jobs, jobs.c.tenant == "poor"), [r.llen(q) for q in queues]) == before
    with d.http("busy") as h:
        for _ in range(2):  # the second request of a minute (again if the first fell in the minute before)
            assert h.post("/v1/jobs", json={"prompt": "first"}).status_code == 202
            limited = h.post("/v1/jobs", json={"prompt": "second"})
            if limited.status_code == 429:
                break
        assert limited.status_code == 429 and 1 <= int(limited.headers["Retry-After"]) <= 60
        assert count(d, jobs, jobs.c.tenant == "busy", jobs.c.input["prompt"].as_string() == "second") == 0
    r.close()


def one_job_at_most(bench, prompts) -> float:
    """The most one job of these prompts can cost: its recorded cost at both tiers."""
    by_prompt = {r.prompt: r for r in load_dataset(bench / "rc-mmlu.jsonl.gz").records}
    return max(sum(by_prompt[p].responses[m].cost_usd for m in MODELS) for p in prompts)


def tenant_row(d, tenant: str) -> dict:
    return TenantStore(d.settings.db_url).tenant(tenant)


def test_a_budget_stops_a_batch_when_its_reservations_reach_it(bench, deployment):
    """Issue #23: a $0.001 budget and a 1,000-line batch; before, the whole batch was
    admitted and spent $0.239. Each job reserves its most (its plan's tiers) when admitted."""
    d = deployment
    rs = load_dataset(bench / "rc-mmlu.jsonl.gz").split("test")
    prompts = [rs[i % len(rs)].prompt for i in range(1000)]
    with d.http("thrifty", timeout=300) as h:
        r = post_batch(h, [json.dumps({"id": f"t{i}", "prompt": p}) for i, p in enumerate(prompts)])
        assert r.status_code == 202, r.text
        b = wait_batch(h, r.json()["id"], timeout=300)
        results, errors = outputs(h, b["id"])
        refused = h.post("/v1/jobs", json={"prompt": prompts[0]})
    t = tenant_row(d, "thrifty")
    assert t["spent_usd"] <= 0.001 + one_job_at_most(bench, prompts), t
    assert b["cascade"]["counts"]["total"] == b["cascade"]["counts"]["done"] == 1000, b
    assert 0 < len(results) < 1000 and len(results) + len(errors) == 1000
    over = [x for x in errors if "budget" in x["error"]["message"]]
    assert len(over) == 1000 - len(results), errors[:3]
    # once it stops, it stops: every line after the first refused one is refused
    first = min(int(x["custom_id"][1:]) for x in over)
    assert all(int(x["custom_id"][1:]) < first for x in results)
    assert t["reserved_usd"] == pytest.approx(0, abs=1e-12)  # every reservation released
    assert refused.status_code == 402 and refused.json()["error"]["code"] == "budget_exhausted", refused.text


def test_two_api_processes_at_once_cannot_overshoot_a_budget(bench, deployment, tmp_path):
    d = deployment
    rs = load_dataset(bench / "rc-mmlu.jsonl.gz").split("test")
    second = Serve(d.env, d.portfolio, tmp_path / "serve2.log")
    try:
        second.wait_ready()
        urls = [d.url, second.url]
        got: dict[int, httpx.Response] = {}

        def upload(k: int) -> None:
            lines = [json.dumps({"id": f"u{k}-{i}", "prompt": rs[(k * 300 + i) % len(rs)].prompt}) for i in range(300)]
            with httpx.Client(base_url=urls[k % 2], timeout=300,
                              headers={"Authorization": f"Bearer {d.keys['rival']}"}) as h:
                got[k] = post_batch(h, lines)

        threads = [threading.Thread(target=upload, args=(k,)) for k in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert all(r.status_code in (202, 402) for r in got.values()), {k: r.text for k, r in got.items()}
        with d.http("rival", timeout=300) as h:
            for r in got.values():
                if r.status_code == 202:
                    wait_batch(h, r.json()["id"], timeout=300)
    finally:
        second.stop()
    t = tenant_row(d, "rival")
    assert t["spent_usd"] <= 0.001 + one_job_at_most(bench, [r.prompt for r in rs]), t
    assert t["reserved_usd"] == pytest.approx(0, abs=1e-12)
