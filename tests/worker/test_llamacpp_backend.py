"""The llamacpp backend with the three real models of the pack (CI prepares them)."""
from __future__ import annotations

import json
import threading

import pytest

from router.core import signals
from router.core.attempt import Query
from router.core.policy import Needs
from router.core.portfolio import BackendSpec, Tier
from router.lab import demo_questions as dq
from worker.models.backends import BackendConfigError, BackendFailure, build_backend


def tier(name="t", **opts) -> Tier:
    return Tier(name=name, backend=BackendSpec.model_validate({"kind": "llamacpp", **opts}))


def few_shot(model, **extra):
    return tier(model, model=model, n_threads=2, n_ctx=512, max_tokens=8, stop=["\n"],
                prompt_template=dq.FEW_SHOT, **extra)


@pytest.fixture(scope="module")
def tiny():
    b = build_backend(few_shot("tiny"))
    yield b
    b.close()


@pytest.mark.models
@pytest.mark.parametrize("model", ["tiny", "small", "medium"])
def test_each_pack_model_answers_with_token_logprobs(model):
    b = build_backend(few_shot(model))
    try:
        r = b.generate(Query("q1", "What is 2 + 5?"), Needs(logprobs=True, top_logprobs=3))
    finally:
        b.close()
    assert r.text and "\n" not in r.text
    assert r.tokens, "no token log-probs"
    for t in r.tokens:
        assert type(t.logprob) is float and t.logprob <= 0  # plain floats, not numpy.float32
        assert 1 <= len(t.top) <= 3 and all(type(v) is float for v in t.top.values())
        assert max(t.top.values()) >= t.logprob - 1e-9  # greedy: the chosen token is the top one
    assert r.tokens[-1].token == "\n"  # the stop token is in the list, and dropped by the signals
    s = signals.from_tokens(r.tokens, r.stop)
    assert {"mean_logprob", "min_logprob", "sum_logprob", "first_token_prob", "neg_entropy"} <= set(s)
    assert r.tokens_in > 20 and r.tokens_out == len(r.tokens) and r.latency_ms > 0
    assert r.cost_usd is None and r.meta["finish_reason"] == "stop"
    assert b.model_name == {"tiny": "SmolLM2-135M-Instruct", "small": "Qwen2.5-Coder-0.5B-Instruct",
                            "medium": "Qwen2.5-Coder-1.5B-Instruct"}[model]
    json.dumps([t.__dict__ for t in r.tokens])  # serialisable as is (Celery's JSON)


@pytest.mark.models
def test_top_k_only_when_asked(tiny):
    r = tiny.generate(Query("q1", "What is 2 + 5?"), Needs(logprobs=True))
    assert r.tokens and all(t.top == {} for t in r.tokens)


@pytest.mark.models
def test_kv_prefix_reuse_gives_the_same_answer_as_a_fresh_model(tiny):
    a1 = tiny.generate(Query("a", "What month comes after June?"), Needs())
    tiny.generate(Query("b", "What is 12 + 30?"), Needs())
    a2 = tiny.generate(Query("a", "What month comes after June?"), Needs())
    fresh = build_backend(few_shot("tiny", warm_prefix=False))
    a3 = fresh.generate(Query("a", "What month comes after June?"), Needs())
    fresh.close()
    assert a1.text == a2.text == a3.text
    for x, y in zip(a1.tokens, a3.tokens):
        assert x.token == y.token and x.logprob == pytest.approx(y.logprob, abs=1e-3)


@pytest.mark.models
def test_prompt_longer_than_the_context_is_a_per_job_failure(tiny):
    with pytest.raises(BackendFailure) as e:
        tiny.generate(Query("long", "word " * 2000), Needs())
    msg = str(e.value)
    assert "prompt too long" in msg and "512" in msg and "n_ctx" in msg
    # the model still works for the next job
    assert tiny.generate(Query("q", "What is 1 + 1?"), Needs()).text


