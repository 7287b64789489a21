"""OpenAI's Batch API through the unchanged official `openai` SDK, against `cascade serve`
with real Redis, PostgreSQL and a `cascade worker` process per replay tier: upload a
JSONL file (/v1/files), create a batch from it, poll it, download its output and error
files, list and page, cancel; bad input refused naming the field; a file or batch of
another tenant is a 404. Every response is parsed with the SDK's own types
(openai.types.Batch, FileObject, FileDeleted), which fail on a missing or mistyped field."""
from __future__ import annotations

import io
import json
import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx
import openai
import pytest
from helpers.api import Serve
from helpers.env import REDIS, REPO, private_database, private_redis_prefix
from helpers.portfolios import write_portfolio
from helpers.workers import Workers
from openai.types import Batch, FileDeleted, FileObject
from sqlalchemy import func, select, update

from router.core.records import load_dataset
from worker.config.settings import Settings
from worker.ops.migrate import upgrade
from worker.service.tenants import Tenants
from worker.store.engine import engine_for
from worker.store.schema import file_chunks, files
from worker.store.tenants import TenantStore

pytestmark = pytest.mark.services
MODELS = ["llama3.2-3b", "llama3.1-70b"]
FINAL = ("completed", "failed", "cancelled", "expired")
CHAT = "/v1/chat/completions"


@dataclass
class Deployment:
    serve: Serve
    workers: Workers
    keys: dict
    env: dict

    def sdk(self, tenant: str = "a") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.serve.url}/v1", api_key=self.keys[tenant], max_retries=0, timeout=300)

    def http(self, tenant: str = "a") -> httpx.Client:
        return httpx.Client(base_url=self.serve.url, timeout=300,
                            headers={"Authorization": f"Bearer {self.keys[tenant]}"})

    def logs(self) -> str:
        return f"--- serve\n{self.serve.output()}\n{self.workers.logs()}"


@pytest.fixture(scope="module")
def deployment(bench, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("openai-batch")
    with private_database() as pg_url, private_redis_prefix() as prefix:
        upgrade(pg_url)
        env = {"CASCADE_BROKER_URL": REDIS, "CASCADE_DATABASE_URL": pg_url, "CASCADE_REDIS_PREFIX": prefix,
               "CASCADE_HOME": str(tmp / "home"), "CASCADE_VISIBILITY_TIMEOUT": "10"}
        path = write_portfolio(tmp / "p.toml", bench, MODELS, [-0.3])
        w = Workers(env, path, tmp)
        for t in ("t0", "t1"):
            w.start(t)
        tenants = Tenants(TenantStore(pg_url), Settings(broker_url=REDIS, database_url=pg_url, redis_prefix=prefix))
        keys = {t: tenants.create_key(t)[1] for t in ("a", "b", "c")}
        tenants.close()
        serve = Serve(env, path, tmp / "serve.log")
        try:
            yield Deployment(serve.wait_ready(), w, keys, env)
        finally:
            serve.stop()
            w.stop_all()


def prompts(bench, n: int) -> list[str]:
    rs = load_dataset(bench / "rc-mmlu.jsonl.gz").records
    return [rs[i % len(rs)].prompt for i in range(n)]


def line(cid: str, prompt: str, model: str = "cascade/default", **body) -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": CHAT,
                       "body": {"model": model, "messages": [{"role": "user", "content": prompt}], **body}})


def upload(client: openai.OpenAI, lines: list[str], name: str = "requests.jsonl") -> FileObject:
    data = ("\n".join(lines) + "\n").encode()
    f = client.files.create(file=(name, io.BytesIO(data)), purpose="batch")
    assert f.bytes == len(data) and f.purpose == "batch" and f.filename == name and f.expires_at > f.created_at
    return f


def raw(d: Deployment, path: str, tenant: str = "a") -> dict:
    with d.http(tenant) as h:
        r = h.get(path)
    assert r.status_code == 200, r.text
    return r.json()


