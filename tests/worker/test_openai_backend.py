"""The openai backend against a real OpenAI-compatible server (llama-cpp-python's,
with the tiny model, on 127.0.0.1), a proxy in front of it that answers 5xx or
stalls, a stopped server, and canned answers for the parsing edge cases."""
from __future__ import annotations

import email.utils
import time

import pytest
from helpers.servers import CannedServer, FlakyProxy, LlamaServer, free_port

from router.core.attempt import Query
from router.core.policy import Needs
from router.core.portfolio import BackendSpec, Tier
from worker.models.backends import (
    BackendConfigError,
    BackendFailure,
    TransientBackendError,
    build_backend,
)
from worker.models.backends.openai import retry_after_seconds

FEW_SHOT = "Q: What is 2 + 2?\nA: 4\nQ: What day comes after Monday?\nA: Tuesday\nQ: {prompt}\nA:"


def tier(base_url: str, name: str = "remote", **opts) -> Tier:
    spec = {"kind": "openai", "base_url": base_url, "model": "tiny", "max_tokens": 8, **opts}
    return Tier(name=name, backend=BackendSpec.model_validate(spec))


@pytest.fixture
def server(llama_server):
    return llama_server  # the session's llama-cpp-python server (helpers.llama)


# -- against the real server -------------------------------------------------------------

@pytest.mark.models
def test_completions_endpoint_returns_answer_logprobs_and_usage(server):
    b = build_backend(tier(server.base_url, endpoint="completions", prompt_template=FEW_SHOT, stop=["\n"]))
    r = b.generate(Query("q1", "What day comes after Friday?"), Needs(logprobs=True, top_logprobs=3))
    b.close()
    assert r.text  # the model's one-line answer
    assert r.tokens and all(isinstance(t.logprob, float) and t.logprob <= 0 for t in r.tokens)
    assert any(len(t.top) >= 1 for t in r.tokens)
    assert r.tokens_in and r.tokens_in > 10 and r.tokens_out and r.tokens_out >= 1
    assert r.latency_ms > 0 and r.cost_usd is None  # cost: from the tier's price
    assert r.stop == ("\n",)


@pytest.mark.models
def test_chat_endpoint_returns_logprobs(server):
    b = build_backend(tier(server.base_url, endpoint="chat", max_tokens=6))
    r = b.generate(Query("q1", "Say hello."), Needs(logprobs=True, top_logprobs=2))
    b.close()
    assert r.tokens and all(t.logprob <= 0 for t in r.tokens)
    assert r.tokens_out and r.tokens_in


@pytest.mark.models
def test_default_options_get_token_logprobs_whenever_the_policy_reads_a_token_signal(server):
    # llama-cpp-python's server answers `"logprobs": null` to `logprobs: true` alone; the backend
    # always adds top_logprobs >= 1, so a tier with default options gets its signal
    with FlakyProxy(server.base_url) as proxy:
        b = build_backend(tier(proxy.base_url, max_tokens=6))
        r = b.generate(Query("q1", "What is 2 + 2?"), Needs(signals=("min_logprob",)))
        b.close()
    sent = proxy.bodies[-1]
    assert sent["logprobs"] is True and sent["top_logprobs"] == 1
    assert r.tokens and all(t.logprob <= 0 for t in r.tokens) and "logprobs_missing" not in r.meta


@pytest.mark.models
def test_no_logprobs_requested_unless_needed(server):
    with FlakyProxy(server.base_url) as proxy:
        b = build_backend(tier(proxy.base_url, endpoint="completions", prompt_template=FEW_SHOT, stop=["\n"]))
        r = b.generate(Query("q1", "What is 3 + 4?"), Needs())
        assert "logprobs" not in proxy.bodies[-1] and r.tokens is None
        b.generate(Query("q1", "What is 3 + 4?"), Needs(signals=("mean_logprob",)))
        assert proxy.bodies[-1]["logprobs"] == 1
        b.close()


