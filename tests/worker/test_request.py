"""Requests: one validator for every way in; each error names its field; a parameter
that a tier of the plan cannot honour is refused before anything is stored."""
from __future__ import annotations

import pytest
from helpers.portfolios import write_portfolio

from router.core.portfolio import load_portfolio
from worker.job.codec import query_of
from worker.job.request import RequestError, job_input
from worker.queue.admission import job_row, new_job_row
from worker.queue.items import item_from


@pytest.mark.parametrize("raw, field", [
    ({}, "prompt"),
    ({"prompt": 3}, "prompt"),
    ({"prompt": "a\x00b"}, "prompt"),
    ({"prompt": "x" * 200_001}, "prompt"),
    ({"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "messages"),
    ({"prompt": "hi", "params": {"temperature": "hot"}}, "params.temperature"),
    ({"prompt": "hi", "params": {"temperature": 9}}, "params.temperature"),
    ({"prompt": "hi", "params": {"max_tokens": 0}}, "params.max_tokens"),
    ({"prompt": "hi", "params": {"max_tokens": True}}, "params.max_tokens"),
    ({"prompt": "hi", "params": {"stop": ["a", ""]}}, "params.stop"),
    ({"prompt": "hi", "params": {"top_p": 0.5}}, "params.top_p"),
    ({"prompt": "hi", "params": "x"}, "params"),
])
def test_bad_requests_name_the_field(raw, field):
    with pytest.raises(RequestError) as e:
        job_input(raw)
    assert e.value.field == field and str(e.value).startswith(f"{field}: ")


def test_a_chat_is_stored_whole_and_its_last_user_turn_is_the_prompt():
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ok"}, {"role": "user", "content": "second"}]
    data = job_input({"messages": chat, "params": {"max_tokens": 5, "stop": "\n"}, "customer": "acme"})
    q = query_of("j", {**data, "id": "j"})
    assert q.prompt == "second" and list(q.messages) == chat
    assert q.params == {"max_tokens": 5, "stop": ["\n"]} and q.meta == {"customer": "acme"}


def test_replay_tiers_refuse_parameters_naming_the_field_and_tier(bench, tmp_path):
    p = load_portfolio(write_portfolio(tmp_path / "p.toml", bench, ["llama3.2-3b", "llama3.1-70b"], [-0.3]))
    ok = new_job_row("j1", "k", 1, p, job_input({"prompt": "What is 2 + 2?"}))
    assert ok["status"] == "queued" and ok["current_tier"] == "t0"
    with pytest.raises(RequestError, match=r"^params.temperature: tier 't0' \(replay backend\) cannot honour it"):
        new_job_row("j2", "k", 1, p, job_input({"prompt": "hi", "params": {"temperature": 0.5}}))
    # in a batch, the same request is a failed item naming the field; the rest go on
    row = job_row("b:k", "k", 3, p, job_input({"prompt": "hi", "params": {"max_tokens": 3}}), None, "item k: ")
    assert row["status"] == "failed" and row["error"].startswith("item k: params.max_tokens: tier 't0'")


def test_a_bad_batch_line_is_a_failed_item_naming_the_field():
    it = item_from({"id": "a", "prompt": "hi", "params": {"stop": 3}}, 4, "in.jsonl: line 4")
    assert it.data is None and it.error.startswith("in.jsonl: line 4: params.stop: ")
