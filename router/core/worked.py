"""Checks of a worked (step-by-step) numeric answer that need no model: does its
arithmetic hold, does it use the question's numbers.

A maths word-problem answer shows its steps ("3 x 60 = 180", "<<3*60=180>>",
"\\frac{12}{2} = 6"); a step whose two sides differ is an arithmetic slip, and an
answer with one is rarely right (on routellm-gsm8k, Mixtral's answers with a slip
were right 14% of the time, the others 68%). A question number the answer never
mentions often means a misread question. These are read from the answer text
alone, so they work where the backend gives no confidence at all.

`features(prompt, answer)` gives FEATURES, in that order:

- `log_checked`: log(1 + the number of equalities both of whose sides are plain
  arithmetic (numbers, + - * / x, parentheses, %): the ones that can be checked);
- `slip`: 1 when at least one of them does not hold (within 1% or 0.011; a
  division whose result was rounded to a whole number holds; a `%` may mean
  /100 or not, either reading that holds counts);
- `slip_share`: the share of checked equalities that do not hold (0 if none);
- `unused_share`: the share of the distinct numbers of the question that the
  answer never writes (0 for a question without numbers);
- `final_fraction`: 1 when the answer's final number (after "####", else the last
  number) is not a whole number (word-problem answers mostly are).

Arithmetic is evaluated by a small parser (no `eval`): numbers, + - * /, unary
minus and parentheses; anything else makes a side uncheckable, and division by
zero too.
"""
from __future__ import annotations

import math
import re
from functools import lru_cache
from typing import Sequence

FEATURES: tuple[str, ...] = ("log_checked", "slip", "slip_share", "unused_share", "final_fraction")

_CALC = re.compile(r"<<([^<>=]+)=([^<>]+)>>")  # GSM8K's calculator annotations
_FRAC = re.compile(r"\\d?frac\{([^{}]+)\}\{([^{}]+)\}")
_RUN = re.compile(r"[0-9$.,()%+\-*/= ]*=[0-9$.,()%+\-*/= ]*")
_DIGIT = re.compile(r"\d")
_SINGLE = re.compile(r"\$?\d+(?:\.\d+)?%?")
_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d*)?|\.\d+)|(.))")
_QNUM = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?")
_FINAL = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")
_LATEX = (("\\times", "*"), ("×", "*"), ("\\cdot", "*"), ("\\div", "/"), ("÷", "/"), ("\\$", "$"), ("\\%", "%"),
          ("\\left", ""), ("\\right", ""), ("\\(", " "), ("\\)", " "), ("\\[", " "), ("\\]", " "))


def _prepare(text: str) -> str:
    text = _FRAC.sub(r"(\1)/(\2)", text)
    for a, b in _LATEX:
        text = text.replace(a, b)
    text = re.sub(r"(?<=[\d)])\s*[xX]\s*(?=[\d($])", "*", text)  # 3 x 60
    return re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)  # 1,000


def evaluate(expr: str) -> float | None:
    """The value of a plain arithmetic expression, or None (not plain arithmetic,
    division by zero, or no number in it)."""
    tokens: list[tuple[str, str]] = []
    for m in _TOKEN.finditer(expr):
        if m.group(1) is not None:
            tokens.append(("n", m.group(1)))
        elif m.group(2) is not None and not m.group(2).isspace():
            tokens.append(("o", m.group(2)))
    if not tokens or not any(k == "n" for k, _ in tokens):
        return None
    pos = 0

    def peek() -> tuple[str, str] | None:
        return tokens[pos] if pos < len(tokens) else None

    def atom() -> float:
        nonlocal pos
        t = peek()
        if t is None:
            raise ValueError
        pos += 1
        if t[0] == "n":
            return float(t[1])
        if t[1] == "-":
            return -atom()
        if t[1] == "(":
            v = expr_()
            if peek() != ("o", ")"):
                raise ValueError
            pos += 1
            return v
        raise ValueError

    def term() -> float:
        nonlocal pos
        v = atom()
        while peek() in (("o", "*"), ("o", "/")):
            op = tokens[pos][1]
            pos += 1
            r = atom()
            v = v * r if op == "*" else v / r
        return v

    def expr_() -> float:
        nonlocal pos
        v = term()
        while peek() in (("o", "+"), ("o", "-")):
            op = tokens[pos][1]
            pos += 1
            r = term()
            v = v + r if op == "+" else v - r
        return v

    try:
        v = expr_()
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    return v if pos == len(tokens) and math.isfinite(v) else None