def poll(d: Deployment, client: openai.OpenAI, batch_id: str, timeout: float = 300, tenant: str = "a") -> Batch:
    deadline = time.time() + timeout
    seen = []
    while True:
        b = Batch.model_validate(raw(d, f"/v1/batches/{batch_id}", tenant))  # strict: the SDK's type
        seen.append(b.status)
        if b.status in FINAL:
            assert client.batches.retrieve(batch_id).status == b.status
            return b
        assert time.time() < deadline, f"batch {batch_id} still {b.status} after {timeout}s\n{d.logs()}"
        time.sleep(0.2)


def jsonl(text: str) -> list[dict]:
    return [json.loads(x) for x in text.splitlines()]


def run_flow(d: Deployment, bench, n: int) -> tuple[Batch, list[dict], list[dict], float]:
    """Upload n good lines and 3 bad ones, create, poll, download: the batch, its output
    and error lines, and the seconds from create to completed."""
    client = d.sdk()
    ps = prompts(bench, n)
    lines = [line(f"req-{i}", p) for i, p in enumerate(ps)]
    lines.insert(1, "this is not JSON")                                      # line 2
    lines.insert(3, line("wrong-model", ps[0], model="cascade/other"))       # line 4
    lines.insert(5, json.dumps({"custom_id": "no-body", "method": "POST", "url": CHAT, "body": []}))  # line 6
    f = upload(client, lines)
    assert FileObject.model_validate(raw(d, f"/v1/files/{f.id}")).bytes == f.bytes
    assert client.files.content(f.id).content == ("\n".join(lines) + "\n").encode()
    t = time.time()
    created = client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h",
                                    metadata={"run": f"n{n}"})
    assert created.input_file_id == f.id and created.endpoint == CHAT and created.metadata == {"run": f"n{n}"}
    b = poll(d, client, created.id, timeout=max(300, n / 10))
    secs = time.time() - t
    out = jsonl(client.files.content(b.output_file_id).text)
    err = jsonl(client.files.content(b.error_file_id).text)
    return b, out, err, secs


def check_flow(b: Batch, out: list[dict], err: list[dict], n: int) -> None:
    assert b.status == "completed", b
    assert b.request_counts.model_dump() == {"total": n + 3, "completed": n, "failed": 3}
    assert b.completed_at >= b.created_at and b.in_progress_at and b.expires_at > b.created_at
    ext = b.model_extra["cascade"]
    assert ext["counts"] == {"total": n + 3, "done": n + 3, "succeeded": n, "failed": 3, "cancelled": 0, "open": 0}
    assert sum(t["answered"] for t in ext["tiers"].values()) == n and ext["cost_usd"] > 0
    assert set(ext["missing_signals"]) == {"t0", "t1"} and ext["warnings"] == []  # replay tiers send every signal
    assert [x["custom_id"] for x in out] == [f"req-{i}" for i in range(n)]  # input order
    for x in out:
        assert x["error"] is None and x["response"]["status_code"] == 200
        body = x["response"]["body"]
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"]
    msgs = {x["custom_id"]: x["error"]["message"] for x in err}
    assert all(x["response"] is None and x["error"]["code"] == "job_failed" for x in err)
    assert msgs == {"line-2": "line 2: not valid JSON (Expecting value at column 1)",
                    "wrong-model": "line 4: body.model: is 'cascade/other' but this batch runs 'cascade/default'",
                    "no-body": "line 6: body: must be an object, got list"}


def test_sdk_upload_create_poll_download_with_malformed_lines_in_the_error_file(bench, deployment):
    d = deployment
    b, out, err, _ = run_flow(d, bench, 200)
    check_flow(b, out, err, 200)
    client = d.sdk()
    assert FileObject.model_validate(raw(d, f"/v1/files/{b.output_file_id}")).purpose == "batch_output"
    listed = client.batches.list(limit=100)
    assert b.id in [x.id for x in listed.data]
    for x in raw(d, "/v1/batches")["data"]:
        Batch.model_validate(x)


