"""`cascade bench llamacpp`: a local tier's tokens/s, batched against one job at a time and bare llama-cpp-python.

In one process, on one model, one thread (the llamacpp backend's compute thread, which also
runs the bare library, so both get the same OpenMP set-up), the same prompts, greedy answers
of `max_tokens` tokens:
- batched: the llamacpp backend's `generate_many` on all the prompts (one message's jobs);
- sequential: its `generate`, one prompt after the other;
- bare: llama-cpp-python's own `Llama.create_completion` (no log-probs), one after the other.
The backend computes every token's log-prob in both of its runs. Each run starts from an
empty KV cache (the backend keeps prompt prefixes between jobs; the bare library keeps the
previous prompt's prefix, as it does by default). The runs alternate for `rounds` rounds;
tokens/s are the generated tokens over the wall time, summed over the rounds. The answers of
the batched run are checked against the sequential ones (text and tokens equal, log-prob
difference, how many jobs diverge and from which token on), and against the bare library's
texts. The backend runs with its default `batch_invariant = true`, which turns ggml's tiled
k-quant matmul off for the whole process, the bare library included (`ggml_tiled_matmul`
in the result; GGML_CPU_TILED_MM=1 in the environment keeps it on for both).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable

from router.core.attempt import Query
from router.core.policy import Needs
from router.core.portfolio import BackendSpec, Tier
from worker.models.backends.base import BackendFailure, BackendResult
from worker.models.backends.llamacpp import LlamaCppBackend, _import_llama

PROMPTS = (
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "The history of the printing press begins in the fifteenth century, when",
    "Here is a detailed explanation of how a hash table works internally. First,",
    "Dear diary, today was the strangest day of my life. It started when",
    "The three most important things to know about photosynthesis are",
    "In the year 2150, the first colony on Mars faced a problem nobody had expected:",
    "A beginner's guide to making bread at home. Start by",
    "The detective looked at the empty room and said slowly,",
    "Why the sky is blue, explained to a ten-year-old: sunlight",
    "The rules of chess are simple to learn but hard to master. The board",
    "My favourite recipe for a rainy autumn evening is a thick vegetable soup, which",
    "The migration of birds across continents has puzzled scientists for centuries because",
)


@dataclass
class LlamaBenchConfig:
    model: str = "medium"
    jobs: int = 8
    max_tokens: int = 64
    threads: int = 2
    rounds: int = 2
    n_ctx: int = 512
    log: Callable[[str], None] = print


def _tier(cfg: LlamaBenchConfig) -> Tier:
    return Tier(name="bench", backend=BackendSpec.model_validate({
        "kind": "llamacpp", "model": cfg.model, "n_ctx": cfg.n_ctx, "n_threads": cfg.threads,
        "max_tokens": cfg.max_tokens, "n_parallel": cfg.jobs, "temperature": 0}))


def _ok(results: list[BackendResult | BackendFailure]) -> list[BackendResult]:
    for r in results:
        if isinstance(r, BackendFailure):
            raise r
    return results  # type: ignore[return-value]


def _divergence(a: BackendResult, b: BackendResult) -> int | None:
    """The first token position where two answers differ (a length difference counts), None if equal."""
    x, y = [t.token for t in a.tokens], [t.token for t in b.tokens]
    k = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
    return None if x == y else k


def run_llamacpp_bench(cfg: LlamaBenchConfig) -> dict[str, Any]:
    prompts = [PROMPTS[i % len(PROMPTS)] + ("" if i < len(PROMPTS) else f" ({i})") for i in range(cfg.jobs)]
    queries = [Query(f"b{i}", p) for i, p in enumerate(prompts)]
    needs = Needs(logprobs=True)
    backend = LlamaCppBackend(_tier(cfg))
    compute = backend._compute  # the bare library runs on the backend's thread too
    llama_cpp = _import_llama()
    bare = compute.run(lambda: llama_cpp.Llama(
        model_path=str(backend.path), n_ctx=cfg.n_ctx, n_batch=backend.n_batch, n_threads=cfg.threads,
        n_threads_batch=cfg.threads, logits_all=False, verbose=False))
    cfg.log(f"bench llamacpp: {backend.model_name}, {cfg.jobs} jobs x {cfg.max_tokens} tokens, "
            f"{cfg.threads} threads, {cfg.rounds} rounds; load average {os.getloadavg()[0]:.2f}")

    def bare_run() -> list[dict]:
        bare.reset()
        return [bare.create_completion(p, max_tokens=cfg.max_tokens, temperature=0.0) for p in prompts]

    def timed(fn):
        t = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t

    try:
        # warm-up: first-call costs (thread pools, page faults of the weights) out of the timings
        compute.run(lambda: bare.create_completion(prompts[0], max_tokens=4, temperature=0.0))
        backend.generate_many(queries[:2], Needs())
        totals = {"batched": [0, 0.0], "sequential": [0, 0.0], "bare": [0, 0.0]}
        seq_res: list[BackendResult] = []
        bat_res: list[BackendResult] = []
        bare_res: list[dict] = []
        for r in range(cfg.rounds):
            order = ("batched", "sequential", "bare") if r % 2 == 0 else ("bare", "sequential", "batched")
            for mode in order:
                if mode == "bare":
                    bare_res, dt = timed(lambda: compute.run(bare_run))
                    n = sum(c["usage"]["completion_tokens"] for c in bare_res)
                else:
                    backend.clear_cache()
                    if mode == "batched":
                        bat_res, dt = timed(lambda: _ok(backend.generate_many(queries, needs)))
                        res = bat_res
                    else:
                        seq_res, dt = timed(lambda: [backend.generate(q, needs) for q in queries])
                        res = seq_res
                    n = sum(x.tokens_out for x in res)
                totals[mode][0] += n
                totals[mode][1] += dt
                cfg.log(f"  round {r + 1} {mode:>10}: {n} tokens in {dt:.2f} s = {n / dt:.2f} tok/s")
    finally:
        compute.run(bare.close)
        describe = backend.describe()
        backend.close()

    same = all(a.text == b.text and [t.token for t in a.tokens] == [t.token for t in b.tokens]
               for a, b in zip(seq_res, bat_res))
    splits = [_divergence(a, b) for a, b in zip(seq_res, bat_res)]
    diff = max((abs(x.logprob - y.logprob) for a, b in zip(seq_res, bat_res) for x, y in zip(a.tokens, b.tokens)),
               default=0.0)
    bare_same = sum(a.text == c["choices"][0]["text"].strip() for a, c in zip(seq_res, bare_res))
    tok_s = {k: v[0] / v[1] for k, v in totals.items()}
    return {
        "model": backend.model_name, "jobs": cfg.jobs, "max_tokens": cfg.max_tokens, "threads": cfg.threads,
        "rounds": cfg.rounds,
        "batched_tok_s": round(tok_s["batched"], 2),
        "sequential_tok_s": round(tok_s["sequential"], 2),
        "bare_tok_s": round(tok_s["bare"], 2),
        "ratio": round(tok_s["batched"] / tok_s["sequential"], 3),
        "single_vs_bare": round(tok_s["sequential"] / tok_s["bare"], 3),
        "same_outputs": same,
        "max_logprob_diff": diff,
        "jobs_diverging": sum(k is not None for k in splits),
        "first_divergence": min((k for k in splits if k is not None), default=None),
        "batch_invariant": describe["batch_invariant"],
        "ggml_tiled_matmul": not backend.tiled_off,
        "same_text_as_bare": f"{bare_same}/{len(prompts)}",
        "tokens_per_run": {k: v[0] // cfg.rounds for k, v in totals.items()},
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }
