"""The llamacpp backend's generate_many: a stage's jobs decoded together as parallel sequences."""
from __future__ import annotations

import os

import pytest

from router.core.attempt import Query
from router.core.policy import Needs
from router.core.portfolio import BackendSpec, Tier
from router.lab import demo_questions as dq
from worker.bench.llamacpp import PROMPTS
from worker.models.backends import BackendConfigError, BackendFailure, build_backend, llamacpp

PRICE = {"input_per_mtok": 0.02, "output_per_mtok": 0.04}


def tier(**opts) -> Tier:
    return Tier.model_validate({"name": "tiny", "price": PRICE, "backend": BackendSpec.model_validate(
        {"kind": "llamacpp", "model": "tiny", "n_threads": 2, "n_ctx": 512, "max_tokens": 6, "stop": ["\n"],
         "prompt_template": dq.FEW_SHOT, **opts})})


@pytest.fixture(scope="module")
def tiny():
    # 3 slots for 5-6 jobs: the later jobs take the slots the first ones free
    b = build_backend(tier(n_parallel=3))
    yield b
    b.close()


QUERIES = [
    Query("a", "What is 2 + 5?"),
    Query("b", "What month comes after June?"),
    Query("c", "Count from 1 to 20:", params={"max_tokens": 2}),  # its own length limit
    Query("d", "What is the plural of mouse?", params={"stop": ["e"]}),  # its own stop sequence
    Query("e", "What is 45 + 38?"),
    Query("f", "What day comes after Monday?"),
]


def same(a, b) -> None:
    assert a.text == b.text
    assert [t.token for t in a.tokens] == [t.token for t in b.tokens]
    assert [t.logprob for t in a.tokens] == pytest.approx([t.logprob for t in b.tokens], abs=1e-5)
    for x, y in zip(a.tokens, b.tokens):
        assert list(x.top) == list(y.top) and list(x.top.values()) == pytest.approx(list(y.top.values()), abs=1e-5)
    assert (a.tokens_in, a.tokens_out, a.stop, a.meta["finish_reason"]) == \
        (b.tokens_in, b.tokens_out, b.stop, b.meta["finish_reason"])


@pytest.mark.models
def test_batched_jobs_give_the_answers_log_probs_and_costs_of_one_at_a_time(tiny):
    needs = Needs(logprobs=True, top_logprobs=2)
    alone = [tiny.generate(q, needs) for q in QUERIES]
    tiny.clear_cache()
    together = tiny.generate_many(QUERIES, needs)
    assert len(together) == len(QUERIES)
    for a, b in zip(alone, together):
        same(a, b)
        assert tiny.tier.price.cost(a.tokens_in, a.tokens_out) == tiny.tier.price.cost(b.tokens_in, b.tokens_out) > 0
        assert len(b.tokens[0].top) == 2 and b.latency_ms > 0
    by_id = dict(zip((q.id for q in QUERIES), together))
    assert by_id["c"].tokens_out == 2 and by_id["c"].meta["finish_reason"] == "length"
    assert by_id["d"].stop == ("e",) and "e" not in by_id["d"].text
    assert by_id["a"].text == "7" and by_id["b"].text == "July"
    # again, now with every prompt in some slot's cache: still the same answers
    for a, b in zip(alone, tiny.generate_many(QUERIES, needs)):
        same(a, b)


@pytest.mark.models
def test_a_failing_job_in_a_batch_leaves_the_others_answers_intact(tiny):
    chat = ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "What is 2 + 5?"})
    batch = [QUERIES[0], Query("long", "word " * 600), QUERIES[1],
             Query("chat", "What is 2 + 5?", messages=chat), QUERIES[4]]
    out = tiny.generate_many(batch, Needs(logprobs=True))
    assert isinstance(out[1], BackendFailure) and "prompt too long" in str(out[1]) and "n_ctx" in str(out[1])
    assert isinstance(out[3], BackendFailure) and "cannot honour the request's messages" in str(out[3])
    tiny.clear_cache()
    for i in (0, 2, 4):
        same(tiny.generate(batch[i], Needs(logprobs=True)), out[i])


@pytest.mark.models
def test_sampled_jobs_in_a_batch_each_get_their_own_answer(tiny):
    qs = [Query(str(i), "Once upon a time", params={"temperature": 1.0, "max_tokens": 4, "stop": ["\n\n"]})
          for i in range(4)]
    out = tiny.generate_many(qs, Needs(logprobs=True))
    assert all(not isinstance(r, BackendFailure) and 1 <= r.tokens_out <= 4 for r in out)
    assert all(t.logprob <= 0 for r in out for t in r.tokens)


