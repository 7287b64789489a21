"""Secrets are never stored, printed or logged: credentials in a backend's base_url
and headers are blanked in the stored portfolio, every attempt and result line and
the logs; they come from the environment or a secrets file (${NAME}); an error
about the database never prints its password."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from helpers.env import REPO
from sqlalchemy import create_engine, text

from router.core.portfolio import parse_portfolio
from worker.config.credentials import (
    SecretError,
    expand,
    is_redacted,
    redact_options,
    redact_spec,
    redact_text,
    redact_url,
)
from worker.config.logs import configure_logging
from worker.config.settings import Settings
from worker.models.backends import BackendConfigError, build_backend
from worker.queue.batch import write_results
from worker.queue.run import run_batch

SECRETS = ("alice-pw-4242", "hdr-secret-777", "file-key-999", "env-tok-555")


class RecordingServer:
    """An OpenAI-style server that answers "4" (with its token log-prob) and keeps every request's headers."""

    def __init__(self):
        self.headers: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers.get("content-length") or 0))
                outer.headers.append(dict(self.headers))
                # with token log-probs, as a real server sends them: the tier's start-up probe asks for them
                body = json.dumps({"choices": [{"message": {"content": "4"}, "finish_reason": "stop",
                                                "logprobs": {"content": [{"token": "4", "logprob": -0.1,
                                                                          "top_logprobs": []}]}}],
                                   "usage": {"prompt_tokens": 5, "completion_tokens": 1}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_redaction_rules():
    assert redact_url("https://u:alice-pw-4242@h.example/v1?key=k1&model=m") == "https://***@h.example/v1?key=***&model=m"
    assert redact_url("https://${U}:${P}@h/v1") == "https://${U}:${P}@h/v1"  # references name secrets: kept
    assert redact_url("postgresql+psycopg://cascade:pw@db:5432/cascade") == "postgresql+psycopg://***@db:5432/cascade"
    assert "pw" not in redact_text("connect to redis://:pw@broker:6379/0 failed")
    spec = {"tiers": [{"name": "a", "backend": {"kind": "openai", "base_url": "http://u:p@h/v1", "model": "m",
                                                "headers": {"X-Key": "literal", "X-Ref": "${REF}"},
                                                "api_key_env": "KEY", "token": "t"}}]}
    b = redact_spec(spec)["tiers"][0]["backend"]
    assert b == {"kind": "openai", "base_url": "http://***@h/v1", "model": "m",
                 "headers": {"X-Key": "***", "X-Ref": "${REF}"}, "api_key_env": "KEY", "token": "***"}
    assert spec["tiers"][0]["backend"]["headers"]["X-Key"] == "literal"  # the original is untouched
    # a number is never a credential: a portfolio read back from the database keeps its max_tokens and stays usable
    counts = {"kind": "openai", "base_url": "http://h/v1", "model": "m", "max_tokens": 8, "top_logprobs": 1}
    assert redact_spec({"tiers": [{"name": "a", "backend": counts}]})["tiers"][0]["backend"] == counts
    assert not is_redacted(redact_options({k: v for k, v in counts.items() if k != "kind"}))


def test_secrets_come_from_the_environment_or_the_secrets_file(tmp_path, monkeypatch):
    f = tmp_path / "secrets.env"
    f.write_text("# mounted secret\nFROM_FILE=file-key-999\n")
    monkeypatch.setenv("CASCADE_SECRETS_FILE", str(f))
    monkeypatch.setenv("FROM_ENV", "env-tok-555")
    assert expand("a ${FROM_FILE} b ${FROM_ENV}") == "a file-key-999 b env-tok-555"
    with pytest.raises(SecretError, match="the secret NOPE is set neither in the environment nor in the secrets file"):
        expand("${NOPE}")
    f.write_text("garbage-line-with-a-secret\n")
    with pytest.raises(SecretError) as e:
        expand("${FROM_FILE}")
    assert "garbage-line-with-a-secret" not in str(e.value) and "line 1" in str(e.value)
    monkeypatch.setenv("CASCADE_SECRETS_FILE", str(tmp_path / "missing"))
    assert expand("${FROM_ENV}") == "env-tok-555"  # the environment first: no file needed
    with pytest.raises(SecretError, match="cannot read the secrets file"):
        expand("${FROM_FILE}")
    monkeypatch.delenv("CASCADE_SECRETS_FILE")
    tier = parse_portfolio({"tiers": [{"name": "r", "backend": {"kind": "openai", "model": "m",
                                                                "base_url": "http://h/v1", "api_key_env": "ABSENT"}}],
                            "policy": {"name": "single", "params": {"tier": "r"}}}, where="t").tiers[0]
    with pytest.raises(BackendConfigError, match="tier 'r'.*ABSENT"):
        build_backend(tier)


def test_credentials_never_stored_or_logged(pg_url, tmp_path, monkeypatch, capfd):
    srv = RecordingServer()
    (tmp_path / "secrets.env").write_text("FILE_KEY=file-key-999\n")
    monkeypatch.setenv("CASCADE_SECRETS_FILE", str(tmp_path / "secrets.env"))
    monkeypatch.setenv("ENV_TOKEN", "env-tok-555")
    portfolio = parse_portfolio({
        "tiers": [
            # literal credentials (discouraged, but they must not leak)
            {"name": "lit", "backend": {"kind": "openai", "model": "m",
                                        "base_url": f"http://alice:alice-pw-4242@127.0.0.1:{srv.port}/v1",
                                        "headers": {"X-Api-Key": "hdr-secret-777"}}},
            # references: the way the docs recommend
            {"name": "ref", "backend": {"kind": "openai", "model": "m", "base_url": f"http://127.0.0.1:{srv.port}/v1",
                                        "headers": {"X-Token": "${ENV_TOKEN}"}, "api_key_env": "FILE_KEY"}},
        ],
        "policy": {"name": "threshold", "params": {"signal": "mean_logprob", "thresholds": {"lit": 100.0}}},
    }, where="test portfolio")
    configure_logging(json_lines=True, level="DEBUG")  # httpx logs every request at INFO
    try:
        report = run_batch([{"id": "a", "prompt": "2+2?"}, {"id": "b", "prompt": "3+1?"}], portfolio,
                           settings=Settings(database_url=pg_url, home=tmp_path / "h"), batch_id="sec",
                           progress=False, timeout=60)
    finally:
        logging.getLogger().handlers.clear()
        srv.close()
    assert [j["status"] for j in report.jobs] == ["succeeded", "succeeded"]
    assert [a["tier"] for a in report.jobs[0]["attempts"]] == ["lit", "ref"]
    # the servers did get the credentials
    lit = [h for h in srv.headers if "X-Api-Key" in h]
    ref = [h for h in srv.headers if "X-Token" in h]
    assert lit and all(h["X-Api-Key"] == "hdr-secret-777" and h["Authorization"].startswith("Basic ") for h in lit)
    assert ref and all(h["X-Token"] == "env-tok-555" and h["Authorization"] == "Bearer file-key-999" for h in ref)
    # ... and nothing stored, written or logged holds them
    out = tmp_path / "results.jsonl"
    write_results(report.jobs, out)
    eng = create_engine(pg_url)
    with eng.connect() as c:
        dump = "\n".join(json.dumps([list(r) for r in c.execute(text(f"select * from {t}"))], default=str)
                         for t in ("portfolios", "batches", "jobs", "attempts"))
    eng.dispose()
    logs = capfd.readouterr()
    assert "HTTP Request" in logs.err and f"127.0.0.1:{srv.port}" in logs.err  # the request lines were logged
    for where, blob in (("database", dump), ("results", out.read_text()), ("logs", logs.out + logs.err)):
        for s in SECRETS:
            assert s not in blob, (where, s)
    assert "${ENV_TOKEN}" in dump and "http://***@127.0.0.1" in dump


def test_missing_schema_error_never_prints_the_database_password(pg_url, tmp_path):
    url = pg_url.replace("postgres@", "postgres:db-pass-31337@", 1)  # trust auth: any password connects
    assert "db-pass-31337" in url
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": "a", "prompt": "x"}\n')
    (tmp_path / "p.toml").write_text(
        '[policy]\nname = "single"\n[policy.params]\ntier = "a"\n'
        '[[tiers]]\nname = "a"\nbackend = { kind = "openai", model = "m", base_url = "http://127.0.0.1:9/v1" }\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASCADE_")}
    env.update(CASCADE_DATABASE_URL=url, CASCADE_BROKER_URL="redis://127.0.0.1:6379/0", CASCADE_HOME=str(tmp_path))
    p = subprocess.run([sys.executable, "-m", "worker.cli", "run", str(inp), "--portfolio", str(tmp_path / "p.toml")],
                       env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "has no schema" in p.stderr, p.stderr
    assert "db-pass-31337" not in p.stdout + p.stderr and "***@" in p.stderr
