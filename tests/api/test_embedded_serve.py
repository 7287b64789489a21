"""`cascade serve` with nothing configured: embedded (SQLite, tier workers in the
process, no API key), answering at once."""
from __future__ import annotations

import json
import sqlite3

import httpx
import openai
from helpers.api import Serve
from helpers.portfolios import write_portfolio

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
