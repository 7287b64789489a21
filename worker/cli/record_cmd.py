"""`cascade record`: the local benchmark file, every local model on a shared question set.

    cascade record --out data/local-bench/local-bench.jsonl [--plan mmlu.test=60,...] [--limit N]

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

import click

from router.core.attempt import Query
from router.core.live_signals import CALLS_FOR
from router.core.policy import Needs
from router.core.portfolio import parse_portfolio
from router.lab.local_bench import MAX_CHARS, build, parse_plan
from worker.cli.common import user_errors
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


@click.command("record")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="the JSONL file to write (appended to; ids already in it are skipped)")
@click.option("--plan", default=None, help="questions per shared set, e.g. mmlu.test=60,gsm8k.test=40 "
                                           "(default: router.lab.local_bench.DEFAULT_PLAN)")
@click.option("--seed", default=0, show_default=True, type=int, help="seed of the draw")
@click.option("--chain", default="tiny,small,medium", show_default=True, help="local models, cheapest first")
@click.option("--threads", default=1, show_default=True, type=int,
              help="llama.cpp threads per model (1: on a busy machine more threads spin-wait on each other)")
@click.option("--signals-on", default=None,
              help="models whose extra calls are recorded (default: all but the last of the chain: a cascade "
                   "always accepts its last tier's answer, so no policy reads its live signals)")
@click.option("--shard", default="0/1", show_default=True,
              help="i/n: record only the questions whose position in the draw is i modulo n (parallel runs, "
                   "each with its own --out; concatenate them afterwards)")
@click.option("--reverse", is_flag=True,
              help="take the shard's questions from its end (a second run on the same shard, with its own --out, "
                   "meets the first in the middle; concatenate, keeping the first line of an id)")
@click.option("--limit", type=int, default=None, help="stop after this many new questions (a pilot)")
def record(out_path: Path, plan, seed, chain, threads, signals_on, shard, reverse, limit) -> None:
    """Record every local model's answers, token log-probs and extra-call signals on a shared question set."""
    with user_errors():
        bench = build(parse_plan(plan), seed)
        names = [c.strip() for c in chain.split(",") if c.strip()]
        pf = portfolio(names, bench.template, threads)
        done: set[str] = set()
        if out_path.exists():
            for line in out_path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    done.add(json.loads(line)["id"])
        try:
            i_shard, n_shard = (int(x) for x in shard.split("/"))
            assert 0 <= i_shard < n_shard
        except (ValueError, AssertionError):
            raise click.BadParameter(f"{shard!r} is not i/n with 0 <= i < n", param_hint="--shard") from None
        todo = [q for k, q in enumerate(bench.questions) if k % n_shard == i_shard and q.id not in done]
        if reverse:
            todo.reverse()
        if limit is not None:
            todo = todo[:limit]
        with_signals = set(names[:-1] if signals_on is None else [s.strip() for s in signals_on.split(",")])
        needs = {t: Needs(signals=tuple(CALLS_FOR) if t in with_signals else ()) for t in names}
        click.echo(f"record: {len(bench.questions)} questions (seed {seed}, prompts <= {MAX_CHARS} chars, few-shot "
                   f"examples {', '.join(bench.examples)}); {len(done)} already in {out_path}, {len(todo)} to do; "
                   f"models {', '.join(names)}; configured prices (not real) "
                   + ", ".join(f"{t} {PRICES[t]:g}" for t in names) + " USD per 1M tokens; extra calls on "
                   + (", ".join(t for t in names if t in with_signals) or "none"), err=True)
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
                    click.echo(f"{n}/{len(todo)} {q.id} {el:.0f}s ({el / n:.1f}s per question)", err=True)
        finally:
            for b in backends:
                b.close()
    click.echo(f"wrote {len(todo)} questions to {out_path} in {time.perf_counter() - started:.0f}s")