def test_files_and_batches_list_in_pages_and_a_file_is_deleted(bench, deployment):
    d = deployment
    client = d.sdk("c")
    made = [upload(client, [line(f"p{k}-{i}", p) for i, p in enumerate(prompts(bench, 3))], f"f{k}.jsonl")
            for k in range(3)]
    first = client.files.list(limit=2)
    assert [f.id for f in first.data] == [made[2].id, made[1].id] and first.has_more
    rest = client.files.list(limit=2, after=first.data[-1].id)
    assert [f.id for f in rest.data] == [made[0].id] and not rest.has_more
    assert [f.id for f in client.files.list()] == [m.id for m in reversed(made)]  # the SDK's auto-paging
    batches = [client.batches.create(input_file_id=m.id, endpoint=CHAT, completion_window="24h") for m in made[:2]]
    page = raw(d, "/v1/batches?limit=1", "c")
    assert page["object"] == "list" and page["has_more"] and page["data"][0]["id"] == batches[1].id
    page2 = raw(d, f"/v1/batches?limit=1&after={batches[1].id}", "c")
    assert [x["id"] for x in page2["data"]] == [batches[0].id] and not page2["has_more"]
    gone = FileDeleted.model_validate(raw_delete(d, f"/v1/files/{made[0].id}", "c"))
    assert gone.deleted and gone.id == made[0].id
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(made[0].id)
    with pytest.raises(openai.NotFoundError):
        client.files.delete(made[0].id)
    assert client.files.delete(made[1].id).deleted  # a batch made from it keeps its jobs
    assert poll(d, client, batches[0].id, tenant="c").status == "completed"


def raw_delete(d: Deployment, path: str, tenant: str) -> dict:
    with d.http(tenant) as h:
        r = h.delete(path)
    assert r.status_code == 200, r.text
    return r.json()


def test_bad_input_is_refused_naming_the_field_and_other_tenants_see_nothing(bench, deployment):
    d = deployment
    a, b = d.sdk("a"), d.sdk("b")
    data = (line("x", prompts(bench, 1)[0]) + "\n").encode()
    for purpose in ("fine-tune", "assistants"):
        with pytest.raises(openai.BadRequestError) as e:
            a.files.create(file=("x.jsonl", io.BytesIO(data)), purpose=purpose)
        assert e.value.body["param"] == "purpose" and "purpose must be 'batch'" in e.value.body["message"]
    with d.http("a") as h:
        r = h.post("/v1/files", files={"file": ("x.jsonl", data)})
        assert (r.status_code, r.json()["error"]["param"]) == (400, "purpose"), r.text
        r = h.post("/v1/files", data={"purpose": "batch"}, files={"other": ("x.jsonl", data)})
        assert (r.status_code, r.json()["error"]["param"]) == (400, "file"), r.text
        r = h.post("/v1/files", json={"purpose": "batch"})
        assert (r.status_code, r.json()["error"]["param"]) == (400, "file"), r.text
    assert [f for f in a.files.list() if f.filename == "x.jsonl"] == []  # nothing refused was kept
    with pytest.raises(openai.NotFoundError, match="no file 'file-nope'"):
        a.batches.create(input_file_id="file-nope", endpoint=CHAT, completion_window="24h")
    f = upload(a, [line("x", prompts(bench, 1)[0])])
    with pytest.raises(openai.BadRequestError) as e:
        a.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")
    assert e.value.body["param"] == "endpoint"
    with pytest.raises(openai.BadRequestError) as e:
        a.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="soon")
    assert e.value.body["param"] == "completion_window"
    # another tenant's file and batch: 404, as if they did not exist
    with pytest.raises(openai.NotFoundError):
        b.files.retrieve(f.id)
    with pytest.raises(openai.NotFoundError):
        b.files.content(f.id)
    with pytest.raises(openai.NotFoundError):
        b.files.delete(f.id)
    with pytest.raises(openai.NotFoundError):
        b.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    assert f.id not in [x.id for x in b.files.list()]
    batch = a.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    done = poll(d, a, batch.id)
    for call in (lambda: b.batches.retrieve(batch.id), lambda: b.batches.cancel(batch.id),
                 lambda: b.files.content(done.output_file_id), lambda: b.files.retrieve(done.output_file_id)):
        with pytest.raises(openai.NotFoundError):
            call()
    assert batch.id not in [x.id for x in b.batches.list()]
    assert a.files.retrieve(f.id).id == f.id  # still there for its owner