def test_n_parallel_beyond_the_batch_is_a_config_error():
    with pytest.raises(BackendConfigError, match="'n_parallel' \\(300\\) must be <= n_batch"):
        build_backend(Tier(name="t", backend=BackendSpec.model_validate(
            {"kind": "llamacpp", "model": "tiny", "n_parallel": 300, "n_batch": 512})))


@pytest.mark.models
def test_batch_invariance_reaches_llama_cpp(tiny):
    assert tiny.describe()["batch_invariant"] is True and tiny._decoder.exact
    assert os.environ["GGML_CPU_TILED_MM"] == "0"  # read by ggml at its first matmul of the process
    ctx = tiny._decoder._llm.context_params
    assert (ctx.n_seq_max, ctx.kv_unified, ctx.flash_attn_type) == (3, False, 0)  # 0: LLAMA_FLASH_ATTN_TYPE_DISABLED
    off = build_backend(tier(n_parallel=2, batch_invariant=False))
    try:
        assert off.describe()["batch_invariant"] is False and not off._decoder.exact
    finally:
        off.close()


class _CallSpy:
    """The llama_cpp module as the decoder sees it, recording each llama_decode call's (sequence, tokens) pairs."""

    def __init__(self, lib):
        self._lib, self.calls = lib, []

    def __getattr__(self, name):
        return getattr(self._lib, name)

    def llama_decode(self, ctx, batch):
        seqs = [batch.seq_id[i][0] for i in range(batch.n_tokens)]
        self.calls.append({s: seqs.count(s) for s in seqs})
        return self._lib.llama_decode(ctx, batch)


@pytest.mark.models
def test_exact_decoding_gives_each_prompt_calls_of_its_own_and_never_a_one_token_tail(tiny, monkeypatch):
    spy = _CallSpy(tiny._decoder._lib)
    monkeypatch.setattr(tiny._decoder, "_lib", spy)
    tiny.clear_cache()
    for cached in (False, True):
        spy.calls.clear()
        tiny.generate_many(QUERIES[:3], Needs())
        prompts = [c for c in spy.calls if max(c.values()) > 1]
        steps = [c for c in spy.calls if max(c.values()) == 1]
        assert all(len(c) == 1 for c in prompts)  # a prompt never shares a call
        assert steps[0] == {0: 1, 1: 1, 2: 1}  # generated tokens: one per job, the jobs together
        if cached:  # the whole prompt in the slot's cache: its last 2 tokens are evaluated again
            assert prompts == [{0: 2}, {1: 2}, {2: 2}]


def test_tiled_matmul_switch_is_set_once_per_process_and_the_environment_wins(monkeypatch):
    monkeypatch.delenv("GGML_CPU_TILED_MM", raising=False)
    monkeypatch.setattr(llamacpp, "_tiled_off", None)
    assert llamacpp.tiled_matmul_off(True) and os.environ["GGML_CPU_TILED_MM"] == "0"
    monkeypatch.setenv("GGML_CPU_TILED_MM", "1")
    assert llamacpp.tiled_matmul_off(False)  # decided by the first model loaded
    monkeypatch.setattr(llamacpp, "_tiled_off", None)
    assert not llamacpp.tiled_matmul_off(True)  # set before the first model: the user's value
    monkeypatch.delenv("GGML_CPU_TILED_MM")
    monkeypatch.setattr(llamacpp, "_tiled_off", None)
    assert not llamacpp.tiled_matmul_off(False) and "GGML_CPU_TILED_MM" not in os.environ


@pytest.mark.models
def test_batched_equals_one_at_a_time_on_the_k_quant_model():
    # the 1.5B model (Q4_K/Q6_K) is the one the tiled matmul and the attention kernels split on;
    # 8 jobs: steps of 8 columns; the repeated prompt: a cached prompt evaluated again
    prompts = list(PROMPTS[:6]) + [PROMPTS[3], PROMPTS[3]]
    queries = [Query(str(i), p) for i, p in enumerate(prompts)]
    b = build_backend(Tier(name="medium", backend=BackendSpec.model_validate(
        {"kind": "llamacpp", "model": "medium", "n_threads": 2, "n_ctx": 128, "max_tokens": 8, "n_parallel": 8})))
    try:
        alone = [b.generate(q, Needs(logprobs=True)) for q in queries]
        b.clear_cache()
        together = b.generate_many(queries, Needs(logprobs=True))
    finally:
        b.close()
    for a, t in zip(alone, together):
        assert (a.text, [x.token for x in a.tokens], [x.logprob for x in a.tokens]) == \
            (t.text, [x.token for x in t.tokens], [x.logprob for x in t.tokens])
