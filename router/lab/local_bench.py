"""The local benchmark's question set and its few-shot prompt, drawn from the shared
question files (router.core.questions), seeded and reproducible.

Few-shot examples: the two shortest questions of MMLU dev and of GSM8K train, and the
first item of each BBH task; they are never drawn as benchmark questions. Questions
longer than `MAX_CHARS` characters are left out (the tiny model runs with a
1024-token context, and the extra calls repeat the question). The drawn questions
are shuffled together, so a recording stopped half-way still holds every set and
both splits in proportion.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from router.core.errors import UserError
from router.core.questions import Question, few_shot_template, load_set

MAX_CHARS = 600
# set -> questions drawn; BBH tasks hold both splits (even items train, odd test)
DEFAULT_PLAN: dict[str, int] = {
    "mmlu.dev": 40, "mmlu.test": 60, "gsm8k.train": 30, "gsm8k.test": 40,
    "bbh/boolean_expressions": 40, "bbh/sports_understanding": 40,
}


@dataclass(frozen=True)
class BenchSet:
    template: str
    examples: tuple[str, ...]  # ids of the few-shot examples
    questions: tuple[Question, ...]


def parse_plan(text: str | None) -> dict[str, int]:
    """`set=n,set=n` (e.g. mmlu.test=60,gsm8k.test=40), or the default plan."""
    if not text:
        return dict(DEFAULT_PLAN)
    plan = {}
    for part in text.split(","):
        name, _, n = part.strip().partition("=")
        if not n.strip().isdigit():
            raise UserError(f"--plan: {part!r} is not set=count (e.g. mmlu.test=60)")
        plan[name.strip()] = int(n)
    return plan


def _gold_text(q: Question) -> str:
    return q.gold


def build(plan: dict[str, int], seed: int = 0, shared: str | None = None) -> BenchSet:
    sets = {name: load_set(name, shared) for name in sorted(set(plan) | {"mmlu.dev", "gsm8k.train"})}
    examples: list[Question] = []
    for name in ("mmlu.dev", "gsm8k.train"):
        examples += sorted(sets[name].values(), key=lambda q: (len(q.prompt), q.id))[:2]
    for name in sorted(n for n in plan if n.startswith("bbh/")):
        examples.append(next(iter(sets[name].values())))
    used = {q.id for q in examples}
    rng = random.Random(seed)
    drawn: list[Question] = []
    for name, n in plan.items():
        pool = [q for q in sets[name].values() if q.id not in used and len(q.prompt) <= MAX_CHARS]
        if n > len(pool):
            raise UserError(f"--plan asks {n} questions of {name}, which has {len(pool)} usable ones")
        drawn += rng.sample(pool, n)
    rng.shuffle(drawn)
    template = few_shot_template([(q.prompt, _gold_text(q)) for q in examples])
    return BenchSet(template, tuple(q.id for q in examples), tuple(drawn))
