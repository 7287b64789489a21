"""`cascade bench speculative`: a speculative cascade tier against its two models alone.

GSM8K questions drawn (seeded) from the shared question set's test split, read in
place; every system answers the same few-shot completion prompt (four worked
examples from the train split, answer after "####"), greedily, with the same stop
sequences and token budget: the 1.5B model alone (the llamacpp backend), the 0.5B
alone, and the speculative backend with each rule asked for. The systems take
turns question by question, so a slow spell of this shared machine hits all of
them. Reported: accuracy (the final number against the gold one), generated tokens
per second of model time, seconds per question, and for the speculative tiers the
drafted / accepted / deferred counts; ratios against the 1.5B alone.
"""
from __future__ import annotations

import gzip
import json
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from router.core.answers import same_answer
from router.core.attempt import Query
from router.core.errors import UserError
from router.core.policy import Needs
from router.core.portfolio import BackendSpec, Tier
from router.core.speculative import DeferralRule, SpeculativeError
from worker.models.backends import Backend, BackendFailure, build_backend

INSTRUCTION = "Solve each problem step by step, then give the final answer as a number after ####."
STOP = ("\n\n", "Question:")
N_SHOTS = 4


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    gold: str


@dataclass
class SpecBenchConfig:
    shared: Path  # the shared data folder (its benchmarks/questions is read in place)
    n: int = 30
    seed: int = 0
    specs: tuple[str, ...] = ("opt:0.3",)  # rule[:alpha] per speculative tier
    gamma: int = 4
    max_tokens: int = 160
    threads: int | None = None
    log: Callable[[str], None] = print


@dataclass
class _System:
    name: str
    backend: Backend
    right: int = 0
    tokens: int = 0
    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    texts: list[str] = field(default_factory=list)


def _read(path: Path) -> list[dict]:
    if not path.is_file():
        raise UserError(f"question file {path} not found: set CASCADE_SHARED to the shared data folder")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _clean(solution: str) -> str:
    return re.sub(r"<<[^>]*>>", "", solution).strip()  # the calculator annotations


def few_shot_template(train: list[dict]) -> str:
    """Four short worked examples from the train split (the first ones of at most three steps)."""
    shots = [r for r in train if r["answer_text"].count("\n") <= 3 and len(r["answer_text"]) <= 260][:N_SHOTS]
    blocks = [f"Question: {r['question']}\nAnswer: {_clean(r['answer_text'])}" for r in shots]
    return INSTRUCTION + "\n\n" + "\n\n".join(blocks) + "\n\nQuestion: {prompt}\nAnswer:"


def draw_questions(test: list[dict], n: int, seed: int) -> list[Question]:
    rows = random.Random(seed).sample(test, min(n, len(test)))
    return [Question(r["id"], r["question"], r["gold"]) for r in rows]


def parse_spec(spec: str) -> DeferralRule:
    name, _, alpha = spec.partition(":")
    try:
        return DeferralRule(name, float(alpha) if alpha else 0.0)
    except ValueError as e:
        raise UserError(f"--spec {spec!r}: {e}") from None


def _tier(name: str, kind: str, template: str, cfg: SpecBenchConfig, **opts) -> Tier:
    common = {"n_ctx": 1024, "max_tokens": cfg.max_tokens, "stop": list(STOP), "prompt_template": template}
    if cfg.threads:
        common["n_threads"] = cfg.threads
    return Tier(name=name, backend=BackendSpec.model_validate({"kind": kind, **common, **opts}))


