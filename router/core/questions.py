"""The shared question sets (benchmarks/questions): prompts, gold answers, grading.

A live recording (data/local-bench) keeps only what the models produced, keyed by
question id; the question text and the gold answer are joined from the shared
files when the recording is read (`join`, called by `router.core.records` for a row
without a prompt), and each response is graded there. The shared directory is
$CASCADE_SHARED, else ../shared.

Ids name their set: `mmlu-dev-3` (mmlu.dev), `gsm8k-test-12`, `bbh-boolean_expressions-7`.
Splits: MMLU dev and GSM8K train are "train", MMLU test and GSM8K test are "test";
a BBH task has one file, its even-numbered items are "train" and odd ones "test".
Prompts are short-answer: MMLU with its lettered choices (the answer is a letter),
GSM8K as asked (a number, no worked solution), BBH as asked (a word).
"""
from __future__ import annotations

import gzip
import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from .answers import same_answer
from .errors import RecordsError

_ID = re.compile(r"(mmlu|gsm8k)-(dev|train|test)-(\d+)|bbh-([a-z_]+)-(\d+)")
_FILES = {("mmlu", "dev"): "mmlu.dev", ("mmlu", "test"): "mmlu.test", ("gsm8k", "train"): "gsm8k.train",
          ("gsm8k", "test"): "gsm8k.test"}
INSTRUCTION = "Answer each question with just the answer: a letter, a number, or a word."


@dataclass(frozen=True)
class Question:
    id: str
    set: str  # mmlu.test, gsm8k.train, bbh/boolean_expressions, ...
    prompt: str
    gold: str
    kind: str  # answer kind for grading (router.core.answers): choice | number | text
    split: str
    category: str


def shared_dir() -> Path:
    return Path(os.environ.get("CASCADE_SHARED") or "../shared").expanduser()


def is_shared_question(qid: Any) -> bool:
    return isinstance(qid, str) and _ID.fullmatch(qid) is not None


def set_of(qid: str) -> str:
    m = _ID.fullmatch(qid)
    if not m:
        raise RecordsError(f"{qid!r} is not the id of a shared question (mmlu-test-N, gsm8k-train-N, bbh-<task>-N)")
    if m.group(4):
        return f"bbh/{m.group(4)}"
    key = (m.group(1), m.group(2))
    if key not in _FILES:
        raise RecordsError(f"{qid!r}: no shared question file {m.group(1)}.{m.group(2)}")
    return _FILES[key]


def prompt_of(raw: dict[str, Any], qset: str) -> tuple[str, str, str]:
    """(prompt, kind, category) of one shared question."""
    if qset.startswith("mmlu"):
        choices = "\n".join(f"{'ABCDEFGH'[i]}. {c}" for i, c in enumerate(raw["choices"]))
        return f"{raw['question']}\n{choices}", "choice", "mmlu"
    if qset.startswith("gsm8k"):
        return raw["question"], "number", "gsm8k"
    return raw["input"], "text", qset.replace("/", "-")


@lru_cache(maxsize=32)
def load_set(qset: str, shared: str | None = None) -> dict[str, Question]:
    """Every question of one shared file, by id."""
    path = Path(shared) if shared else shared_dir()
    f = path / "benchmarks" / "questions" / f"{qset}.jsonl.gz"
    if not f.exists():
        raise RecordsError(f"shared question file {f} not found: set CASCADE_SHARED to the shared directory "
                           f"(the one holding benchmarks/questions)")
    out: dict[str, Question] = {}
    with gzip.open(f, "rt", encoding="utf-8") as fh:
        for n, line in enumerate(fh):
            raw = json.loads(line)
            prompt, kind, category = prompt_of(raw, qset)
            if qset.startswith("bbh/"):
                split = "train" if n % 2 == 0 else "test"
            else:
                split = "train" if qset.endswith((".dev", ".train")) else "test"
            out[raw["id"]] = Question(raw["id"], qset, prompt, str(raw["gold"]), kind, split, category)
    return out


def question(qid: str, shared: str | None = None) -> Question:
    qs = load_set(set_of(qid), shared)
    if qid not in qs:
        raise RecordsError(f"question {qid!r} is not in the shared file {set_of(qid)}")
    return qs[qid]


def grade(text: str | None, q: Question) -> float:
    if q.kind == "text":
        # BBH golds are words (True, no, Yes): the first word of the answer
        words = (text or "").strip().split()
        text = words[0] if words else None
    return 1.0 if same_answer(text, q.gold, q.kind) else 0.0


def join(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """A recorded row without a prompt, completed from the shared question it names:
    prompt, gold, category, split (unless given), each response's `correct` (unless given)."""
    try:
        q = question(str(raw.get("id")))
    except RecordsError as e:
        raise RecordsError(f"{where}: {e}") from None
    responses = raw.get("responses")
    if isinstance(responses, dict):
        responses = {m: ({**r, "correct": grade(r.get("text"), q)} if isinstance(r, dict) and r.get("correct") is None
                         else r) for m, r in responses.items()}
    return {**raw, "prompt": q.prompt, "gold": q.gold, "category": raw.get("category") or q.category,
            "split": raw.get("split") or q.split, "responses": responses}


def few_shot_template(examples: list[tuple[str, str]]) -> str:
    """A completion prompt: the instruction, the examples, then {prompt}."""
    blocks = [INSTRUCTION] + [f"Question: {q}\nAnswer: {a}" for q, a in examples]
    return "\n\n".join(blocks) + "\n\nQuestion: {prompt}\nAnswer:"
