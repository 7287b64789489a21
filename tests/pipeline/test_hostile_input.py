"""Every bad line fails alone, on PostgreSQL (which refuses more than SQLite: NUL,
lone surrogates, NaN in JSON, integers beyond a column): the rest of the batch
runs, each bad line's error names it; a model answer the database cannot store
is cleaned or fails only its own job, with its attempt and cost recorded."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from router.core.portfolio import load_portfolio
from worker.config.settings import Settings
from worker.queue.batch import BatchError
from worker.queue.items import read_items
from worker.queue.run import run_batch

pytestmark = pytest.mark.services


def replay_file(path: Path, rows: list[dict]) -> Path:
    """A tiny benchmarks-format file: models a (cheap) and b, answers as given."""
    with open(path, "w") as f:
        for r in rows:
            a = {"text": r.get("a", "A"), "correct": 1.0, "cost_usd": 0.001, "latency_ms": 5.0,
                 "tokens_in": 10, "tokens_out": r.get("tokens_out", 2), "logprob": r.get("lp", -0.01)}
            b = {"text": "B", "correct": 1.0, "cost_usd": 0.01, "latency_ms": 9.0, "tokens_in": 10,
                 "tokens_out": 3, "logprob": -0.01}
            f.write(json.dumps({"id": r["id"], "prompt": r["prompt"], "responses": {"a": a, "b": b}}) + "\n")
    return path


def portfolio_over(path: Path, data: Path):
    path.write_text(
        '[policy]\nname = "threshold"\nsignal = "logprob"\n\n'
        f'[[tiers]]\nname = "a"\nthreshold = -0.5\nbackend = {{ kind = "replay", file = "{data}", model = "a" }}\n\n'
        f'[[tiers]]\nname = "b"\nbackend = {{ kind = "replay", file = "{data}", model = "b" }}\n')
    return load_portfolio(path)


def pg_settings(pg_url, tmp_path, **kw) -> Settings:
    # no broker: the embedded workers, but on PostgreSQL
    return Settings(database_url=pg_url, home=tmp_path / "home", **kw)


def test_hostile_lines_fail_alone_on_postgresql(pg_url, tmp_path):
    good = [{"id": f"g{i}", "prompt": f"question {i}"} for i in range(4)]
    data = replay_file(tmp_path / "data.jsonl", good)
    portfolio = portfolio_over(tmp_path / "p.toml", data)
    lines = [
        json.dumps(good[0]).encode(),
        b'{"id": "latin1", "prompt": "caf\xe9"}',                      # 2: not UTF-8
        json.dumps({"id": "nul", "prompt": "a\u0000b"}).encode(),       # 3: NUL in the prompt
        b'{"id": "nan", "prompt": "x", "weight": NaN}',                # 4: NaN
        b'{"id": "inf", "prompt": "x", "weight": 1e999}',              # 5: a float overflow
        b'{"prompt": "x", "deep": ' + b"[" * 5000 + b"]" * 5000 + b"}",  # 6: deep nesting
        json.dumps({"id": "x" * 151, "prompt": "x"}).encode(),          # 7: id beyond its column
        json.dumps({"id": "sur", "prompt": "x", "note": "\ud800"}).encode(),  # 8: a lone surrogate
        json.dumps({"id": "nulid\u0000", "prompt": "x"}).encode(),      # 9: NUL in the id
        json.dumps(good[1]).encode(),
        json.dumps({"id": "line-2", "prompt": "question 2"}).encode(),  # 11: takes a bad line's default key
        json.dumps({"id": "g1", "prompt": "again"}).encode(),          # 12: an id used on line 10
        json.dumps({"id": "cat", "prompt": "x", "category": {"a": 1}}).encode(),  # 13
        b'{"prompt": "x", "big": ' + b"9" * 5000 + b"}",               # 14: an integer JSON cannot hold
        json.dumps(good[3]).encode(),
    ]
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b"\n".join(lines) + b"\n")
    items = read_items(inp)
    assert len(items) == len(lines) and len({it.key for it in items}) == len(lines)
    report = run_batch(items, portfolio, settings=pg_settings(pg_url, tmp_path), batch_id="hostile",
                       progress=False, timeout=120)
    seq_of = {it.key: it.seq for it in items}
    by_line = {seq_of[j["id"]]: j for j in report.jobs}
    assert len(report.jobs) == len(lines)
    assert report.batch["total"] == report.batch["done"] == len(lines)
    ok = {n for n, j in by_line.items() if j["status"] == "succeeded"}
    assert ok == {1, 10, 11, 15}
    expect = {
        2: "line 2: not valid UTF-8 (byte 0xe9",
        3: "line 3: prompt: contains a NUL character",
        4: "line 4: not valid JSON (NaN is not a JSON number)",
        5: "line 5: not valid JSON (the number 1e999 is too large",
        6: "line 6: nested deeper than",
        7: "line 7: id is longer than 150 characters",
        8: "line 8: note: contains a lone surrogate",
        9: "line 9: id: contains a NUL character",
        12: "line 12: id 'g1' already used on line 10",
        13: "line 13: category: must be a string",
        14: "line 14: not valid JSON (Exceeds the limit",
    }
    for n, msg in expect.items():
        assert by_line[n]["status"] == "failed" and msg in by_line[n]["error"], (n, by_line[n]["error"])
    assert by_line[11]["id"] == "line-2" and by_line[2]["id"] != "line-2"


def test_an_answer_the_database_refuses_fails_only_its_job_with_its_cost(pg_url, tmp_path):
    rows = [{"id": "ok1", "prompt": "p1"},
            {"id": "nul", "prompt": "p2", "a": "yes\u0000no"},                 # cleaned, accepted
            {"id": "huge", "prompt": "p3", "tokens_out": 10**12},              # beyond an INTEGER column
            {"id": "ok2", "prompt": "p4", "lp": -3.0}]                         # escalates to b
    data = replay_file(tmp_path / "data.jsonl", rows)
    portfolio = portfolio_over(tmp_path / "p.toml", data)
    report = run_batch(read_items(data), portfolio, settings=pg_settings(pg_url, tmp_path, chunk_size=16),
                       batch_id="answers", progress=False, timeout=120)
    by = {j["id"]: j for j in report.jobs}
    assert by["ok1"]["status"] == "succeeded" and by["ok1"]["answer"] == "A"
    assert by["nul"]["status"] == "succeeded" and by["nul"]["answer"] == "yes\ufffdno"
    assert by["ok2"]["status"] == "succeeded" and by["ok2"]["final_tier"] == "b"
    huge = by["huge"]
    assert huge["status"] == "failed" and "could not be stored" in huge["error"]
    [att] = huge["attempts"]
    assert att["cost_usd"] == 0.001 and "could not be stored" in att["error"]
    assert huge["cost_usd"] == 0.001
    assert report.batch["total_cost"] == pytest.approx(0.001 * 4 + 0.01)


def test_a_batch_name_beyond_its_column_is_refused(pg_url, tmp_path):
    data = replay_file(tmp_path / "data.jsonl", [{"id": "a", "prompt": "p"}])
    portfolio = portfolio_over(tmp_path / "p.toml", data)
    with pytest.raises(BatchError, match="batch name"):
        run_batch(read_items(data), portfolio, settings=pg_settings(pg_url, tmp_path), batch_id="b" * 50,
                  progress=False)


def test_rerun_with_changed_input_warns_instead_of_silently_reusing_answers(pg_url, tmp_path):
    rows = [{"id": f"q{i}", "prompt": f"p{i}"} for i in range(4)]
    data = replay_file(tmp_path / "data.jsonl", rows)
    portfolio = portfolio_over(tmp_path / "p.toml", data)
    settings = pg_settings(pg_url, tmp_path)
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    first = run_batch(read_items(inp), portfolio, settings=settings, batch_id="re", progress=False, timeout=60)
    assert first.submitted.warning() is None
    same = run_batch(read_items(inp), portfolio, settings=settings, batch_id="re", progress=False, timeout=60)
    assert same.submitted.warning() is None and same.submitted.new == 0
    edited = [{**rows[0], "prompt": "p0, edited"}, rows[1], rows[2]]  # q0 changed, q3 gone
    inp.write_text("".join(json.dumps(r) + "\n" for r in edited))
    again = run_batch(read_items(inp), portfolio, settings=settings, batch_id="re", progress=False, timeout=60)
    assert again.submitted.changed == ["q0"] and again.submitted.missing == 1
    w = again.submitted.warning()
    assert "1 item(s) differ" in w and "'q0'" in w and "1 job(s) of the batch are no longer in the input" in w
    assert "--batch" in w