def run_speculative_bench(cfg: SpecBenchConfig) -> dict:
    qdir = cfg.shared / "benchmarks" / "questions"
    template = few_shot_template(_read(qdir / "gsm8k.train.jsonl.gz"))
    questions = draw_questions(_read(qdir / "gsm8k.test.jsonl.gz"), cfg.n, cfg.seed)
    try:
        rules = [parse_spec(s) for s in cfg.specs]
    except SpeculativeError as e:
        raise UserError(str(e)) from None
    tiers = [("medium alone", _tier("medium", "llamacpp", template, cfg, model="medium")),
             ("small alone", _tier("small", "llamacpp", template, cfg, model="small"))]
    for r in rules:
        tiers.append((f"speculative {r.name}" + (f" {r.alpha:g}" if r.name in ("chow", "diff", "opt") else ""),
                      _tier("spec", "speculative", template, cfg, gamma=cfg.gamma, rule=r.name, alpha=r.alpha)))
    systems: list[_System] = []
    try:
        for name, tier in tiers:
            cfg.log(f"loading {name} ...")
            systems.append(_System(name, build_backend(tier)))
        for i, q in enumerate(questions):
            line = []
            for s in systems:
                started = time.perf_counter()
                try:
                    r = s.backend.generate(Query(q.id, q.question), Needs(logprobs=True))
                except BackendFailure as e:
                    cfg.log(f"{q.id}: {s.name} failed: {e}")
                    s.texts.append("")
                    continue
                took = time.perf_counter() - started
                s.seconds += took
                s.tokens += r.tokens_out or 0
                ok = same_answer(r.text, q.gold, "number")
                s.right += ok
                s.texts.append(r.text)
                for k in ("drafted", "accepted", "deferred", "corrected", "blocks"):
                    if k in r.meta:
                        s.counts[k] = s.counts.get(k, 0) + int(r.meta[k])
                line.append(f"{s.name} {'right' if ok else 'wrong'} {r.tokens_out} tok {took:.1f}s")
            cfg.log(f"[{i + 1}/{len(questions)}] {q.id}: " + ", ".join(line))
    finally:
        for s in systems:
            s.backend.close()
    return _report(cfg, questions, systems)


def _report(cfg: SpecBenchConfig, questions: list[Question], systems: list[_System]) -> dict:
    n = len(questions)
    medium, small = systems[0], systems[1]
    out: dict = {"bench": "speculative", "dataset": "gsm8k", "split": "test", "questions": n, "seed": cfg.seed,
                 "question_ids": [q.id for q in questions], "gamma": cfg.gamma, "max_tokens": cfg.max_tokens,
                 "prompt": f"{N_SHOTS}-shot completion, greedy, stop {list(STOP)}", "systems": {}}
    for s in systems:
        row = {"model": getattr(s.backend, "model_name", s.name), "right": s.right, "accuracy": s.right / n,
               "tokens_out": s.tokens, "model_seconds": round(s.seconds, 2),
               "tokens_per_s": s.tokens / s.seconds if s.seconds else 0.0, "s_per_question": s.seconds / n}
        if s.counts:
            c = s.counts
            row.update(c)
            row["accept_rate"] = c["accepted"] / max(1, c["drafted"])  # drafted tokens that were emitted as drafted
            row["defer_rate"] = c["deferred"] / max(1, c["accepted"] + c["corrected"])  # of the decided tokens
            row["tokens_per_verifier_pass"] = (c["accepted"] + c["corrected"]) / max(1, c["blocks"])
            row["same_text_as_medium"] = sum(a == b for a, b in zip(s.texts, medium.texts))
            row["speed_vs_medium"] = _ratio(row["tokens_per_s"], medium.tokens / medium.seconds if medium.seconds else 0)
            row["time_vs_medium"] = _ratio(s.seconds, medium.seconds)
            row["accuracy_kept_vs_medium"] = _ratio(s.right, medium.right)
            row["time_vs_small"] = _ratio(s.seconds, small.seconds)
        out["systems"][s.name] = row
    return out


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def render(result: dict) -> str:
    lines = [f"cascade bench speculative: {result['questions']} GSM8K test questions (seed {result['seed']}), "
             f"{result['prompt']}, max {result['max_tokens']} tokens, gamma {result['gamma']}", "",
             f"{'system':<22}{'right':>10}{'tokens':>8}{'model s':>9}{'tok/s':>7}{'s/q':>8}"
             f"{'accept':>8}{'defer':>7}{'tok/pass':>9}{'time vs medium':>16}"]
    n = result["questions"]
    for name, r in result["systems"].items():
        extra = (f"{r['accept_rate']:>8.0%}{r['defer_rate']:>7.0%}{r['tokens_per_verifier_pass']:>9.2f}"
                 f"{r['time_vs_medium']:>16.0%}") if "accept_rate" in r else ""
        lines.append(f"{name:<22}{r['right']:>5}/{n:<4}{r['tokens_out']:>8}{r['model_seconds']:>9.1f}"
                     f"{r['tokens_per_s']:>7.2f}{r['s_per_question']:>8.2f}{extra}")
    return "\n".join(lines)