@pytest.mark.models
def test_5xx_is_retried_honouring_retry_after_then_answers(server):
    with FlakyProxy(server.base_url, fail_first=2, status=503, retry_after="0") as proxy:
        b = build_backend(tier(proxy.base_url, endpoint="completions", prompt_template=FEW_SHOT, stop=["\n"],
                               retries=3, backoff=60, max_backoff=60))  # Retry-After: 0 beats the 60 s backoff
        t0 = time.monotonic()
        r = b.generate(Query("q1", "What is 3 + 4?"), Needs(logprobs=True))
        b.close()
    assert proxy.requests == 3 and r.tokens
    # the backoff alone would have waited 60 s: far longer than three calls take even on a busy machine
    assert time.monotonic() - t0 < 45


@pytest.mark.models
def test_5xx_raises_a_transient_error_naming_the_server(server):
    with FlakyProxy(server.base_url, always_fail=True, status=502, retry_after="7") as proxy:
        b = build_backend(tier(proxy.base_url))
        with pytest.raises(TransientBackendError) as e:
            b.generate(Query("q1", "hi"), Needs())
        b.close()
    assert proxy.base_url in str(e.value) and "HTTP 502" in str(e.value) and "overloaded" in str(e.value)
    assert e.value.retry_after == 7.0
    assert proxy.requests == 1  # one HTTP call: the pipeline does the retrying


@pytest.mark.models
def test_read_timeout_is_transient_and_names_the_server(server):
    with FlakyProxy(server.base_url, stall=3.0) as proxy:
        b = build_backend(tier(proxy.base_url, read_timeout=0.5))
        t0 = time.monotonic()
        with pytest.raises(TransientBackendError) as e:
            b.generate(Query("q1", "hi"), Needs())
        b.close()
    assert time.monotonic() - t0 < 2.5
    assert proxy.base_url in str(e.value) and "read_timeout" in str(e.value)


@pytest.mark.models
def test_prompt_longer_than_the_servers_context_is_a_failure_not_retried(server):
    with FlakyProxy(server.base_url) as proxy:
        b = build_backend(tier(proxy.base_url, endpoint="completions", retries=3))
        with pytest.raises(BackendFailure) as e:
            b.generate(Query("q1", "word " * 2000), Needs())
        b.close()
    assert not isinstance(e.value, TransientBackendError)
    assert proxy.base_url in str(e.value) and "HTTP 400" in str(e.value)
    assert proxy.requests == 1


@pytest.mark.models
def test_stopped_server_is_transient_with_its_address():
    from worker.models import modelpack

    s = LlamaServer(modelpack.resolve("tiny")).start()
    b = build_backend(tier(s.base_url, endpoint="completions", prompt_template=FEW_SHOT, stop=["\n"]))
    assert b.generate(Query("q1", "What is 1 + 1?"), Needs()).text
    s.stop()
    with pytest.raises(TransientBackendError) as e:
        b.generate(Query("q2", "What is 1 + 2?"), Needs())
    b.close()
    assert s.base_url in str(e.value) and "cannot connect" in str(e.value)


# -- without a model ---------------------------------------------------------------------

def test_unreachable_server_error_names_the_address():
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    b = build_backend(tier(url, connect_timeout=1))
    with pytest.raises(TransientBackendError) as e:
        b.generate(Query("q1", "hi"), Needs())
    assert f"{url}/chat/completions" in str(e.value)


