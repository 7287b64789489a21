"""Answers in a canonical form, so two models' answers can be compared.

Cross-model agreement (an answer that matches an earlier tier's) and
pseudo-labels (an answer that matches a trusted model's) both ask "do these
two texts give the same answer?". The answer kinds:

- "choice": a multiple-choice letter A-H. "B", "(B)", "B)", "B: True, False",
  "Answer: B", "The answer is **B**." all give B.
- "number": the final number of a worked answer: the one after a "####" marker,
  else after "answer is", else the last number in the text. "1,000", "$1000.00"
  and "1e3" are the same number; "0.5" and "1/2" too (exact fractions, no float
  rounding).
- "text": a short free-text answer, compared after lower-casing, removing
  accents, punctuation and the articles a/an/the, and collapsing whitespace
  (the SQuAD / TriviaQA normalisation).

With kind "auto" a text is read as a choice when it is nothing but a letter
(wrapped in brackets or markup, or followed by ")" or ":" and the option text),
or says "answer is X" / "Answer: X" with X a letter; as a number when it carries
a "####" marker or is nothing but a number; otherwise as text. A caller that
knows the task (a multiple-choice exam, a maths word problem) passes the kind;
`infer_kind` picks it for a set of answers.

A missing or blank answer, or one with nothing of the asked kind in it, has no
canonical form (None) and agrees with nothing, not even another missing one.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterable, Literal

Kind = Literal["choice", "number", "text"]
KINDS: tuple[str, ...] = ("auto", "choice", "number", "text")

_LETTERS = "A-H"  # not I: a bare "I" is a cut-off "I cannot ..."
_MARKUP = r"[\s*_`'\"(\[{]*"
_BARE_CHOICE = re.compile(rf"^{_MARKUP}([{_LETTERS}])[\s*_`'\")\]}}.:]*$")
_LEADING_CHOICE = re.compile(rf"^{_MARKUP}([{_LETTERS}])\s*[):]")
_LEADING_CHOICE_DOT = re.compile(rf"^{_MARKUP}([{_LETTERS}])\s*[.)\]:]")
_SAID_CHOICE = re.compile(
    rf"\b(?i:answer|option|choice)\s*(?:is|:)?\s*(?i:option\s*|choice\s*)?:?\s*{_MARKUP}([{_LETTERS}])\b(?![\w'])"
)
_NUMBER = r"[-+]?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?(?:\s*/\s*\d+)?|[-+]?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
_MARKER = re.compile(rf"####\s*({_NUMBER})")
_SAID_NUMBER = re.compile(rf"answer\s*(?:is|:|=)\s*[^\d\-+$.]{{0,12}}({_NUMBER})", re.IGNORECASE)
_BARE_NUMBER = re.compile(rf"^\s*({_NUMBER})\s*(?:%|\.)?\s*$")
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")


@dataclass(frozen=True)
class Answer:
    kind: Kind
    value: str


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown answer kind {kind!r}; known: {', '.join(KINDS)}")
    return kind


def _number_value(raw: str) -> str | None:
    s = raw.replace(",", "").replace("$", "").replace(" ", "")
    try:
        if "/" in s:
            num, den = s.split("/")
            if Fraction(den) == 0:
                return None
            return str(Fraction(num) / Fraction(den))
        return str(Fraction(s))
    except (ValueError, ZeroDivisionError):
        return None


def _choice(text: str, loose: bool) -> str | None:
    if loose and _BARE_CHOICE.match(text.upper()):  # a lone lower-case letter, when a letter is expected
        return _BARE_CHOICE.match(text.upper()).group(1)
    for pattern in (_BARE_CHOICE, _LEADING_CHOICE_DOT if loose else _LEADING_CHOICE, _SAID_CHOICE):
        m = pattern.search(text)
        if m:
            return m.group(1).upper()
    return None


def _number(text: str, loose: bool) -> str | None:
    m = _MARKER.search(text) or _BARE_NUMBER.match(text)
    if m is None and loose:
        said = list(_SAID_NUMBER.finditer(text))
        if said:
            return _number_value(said[-1].group(1))
        found = _NUMBER_RE.findall(text)
        return _number_value(found[-1]) if found else None
    return _number_value(m.group(1)) if m else None


def normalize_text(text: str) -> str:
    """Lower case, no accents, no punctuation, no articles, single spaces."""
    s = unicodedata.normalize("NFKD", text)
    s = "".join(c for c in s if not unicodedata.combining(c)).lower()
    s = "".join(" " if unicodedata.category(c).startswith(("P", "S")) else c for c in s)
    return " ".join(_ARTICLES.sub(" ", s).split())


def normalize_answer(text: str | None, kind: str = "auto") -> Answer | None:
    """The canonical answer in `text` (see the module doc), or None."""
    _check_kind(kind)
    if text is None or not text.strip():
        return None
    t = text.strip()
    if kind in ("auto", "choice"):
        letter = _choice(t, loose=kind == "choice")
        if letter is not None:
            return Answer("choice", letter)
        if kind == "choice":
            return None
    if kind in ("auto", "number"):
        num = _number(t, loose=kind == "number")
        if num is not None:
            return Answer("number", num)
        if kind == "number":
            return None
    norm = normalize_text(t)
    return Answer("text", norm) if norm else None


def same_answer(a: str | None, b: str | None, kind: str = "auto") -> bool:
    """True when both texts carry an answer and it is the same one."""
    x, y = normalize_answer(a, kind), normalize_answer(b, kind)
    return x is not None and x == y


def infer_kind(texts: Iterable[str | None], share: float = 0.6) -> Kind:
    """The kind most answers in `texts` are: "choice" when at least `share` of the
    non-blank ones read as a letter in "auto", else "number" when at least `share`
    carry a number, else "text"."""
    given = [t for t in texts if t is not None and t.strip()]
    if not given:
        return "text"
    auto = [normalize_answer(t) for t in given]
    if sum(a is not None and a.kind == "choice" for a in auto) >= share * len(given):
        return "choice"
    if sum(a is not None and a.kind == "number" for a in auto) >= share * len(given):
        return "number"
    if sum(_NUMBER_RE.search(t) is not None and len(t) > 40 for t in given) >= share * len(given):
        return "number"  # worked answers (reasoning, then a number) without a marker
    return "text"