def test_cancel_keeps_the_answers_given_and_puts_the_rest_in_the_error_file(bench, deployment):
    d = deployment
    client = d.sdk()
    n = 40
    d.workers.stop("t1")  # escalated lines wait at t1: the batch is still running when it is cancelled
    try:
        f = upload(client, [line(f"c{i}", p) for i, p in enumerate(prompts(bench, n))])
        batch = client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
        deadline = time.time() + 120
        while (b := client.batches.retrieve(batch.id)).model_extra["cascade"]["tiers"].get("t0", {}).get("calls", 0) < n:
            assert time.time() < deadline, d.logs()
            time.sleep(0.2)
        assert b.status == "in_progress", b
        cancelled = Batch.model_validate(client.batches.cancel(batch.id).model_dump())
    finally:
        d.workers.start("t1")
    assert cancelled.status == "cancelled" and cancelled.cancelled_at and cancelled.cancelling_at
    accepted = b.model_extra["cascade"]["tiers"]["t0"]["answered"]
    assert accepted < n
    assert cancelled.request_counts.model_dump() == {"total": n, "completed": accepted, "failed": n - accepted}
    err = jsonl(client.files.content(cancelled.error_file_id).text)
    assert len(err) == n - accepted and {x["error"]["code"] for x in err} == {"cancelled"}
    out = jsonl(client.files.content(cancelled.output_file_id).text) if accepted else []
    assert sorted(x["custom_id"] for x in out + err) == sorted(f"c{i}" for i in range(n))
    time.sleep(1.0)  # the restarted t1 finds nothing left to run
    assert client.batches.retrieve(batch.id).request_counts.completed == accepted


def test_a_batch_past_its_completion_window_expires_with_its_unrun_lines_in_the_error_file(bench, deployment):
    d = deployment
    client = d.sdk()
    n = 20
    d.workers.stop("t1")  # escalated lines wait at t1 until the window ends
    try:
        f = upload(client, [line(f"e{i}", p) for i, p in enumerate(prompts(bench, n))])
        batch = client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="2s")
        b = poll(d, client, batch.id, timeout=60)
    finally:
        d.workers.start("t1")
    assert b.status == "expired" and b.expired_at >= b.created_at and b.completed_at is None, b
    left = b.request_counts.failed
    assert left > 0 and b.request_counts.completed + left == n
    err = jsonl(client.files.content(b.error_file_id).text)
    assert len(err) == left and {x["error"]["code"] for x in err} == {"batch_expired"}
    assert all(x["error"]["message"].startswith("expired") for x in err)


def test_a_10000_line_file_through_the_sdk(bench, deployment):
    d = deployment
    b, out, err, secs = run_flow(d, bench, 10_000)
    check_flow(b, out, err, 10_000)
    print(f"10,000 lines: created to completed in {secs:.1f} s")