def test_chat_logprobs_and_usage_cost_are_parsed():
    body = {
        "model": "gpt-x",
        "choices": [{"message": {"role": "assistant", "content": " Paris "}, "finish_reason": "stop",
                     "logprobs": {"content": [
                         {"token": "Paris", "logprob": -0.1,
                          "top_logprobs": [{"token": "Paris", "logprob": -0.1}, {"token": "Lyon", "logprob": -2.5}]},
                         {"token": "<|im_end|>", "logprob": None, "top_logprobs": []}]}}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 2, "cost": 0.00042},
    }
    with CannedServer(body) as srv:
        b = build_backend(tier(srv.base_url, top_logprobs=2))
        r = b.generate(Query("q1", "Capital of France?"), Needs(logprobs=True))
        sent = srv.bodies[-1]
    assert sent["logprobs"] is True and sent["top_logprobs"] == 2 and sent["messages"][-1]["content"] == "Capital of France?"
    assert r.text == "Paris"
    assert [t.token for t in r.tokens] == ["Paris", "<|im_end|>"]
    assert r.tokens[0].top == {"Paris": -0.1, "Lyon": -2.5}
    assert r.tokens[1].logprob == float("-inf")  # null -> dropped by the signals, never averaged in
    assert (r.tokens_in, r.tokens_out, r.cost_usd) == (12, 2, 0.00042)
    assert r.meta["model"] == "gpt-x"


def test_legacy_completions_shape_on_the_chat_endpoint_is_read():
    # some server versions answer a chat request with the completions shape of log-probs
    body = {"choices": [{"message": {"role": "assistant", "content": "4"}, "finish_reason": "stop",
                         "logprobs": {"tokens": ["4", "<|im_end|>"], "token_logprobs": [-0.25, None],
                                      "top_logprobs": [{"4": -0.25, "5": -2.0}, {}], "text_offset": [0, 1]}}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 2}}
    with CannedServer(body) as srv:
        b = build_backend(tier(srv.base_url))
        r = b.generate(Query("q", "2+2?"), Needs(signals=("min_logprob",)))
        b.close()
    assert [(t.token, t.logprob) for t in r.tokens] == [("4", -0.25), ("<|im_end|>", float("-inf"))]
    assert r.tokens[0].top == {"4": -0.25, "5": -2.0}
    # and the chat shape on the completions endpoint
    chat_shaped = {"choices": [{"text": "4", "logprobs": {"content": [
        {"token": "4", "logprob": -0.5, "top_logprobs": [{"token": "4", "logprob": -0.5}]}]}}]}
    with CannedServer(chat_shaped) as srv:
        b = build_backend(tier(srv.base_url, endpoint="completions"))
        r = b.generate(Query("q", "2+2?"), Needs(signals=("min_logprob",)))
        b.close()
    assert [(t.token, t.logprob) for t in r.tokens] == [("4", -0.5)]


def test_an_answer_without_the_logprobs_asked_for_is_marked():
    body = {"choices": [{"message": {"role": "assistant", "content": "4"}, "logprobs": None}]}
    with CannedServer(body) as srv:
        b = build_backend(tier(srv.base_url))
        asked = b.generate(Query("q", "2+2?"), Needs(signals=("min_logprob",)))
        not_asked = b.generate(Query("q", "2+2?"), Needs())
        b.close()
    assert asked.tokens is None and asked.meta["logprobs_missing"] is True
    assert "logprobs_missing" not in not_asked.meta


def test_api_key_comes_from_the_named_environment_variable(monkeypatch):
    with CannedServer({"choices": [{"text": "4"}]}) as srv:
        monkeypatch.delenv("CASCADE_TEST_KEY", raising=False)
        with pytest.raises(BackendConfigError, match="CASCADE_TEST_KEY"):
            build_backend(tier(srv.base_url, api_key_env="CASCADE_TEST_KEY"))
        monkeypatch.setenv("CASCADE_TEST_KEY", "sk-test-123")
        b = build_backend(tier(srv.base_url, api_key_env="CASCADE_TEST_KEY", endpoint="completions"))
        assert b.client.headers["authorization"] == "Bearer sk-test-123"
        assert b.generate(Query("q", "2+2"), Needs()).text == "4"


@pytest.mark.parametrize("status,transient", [(429, True), (500, True), (503, True), (400, False), (401, False),
                                              (404, False)])
def test_status_codes_sorted_into_transient_and_failure(status, transient):
    with CannedServer({"error": {"message": f"status {status}"}}, status=status,
                      headers={"Retry-After": "2"}) as srv:
        b = build_backend(tier(srv.base_url))
        with pytest.raises(BackendFailure) as e:
            b.generate(Query("q", "hi"), Needs())
    assert isinstance(e.value, TransientBackendError) is transient
    assert srv.base_url in str(e.value) and f"status {status}" in str(e.value)