@pytest.mark.models
def test_concurrent_jobs_on_one_model_are_serialised(tiny):
    out: dict[int, str] = {}

    def go(i):
        out[i] = tiny.generate(Query(str(i), f"What is {i} + 1?"), Needs()).text

    threads = [threading.Thread(target=go, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    alone = {i: tiny.generate(Query(str(i), f"What is {i} + 1?"), Needs()).text for i in range(4)}
    assert out == alone


@pytest.mark.models
def test_chat_mode_uses_the_models_template():
    b = build_backend(tier("c", model="tiny", mode="chat", n_ctx=512, max_tokens=6, n_threads=2))
    r = b.generate(Query("q", "Say hi."), Needs(logprobs=True))
    b.close()
    assert r.tokens and r.tokens_in > 5 and r.tokens_out <= 6


@pytest.mark.models
def test_max_tokens_stops_with_finish_reason_length(tiny):
    b = build_backend(tier("t", model="tiny", n_ctx=512, max_tokens=3, n_threads=2))
    r = b.generate(Query("q", "Once upon a time"), Needs())
    b.close()
    assert r.tokens_out <= 3 and r.meta["finish_reason"] in ("length", "stop")


# -- bad input: no model needed --------------------------------------------------------

def test_missing_model_file_names_it():
    with pytest.raises(BackendConfigError) as e:
        build_backend(tier(model_path="/nonexistent/dir/model.gguf"))
    assert "/nonexistent/dir/model.gguf" in str(e.value) and "does not exist" in str(e.value)


@pytest.fixture
def model_cache(tmp_path, monkeypatch):
    from worker.config.settings import get_settings

    monkeypatch.setenv("CASCADE_MODEL_CACHE", str(tmp_path))
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


def test_unprepared_pack_model_names_the_file_and_the_fix(model_cache):
    with pytest.raises(BackendConfigError) as e:
        build_backend(tier(model="small"))
    msg = str(e.value)
    assert str(model_cache / "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf") in msg
    assert "cascade models prepare" in msg


def test_corrupt_pack_model_names_the_file_and_the_fix(model_cache):
    from worker.models.modelpack import PACK

    path = model_cache / PACK["tiny"].filename
    path.write_bytes(b"GGUF" + b"\0" * 1000)  # wrong size
    with pytest.raises(BackendConfigError) as e:
        build_backend(tier(model="tiny"))
    assert str(path) in str(e.value) and "corrupt" in str(e.value) and "cascade models prepare" in str(e.value)


def test_not_a_gguf_file_is_a_config_error(tmp_path):
    pytest.importorskip("llama_cpp")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not a model" * 100)
    with pytest.raises(BackendConfigError) as e:
        build_backend(tier(model_path=str(bad)))
    assert str(bad) in str(e.value)


@pytest.mark.parametrize("opts,match", [
    ({}, "exactly one of 'model'"),
    ({"model": "tiny", "model_path": "/x.gguf"}, "exactly one of 'model'"),
    ({"model": "tinny"}, "did you mean 'tiny'"),
    ({"model": "tiny", "mode": "instruct"}, "'mode' must be"),
    ({"model": "tiny", "prompt_template": "no placeholder"}, "must contain {prompt}"),
    ({"model": "tiny", "n_ctx": 0}, "'n_ctx' must be >= 16"),
    ({"model": "tiny", "n_thread": 2}, "did you mean 'n_threads'"),
])
def test_bad_options_are_config_errors(opts, match):
    with pytest.raises(BackendConfigError, match=match):
        build_backend(tier(**opts))


# -- through the pipeline (embedded Celery workers) ------------------------------------------

@pytest.mark.models
def test_too_long_prompt_fails_its_job_and_falls_back_without_crashing_the_worker(tmp_path):
    from router.core.portfolio import parse_portfolio
    from worker.config.settings import Settings
    from worker.queue.run import run_batch

    pf = parse_portfolio({
        "tiers": [
            {"name": "short", "backend": {"kind": "llamacpp", "model": "tiny", "n_ctx": 128, "max_tokens": 4,
                                          "stop": ["\n"], "n_threads": 2}},
            {"name": "long", "backend": {"kind": "llamacpp", "model": "tiny", "n_ctx": 1024, "max_tokens": 4,
                                         "stop": ["\n"], "n_threads": 2}},
        ],
        "policy": {"name": "threshold", "params": {"signal": "mean_logprob", "thresholds": {"short": -100.0}}},
    }, where="test portfolio")
    items = [{"id": "fits", "prompt": "Q: What is 2 + 2?\nA:"},
             {"id": "medium-long", "prompt": "word " * 300},  # too long for 'short', fits 'long'
             {"id": "too-long", "prompt": "word " * 1500},  # too long for both
             {"id": "after", "prompt": "Q: What is 3 + 3?\nA:"}]
    settings = Settings(broker_url=None, database_url=None, home=tmp_path, chunk_size=4)
    rep = run_batch(items, pf, settings=settings, batch_id="ctx", progress=False, timeout=300)
    jobs = {j["id"]: j for j in rep.jobs}
    assert jobs["fits"]["status"] == "succeeded" and jobs["fits"]["final_tier"] == "short"
    assert jobs["after"]["status"] == "succeeded"  # the worker kept serving
    ml = jobs["medium-long"]
    assert ml["status"] == "succeeded" and ml["final_tier"] == "long"
    assert "prompt too long" in ml["attempts"][0]["error"] and ml["attempts"][0]["decision"] == "escalate"
    tl = jobs["too-long"]
    assert tl["status"] == "failed" and "prompt too long" in tl["error"] and "n_ctx" in tl["error"]
    assert [a["tier"] for a in tl["attempts"]] == ["short", "long"]


@pytest.mark.models
def test_request_params_override_the_tier(tiny):
    long = tiny.generate(Query("p", "Count from 1 to 20:"), Needs())
    short = tiny.generate(Query("p", "Count from 1 to 20:", params={"max_tokens": 1}), Needs())
    assert long.tokens_out > 1 and short.tokens_out == 1


@pytest.mark.models
def test_completion_mode_refuses_a_chat_naming_it(tiny):
    chat = ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "What is 2 + 5?"})
    with pytest.raises(BackendFailure, match="cannot honour the request's messages"):
        tiny.generate(Query("p", "What is 2 + 5?", messages=chat), Needs())
