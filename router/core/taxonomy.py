"""A small query taxonomy detected from the text, and answer keys for judging agreement.

    detect(prompt) -> one of CLASSES
    answer_key(text) -> a normalised answer, so two models' answers can be compared

Select-then-route uses the row's own `category` when the traffic carries one (the
MMLU subject, say) and `detect` otherwise, so traffic without categories is still
split into classes a shortlist can be proven on. The rules are deliberately few
and readable; the first that matches wins:
- "code": a code fence, or a line that defines a function or class, or braces and
  semicolons together;
- "multiple-choice": at least two option lines such as "A) ...", "(B) ...", "C. ...";
- "math": at least two numbers and an arithmetic word or sign;
- "factual": a short question (at most 25 words) starting with a wh-word;
- "open": anything else.
"""
from __future__ import annotations

import re

CLASSES = ("code", "multiple-choice", "math", "factual", "open")

_CODE = re.compile(r"```|^\s*(def|class|function|public|#include)\b|\bimport\s+\w+", re.M)
_OPTION = re.compile(r"^\s*\(?[A-Ea-e][\).:]\s+\S", re.M)
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_ARITH = re.compile(r"[+\-*/=%$]|\b(how many|how much|total|sum|each|per|percent|times|twice|half|cost|left)\b", re.I)
_WH = re.compile(r"^\s*(who|what|when|where|which|why|how|whose|whom)\b", re.I)
_LETTER = re.compile(r"^\(?([A-Ea-e])(?:[\).:]|$)")


def detect(prompt: str) -> str:
    if _CODE.search(prompt) or ("{" in prompt and ";" in prompt):
        return "code"
    if len(_OPTION.findall(prompt)) >= 2:
        return "multiple-choice"
    if len(_NUMBER.findall(prompt)) >= 2 and _ARITH.search(prompt):
        return "math"
    if _WH.match(prompt) and len(prompt.split()) <= 25:
        return "factual"
    return "open"


def answer_key(text: str | None) -> str | None:
    """An option letter when the answer starts with one, else the last number when it
    holds one, else the lower-cased words; None for no answer."""
    if text is None:
        return None
    t = text.strip()
    m = _LETTER.match(t)
    if m:
        return m.group(1).upper()
    nums = _NUMBER.findall(t)
    if nums:
        n = nums[-1].replace(",", "")
        return n.rstrip("0").rstrip(".") if "." in n else n
    words = re.findall(r"[a-z0-9]+", t.lower())
    return " ".join(words) if words else None