def test_a_large_file_is_stored_in_chunks_and_purged_once_expired(deployment):
    d = deployment
    client = d.sdk("c")
    rnd = random.Random(7)
    data = b"".join(json.dumps({"id": f"k{i}", "prompt": "%032x" % rnd.getrandbits(128) * 8}).encode() + b"\n"
                    for i in range(9000))  # 2.5 MiB
    assert 2 << 20 < len(data) < 3 << 20
    f = client.files.create(file=("big.jsonl", io.BytesIO(data)), purpose="batch")
    assert f.bytes == len(data) and client.files.content(f.id).content == data
    db = d.env["CASCADE_DATABASE_URL"]
    with engine_for(db).begin() as c:
        sizes = c.execute(select(func.length(file_chunks.c.data)).where(file_chunks.c.file_id == f.id)
                          .order_by(file_chunks.c.seq)).scalars().all()
        assert sizes == [1 << 20, 1 << 20, len(data) - (2 << 20)]  # never one row of the whole file
        c.execute(update(files).where(files.c.id == f.id).values(expires_at=files.c.created_at))
    kept = upload(client, ['{"id": "x", "prompt": "hi"}'])
    out = subprocess.run([sys.executable, "-m", "worker.cli", "purge", "--older-than", "30d"], cwd=REPO, timeout=120,
                         env={**os.environ, **d.env}, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().endswith("and 1 expired files"), out.stdout + out.stderr
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)
    with engine_for(db).connect() as c:
        assert c.execute(select(func.count()).select_from(file_chunks).where(file_chunks.c.file_id == f.id)).scalar() == 0
    assert client.files.retrieve(kept.id).id == kept.id  # not expired: kept


@pytest.mark.parametrize("ctype", ["application/x-ndjson", "application/jsonl", None])
def test_the_streamed_upload_is_any_body_that_is_not_json(bench, deployment, ctype):
    d = deployment
    ps = prompts(bench, 3)
    body = "".join(json.dumps({"id": f"s{i}", "prompt": p}) + "\n" for i, p in enumerate(ps)).encode()
    with d.http() as h:
        r = h.post("/v1/batches", content=body, headers={"Content-Type": ctype} if ctype else {})
        assert r.status_code == 202, r.text
        b = Batch.model_validate(r.json())
        assert b.input_file_id == "" and b.endpoint == CHAT and b.request_counts.total == 3
        done = poll(d, d.sdk(), b.id)
        assert done.status == "completed" and done.request_counts.completed == 3
        # JSONL sent as application/json is taken for a batch request: refused naming what it lacks
        wrong = h.post("/v1/batches", content=body[: body.index(b"\n")], headers={"Content-Type": "application/json"})
    assert (wrong.status_code, wrong.json()["error"]["param"]) == (422, "input_file_id"), wrong.text


def test_an_upload_cut_short_leaves_no_file_behind(deployment):
    d = deployment
    db = d.env["CASCADE_DATABASE_URL"]

    def stored() -> tuple[int, int]:
        with engine_for(db).connect() as c:
            return (c.execute(select(func.count()).select_from(files)).scalar(),
                    c.execute(select(func.count()).select_from(file_chunks)).scalar())

    before = stored()
    head = (b'--xb\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            b'--xb\r\nContent-Disposition: form-data; name="file"; filename="cut.jsonl"\r\n\r\n')
    with socket.create_connection(("127.0.0.1", d.serve.port)) as s:
        s.sendall(b"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  + f"Authorization: Bearer {d.keys['a']}\r\n".encode()
                  + b"Content-Type: multipart/form-data; boundary=xb\r\nContent-Length: 10000000\r\n\r\n"
                  + head + b'{"id": "x", "prompt": "hi"}\n' * 60_000)  # 1.6 MiB: a first chunk is stored
        deadline = time.time() + 20
        while stored()[1] == before[1] and time.time() < deadline:
            time.sleep(0.05)
        assert stored()[1] > before[1], d.serve.output()  # the upload in progress wrote a chunk
    deadline = time.time() + 20
    while stored() != before and time.time() < deadline:
        time.sleep(0.1)
    assert stored() == before, d.serve.output()
    assert "cut.jsonl" not in [f.filename for f in d.sdk().files.list()]