def _readings(side: str) -> list[float]:
    side = side.replace("$", "")
    out = []
    for pct in (r"(\1/100)", r"\1"):
        v = evaluate(re.sub(r"(\d+(?:\.\d+)?)\s*%", pct, side))
        if v is not None:
            out.append(v)
    return out


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= max(0.011, 0.01 * abs(b))


def holds(left: str, right: str) -> bool | None:
    """Whether `left = right` holds; None when either side is not plain arithmetic."""
    lv, rv = _readings(left), _readings(right)
    if not lv or not rv:
        return None
    return any(_close(a, b) or ("/" in left and _close(round(a), b)) for a in lv for b in rv)


def equalities(text: str) -> list[bool]:
    """Whether each checkable equality of a worked answer holds, in order."""
    out: list[bool] = []
    for m in _CALC.finditer(text):
        h = holds(_prepare(m.group(1)), _prepare(m.group(2)))
        if h is not None:
            out.append(h)
    for line in _prepare(_CALC.sub(" ", text)).split("\n"):
        for m in _RUN.finditer(line):
            parts = [p.strip(" .,") for p in m.group(0).split("=")]
            before, after = line[: m.start()].rstrip(), line[m.end():]
            if not before and re.match(r"-\s", parts[0]):  # a list bullet, not a minus
                parts[0] = parts[0][1:].strip()
            for i, (left, right) in enumerate(zip(parts, parts[1:])):
                if not _DIGIT.search(left) or not _DIGIT.search(right):
                    continue
                # a side cut out of a longer expression written partly in words:
                # "25% of $20 = ...", "2U + K - 17 = 411", "8 = 2x", "x * 20 = 20 * 0.25"
                if i == 0 and before and (before[-1].isalpha() or before[-1] in "}_^") and (
                        _SINGLE.fullmatch(left) or re.match(r"[-+*/]", left)):
                    continue
                if i == len(parts) - 2 and after[:1].isalpha() and not m.group(0).endswith(" "):
                    continue
                if re.match(r"[*/+]", left) or re.search(r"[-+*/(]$", left) or re.search(r"[-+*/]$", right):
                    continue
                if re.match(r"[*/+-]", right) and not re.match(r"-\s*\$?\d", right):
                    continue
                h = holds(left, right)
                if h is not None:
                    out.append(h)
    return out


def _numbers(text: str) -> set[float]:
    out = set()
    for s in _QNUM.findall(text):
        try:
            out.add(float(s.replace(",", "")))
        except ValueError:
            pass
    return out


def final_number(text: str) -> float | None:
    m = _FINAL.findall(text)
    raw = m[-1] if m else (_QNUM.findall(text) or [None])[-1]
    if raw is None:
        return None
    try:
        return float(raw.replace(",", ""))
    except ValueError:
        return None


def features(prompt: str, answer: str | None) -> list[float]:
    """FEATURES of one (question, worked answer); all 0 for a missing answer (a new list each call)."""
    return list(_features(prompt, answer))


@lru_cache(maxsize=65536)
def _features(prompt: str, answer: str | None) -> tuple[float, ...]:
    if answer is None or not answer.strip():
        return (0.0,) * len(FEATURES)
    eqs = equalities(answer)
    slips = sum(1 for h in eqs if not h)
    q = _numbers(prompt)
    used = _numbers(answer)
    unused = sum(1 for x in q if x not in used) / len(q) if q else 0.0
    f = final_number(answer)
    return (math.log1p(len(eqs)), float(slips > 0), slips / len(eqs) if eqs else 0.0, unused,
            float(f is not None and abs(f - round(f)) > 1e-9))


def feature_rows(prompts: Sequence[str], answers: Sequence[str | None]) -> list[list[float]]:
    return [features(p, a) for p, a in zip(prompts, answers)]