def test_garbage_answer_is_a_failure_naming_the_server():
    with CannedServer("<html>not json</html>") as srv:
        b = build_backend(tier(srv.base_url))
        with pytest.raises(BackendFailure, match="not an OpenAI-style completion") as e:
            b.generate(Query("q", "hi"), Needs())
    assert srv.base_url in str(e.value)


def test_retry_after_parsing():
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds("1.5") == 1.5
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    date = email.utils.formatdate(time.time() + 10, usegmt=True)
    assert 8 <= retry_after_seconds(date) <= 10.5
    assert retry_after_seconds(email.utils.formatdate(time.time() - 100, usegmt=True)) == 0.0


def test_bad_options_are_config_errors():
    with pytest.raises(BackendConfigError, match="base_url"):
        build_backend(tier("localhost:8000"))
    with pytest.raises(BackendConfigError, match="did you mean 'read_timeout'"):
        build_backend(tier("http://127.0.0.1:1/v1", read_timout=3))
    with pytest.raises(BackendConfigError, match="endpoint"):
        build_backend(tier("http://127.0.0.1:1/v1", endpoint="embeddings"))
    with pytest.raises(BackendConfigError, match="read_timeout"):
        build_backend(tier("http://127.0.0.1:1/v1", read_timeout=0))


# -- through the pipeline: retries, then escalation, all recorded in `attempts` --------------

def _settings(tmp_path):
    from worker.config.settings import Settings

    return Settings(broker_url=None, database_url=None, home=tmp_path, backend_retries=2,
                    backend_retry_backoff=0.01, backend_retry_max_delay=0.05, chunk_size=4)


def _portfolio(remote: dict, local: dict):
    from router.core.portfolio import parse_portfolio

    return parse_portfolio({
        "tiers": [
            {"name": "remote", "backend": {"kind": "openai", "model": "tiny", "max_tokens": 6, **remote},
             "price": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}},
            {"name": "local", "backend": {"kind": "openai", "model": "tiny", "max_tokens": 6, "logprobs": True,
                                          "endpoint": "completions", "prompt_template": FEW_SHOT, "stop": ["\n"],
                                          **local},
             "price": {"input_per_mtok": 0.1, "output_per_mtok": 0.2}},
        ],
        "policy": {"name": "threshold", "params": {"signal": "mean_logprob", "thresholds": {"remote": -1.0}}},
    }, where="test portfolio")


ITEMS = [{"id": "a", "prompt": "What is 2 + 3?"}, {"id": "b", "prompt": "What day comes after Friday?"}]


def _check_escalated(report, address: str, what: str):
    assert [j["status"] for j in report.jobs] == ["succeeded", "succeeded"]
    # both jobs travel in one message and are called together: each retries (1 call + 2
    # retries) in the same rounds, and they give up together (the breaker then keeps a later
    # message from calling at all)
    for j, said in zip(report.jobs, ("gave up after 3 tries", "gave up after 3 tries")):
        assert j["final_tier"] == "local" and j["answer"]
        first, second = j["attempts"]
        assert first["tier"] == "remote" and first["answer"] is None
        assert address in first["error"] and what in first["error"] and said in first["error"]
        assert first["decision"] == "escalate" and "remote failed" in first["reason"]
        assert first["cost_usd"] == 0
        assert second["tier"] == "local" and second["error"] is None and second["decision"] == "accept"
        assert second["tokens_in"] and second["tokens_out"] and second["cost_usd"] > 0
        assert "mean_logprob" in second["signals"]  # logprobs asked for and turned into signals
        assert j["cost_usd"] == pytest.approx(first["cost_usd"] + second["cost_usd"])


