"""`cascade serve` with nothing configured: embedded (SQLite, tier workers in the
process, no API key), answering at once."""
from __future__ import annotations

import io
import json
import sqlite3
import time

import httpx
import openai
from helpers.api import Serve
from helpers.portfolios import write_portfolio
from openai.types import Batch

from router.core.records import load_dataset


def test_serve_with_nothing_configured_answers_at_once(bench, tmp_path):
    path = write_portfolio(tmp_path / "p.toml", bench, ["llama3.2-3b", "llama3.1-70b"], [-0.3])
    serve = Serve({"CASCADE_HOME": str(tmp_path / "home"), "CASCADE_BROKER_URL": None, "CASCADE_DATABASE_URL": None,
                   "CASCADE_PORTFOLIO": None},
                  path, tmp_path / "serve.log")
    try:
        serve.wait_ready()
        client = openai.OpenAI(base_url=f"{serve.url}/v1", api_key="not-needed", max_retries=0)
        prompt = load_dataset(bench / "rc-mmlu.jsonl.gz").split("test")[0].prompt
        r = client.chat.completions.create(model="cascade/default", messages=[{"role": "user", "content": prompt}])
        assert r.choices[0].message.content and r.model_extra["cascade"]["status"] == "succeeded"
        assert (tmp_path / "home" / "cascade.sqlite").exists()
    except Exception:
        print(serve.output())
        raise
    finally:
        serve.stop()


def test_unstorable_text_is_refused_naming_the_field_as_in_the_distributed_mode(bench, tmp_path):
    """Issue #23: a lone surrogate was a 500 in metadata, and a prompt with one was
    accepted and run here (SQLite takes it) though PostgreSQL refuses it: now a 400
    naming the field in both modes, nothing written."""
    path = write_portfolio(tmp_path / "p.toml", bench, ["llama3.2-3b", "llama3.1-70b"], [-0.3])
    serve = Serve({"CASCADE_HOME": str(tmp_path / "home"), "CASCADE_BROKER_URL": None, "CASCADE_DATABASE_URL": None,
                   "CASCADE_PORTFOLIO": None}, path, tmp_path / "serve.log")
    chat = {"model": "cascade/default", "messages": [{"role": "user", "content": "hi"}]}
    cases = [
        ("/v1/jobs", {"prompt": "hi", "metadata": {"k": "\ud800"}}, "metadata.k"),
        ("/v1/jobs", {"prompt": "a\ud800b"}, "prompt"),
        ("/v1/jobs", {"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content"),
        ("/v1/chat/completions", {**chat, "metadata": {"k": "\ud800"}}, "metadata.k"),
        ("/v1/chat/completions", {**chat, "metadata": {"k": "\ud800"}, "stream": True}, "metadata.k"),
        ("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content"),
        ("/v1/chat/completions", {**chat, "stream": True, "messages": [{"role": "user", "content": "\ud800"}]},
         "messages[0].content"),
    ]
    try:
        serve.wait_ready()
        with httpx.Client(base_url=serve.url, timeout=60) as h:
            for route, body, param in cases:
                r = h.post(route, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
                assert (r.status_code, r.json()["error"]["param"]) == (400, param), (route, body, r.text)
                assert "lone surrogate" in r.json()["error"]["message"]
        with sqlite3.connect(tmp_path / "home" / "cascade.sqlite") as db:
            assert db.execute("SELECT count(*) FROM jobs").fetchone() == (0,)
    except Exception:
        print(serve.output())
        raise
    finally:
        serve.stop()


def test_the_openai_batch_flow_works_on_sqlite_too(bench, tmp_path):
    """/v1/files and /v1/batches in the embedded mode: the file's chunks in SQLite."""
    path = write_portfolio(tmp_path / "p.toml", bench, ["llama3.2-3b", "llama3.1-70b"], [-0.3])
    serve = Serve({"CASCADE_HOME": str(tmp_path / "home"), "CASCADE_BROKER_URL": None, "CASCADE_DATABASE_URL": None,
                   "CASCADE_PORTFOLIO": None}, path, tmp_path / "serve.log")
    rs = load_dataset(bench / "rc-mmlu.jsonl.gz").split("test")[:20]
    lines = [json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": "cascade/default", "messages": [{"role": "user", "content": r.prompt}]}})
             for i, r in enumerate(rs)] + ["{not json"]
    data = ("\n".join(lines) + "\n").encode()
    try:
        serve.wait_ready()
        client = openai.OpenAI(base_url=f"{serve.url}/v1", api_key="not-needed", max_retries=0)
        f = client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
        assert client.files.content(f.id).content == data
        b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        deadline = time.time() + 120
        while (b := client.batches.retrieve(b.id)).status not in ("completed", "failed", "cancelled", "expired"):
            assert time.time() < deadline
            time.sleep(0.1)
        Batch.model_validate(b.model_dump())
        assert b.status == "completed" and b.request_counts.model_dump() == {"total": 21, "completed": 20, "failed": 1}
        out = [json.loads(x) for x in client.files.content(b.output_file_id).text.splitlines()]
        assert [x["custom_id"] for x in out] == [f"r{i}" for i in range(20)]
        (err,) = [json.loads(x) for x in client.files.content(b.error_file_id).text.splitlines()]
        assert err["custom_id"] == "line-21" and err["error"]["message"].startswith("line 21: not valid JSON")
        assert client.files.delete(f.id).deleted
        with sqlite3.connect(tmp_path / "home" / "cascade.sqlite") as db:
            assert db.execute("SELECT count(*) FROM file_chunks").fetchone() == (0,)
    except Exception:
        print(serve.output())
        raise
    finally:
        serve.stop()
