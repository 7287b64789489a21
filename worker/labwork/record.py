"""The local benchmark file (`cascade record`): every local model on a shared question set.

Each question (drawn by router.lab.local_bench from ../shared/benchmarks/questions,
train and test splits) goes to every model of the chain through its llamacpp backend,
asking for every live signal, so the answer and all its extra calls (worker.models.extra_calls:
k samples, k self-verifications, the Self-REF confidence token) are made the way a
worker makes them. One line per question, written as soon as its last model answered:
only what the models produced (texts, token log-probs, tokens, latency, cost at the
configured prices), keyed by question id; the question text and the grade are joined
from the shared files when the file is read (router.core.questions). Resumable: a
re-run skips the ids already in the file.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, Sequence

from router.core.attempt import Query
from router.core.live_signals import CALLS_FOR
from router.core.policy import Needs
from router.core.portfolio import parse_portfolio
from router.lab.local_bench import MAX_CHARS, build, parse_plan
from worker.models.backends import build_backend
from worker.models.extra_calls import with_extra_calls

# Configured prices (USD per 1M tokens, input and output alike), the demo's: plausible, not real.
PRICES = {"tiny": 0.02, "small": 0.08, "medium": 0.25}
MAX_TOKENS = 8


def portfolio(chain: list[str], template: str, threads: int):
    tiers = [{"name": t, "backend": {"kind": "llamacpp", "model": t, "n_ctx": 1024, "n_threads": threads,
                                     "max_tokens": MAX_TOKENS, "stop": ["\n"], "prompt_template": template},
              "price": {"input_per_mtok": PRICES[t], "output_per_mtok": PRICES[t]}} for t in chain]
    return parse_portfolio({"tiers": tiers, "policy": {"name": "every-tier"}}, base=Path("."),
                           where="record portfolio")


def response(r, backend) -> dict:
    """One model's answer as a line of the file: the answer call's own tokens, cost and
    latency, and its extra calls under `calls` (their cost is added only for the
    policies that read their signals)."""
    extra = r.meta.get("extra_calls", {})
    total = r.cost_usd if r.cost_usd is not None else backend.tier.price.cost(r.tokens_in, r.tokens_out)
    main_cost = total - extra.get("cost_usd", 0.0)
    tin = None if r.tokens_in is None else r.tokens_in - extra.get("tokens_in", 0)
    tout = None if r.tokens_out is None else r.tokens_out - extra.get("tokens_out", 0)
    return {"text": r.text, "cost_usd": main_cost, "latency_ms": r.latency_ms - extra.get("latency_ms", 0.0),
            "tokens_in": tin, "tokens_out": tout,
            "token_logprobs": [[t.token, t.logprob if math.isfinite(t.logprob) else None] for t in r.tokens or ()],
            "calls": extra.get("outputs", {})}


def record(out_path: Path, plan: str | None, seed: int, names: list[str], threads: int,
           signals_on: Sequence[str] | None, shard: tuple[int, int] = (0, 1), reverse: bool = False,
           limit: int | None = None, *, log: Callable[[str], None] = print) -> tuple[int, float]:
    """Append the questions of the draw not yet in `out_path` (those of shard i of n,
    from its end with `reverse`, at most `limit`): (questions written, seconds taken).
    Extra calls are made on the models in `signals_on` (default: all but the last)."""
    bench = build(parse_plan(plan), seed)
    pf = portfolio(names, bench.template, threads)
    done: set[str] = set()
    if out_path.exists():
        for line in out_path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                done.add(json.loads(line)["id"])
    i_shard, n_shard = shard
    todo = [q for k, q in enumerate(bench.questions) if k % n_shard == i_shard and q.id not in done]
    if reverse:
        todo.reverse()
    if limit is not None:
        todo = todo[:limit]
    with_signals = set(names[:-1] if signals_on is None else signals_on)
    needs = {t: Needs(signals=tuple(CALLS_FOR) if t in with_signals else ()) for t in names}
    log(f"record: {len(bench.questions)} questions (seed {seed}, prompts <= {MAX_CHARS} chars, few-shot "
        f"examples {', '.join(bench.examples)}); {len(done)} already in {out_path}, {len(todo)} to do; "
        f"models {', '.join(names)}; configured prices (not real) "
        + ", ".join(f"{t} {PRICES[t]:g}" for t in names) + " USD per 1M tokens; extra calls on "
        + (", ".join(t for t in names if t in with_signals) or "none"))
    backends = [build_backend(t) for t in pf.tiers]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        with open(out_path, "a", encoding="utf-8") as f:
            for n, q in enumerate(todo, 1):
                query = Query(q.id, q.prompt, q.category)
                responses = {}
                for tier, b in zip(pf.tiers, backends):
                    r = with_extra_calls(b, query, needs[tier.name], b.generate(query, needs[tier.name]))
                    responses[tier.name] = response(r, b)
                f.write(json.dumps({"id": q.id, "split": q.split, "category": q.category,
                                    "responses": responses}, ensure_ascii=False) + "\n")
                f.flush()
                el = time.perf_counter() - started
                log(f"{n}/{len(todo)} {q.id} {el:.0f}s ({el / n:.1f}s per question)")
    finally:
        for b in backends:
            b.close()
    return len(todo), time.perf_counter() - started