@pytest.mark.models
def test_pipeline_5xx_retries_then_escalates(server, tmp_path):
    from worker.queue.run import run_batch

    with FlakyProxy(server.base_url, always_fail=True, status=503, retry_after="0") as proxy:
        pf = _portfolio({"base_url": proxy.base_url}, {"base_url": server.base_url})
        rep = run_batch(ITEMS, pf, settings=_settings(tmp_path), batch_id="flaky", progress=False, timeout=120)
    _check_escalated(rep, proxy.base_url, "HTTP 503")
    # the stage's jobs are called together: one call + 2 retries each, in the same rounds; then they fall back
    # together (and the breaker would keep a later message from calling at all); before them, the embedded
    # workers' start-up probe (a 503: not waited for, the run starts unverified)
    assert proxy.requests == 3 * len(ITEMS) + 1


@pytest.mark.models
def test_pipeline_read_timeout_retries_then_escalates(server, tmp_path):
    from worker.queue.run import run_batch

    with FlakyProxy(server.base_url, stall=2.0) as proxy:
        pf = _portfolio({"base_url": proxy.base_url, "read_timeout": 0.3}, {"base_url": server.base_url})
        rep = run_batch(ITEMS, pf, settings=_settings(tmp_path), batch_id="slow", progress=False, timeout=120)
    _check_escalated(rep, proxy.base_url, "read_timeout")


@pytest.mark.models
def test_pipeline_stopped_server_retries_then_escalates(server, tmp_path):
    from worker.models import modelpack
    from worker.queue.run import run_batch

    stopped = LlamaServer(modelpack.resolve("tiny")).start()
    stopped.stop()  # it ran, and now nothing listens at its address
    pf = _portfolio({"base_url": stopped.base_url, "connect_timeout": 1}, {"base_url": server.base_url})
    rep = run_batch(ITEMS, pf, settings=_settings(tmp_path), batch_id="stopped", progress=False, timeout=120)
    _check_escalated(rep, stopped.base_url, "cannot connect")


def test_pipeline_unreachable_last_tier_fails_the_job_naming_the_address(tmp_path):
    from router.core.portfolio import parse_portfolio
    from worker.queue.run import run_batch

    url = f"http://127.0.0.1:{free_port()}/v1"
    pf = parse_portfolio({"tiers": [{"name": "only", "backend": {"kind": "openai", "base_url": url, "model": "m"}}],
                          "policy": {"name": "threshold"}}, where="test portfolio")
    rep = run_batch(ITEMS[:1], pf, settings=_settings(tmp_path), batch_id="down", progress=False, timeout=60)
    [job] = rep.jobs
    assert job["status"] == "failed" and url in job["error"]
    [attempt] = job["attempts"]
    assert url in attempt["error"] and "gave up after 3 tries" in attempt["error"]


@pytest.mark.models
def test_chat_messages_and_request_params_reach_the_server(server):
    b = build_backend(tier(server.base_url, endpoint="chat", max_tokens=64))
    chat = ({"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another one?"})
    q = Query("q1", "Another one?", messages=chat, params={"max_tokens": 2, "temperature": 0.0, "stop": ["\n"]})
    body = b.payload(q, Needs())
    assert body["messages"] == [dict(m) for m in chat] and body["max_tokens"] == 2 and body["stop"] == ["\n"]
    r = b.generate(q, Needs())
    b.close()
    assert r.tokens_out is not None and 1 <= r.tokens_out <= 2  # the request's max_tokens, not the tier's 64
    assert r.stop == ("\n",)


def test_completions_endpoint_refuses_a_system_prompt_naming_it():
    b = build_backend(tier("http://127.0.0.1:9/v1", endpoint="completions"))
    try:
        with pytest.raises(BackendFailure, match=r"cannot honour the request's params.system"):
            b.generate(Query("q", "hi", params={"system": "be brief"}), Needs())
        with pytest.raises(BackendFailure, match=r"cannot honour the request's messages"):
            b.generate(Query("q", "hi", messages=({"role": "system", "content": "x"}, {"role": "user", "content": "hi"})),
                       Needs())
    finally:
        b.close()
