"""Post-hoc answer scorers: P(this answer is right | query, answer, earlier answers).

FrugalGPT's scorer g(q, a) reads the query and one model's answer and needs no
log-probs, only text. Here it is a logistic regression, fitted in the lab
(`router.lab.scoring`) and evaluated here at decide time, on:

- the answer's form: blank, log length in characters, words and lines, and
  whether it parses as the expected answer kind (`router.core.answers`);
- agreement: for each earlier tier of the chain, whether its answer is the same
  (0 when that tier gave none), so a tier's scorer knows when cheaper models
  said the same thing;
- optionally the tier's own confidence signals where the backend gives them
  (`signals`, e.g. p_true): the log-odds of each (`confidence_logit`) and a
  flag for "absent" (then the log-odds count 0);
- optionally checks of a worked numeric answer (`checks`: `router.core.worked`,
  does its arithmetic hold, does it use the question's numbers);
- optionally sentence embeddings (`router.core.embeddings`, 384 numbers each) of
  the query and of the answer;
- optionally the query's hashed words and word bigrams (`words` = the number of
  buckets, `router.core.features.hashed`, rows L2-normalised), so the scorer
  also knows which questions the tier tends to get wrong before reading its answer.

A scorer is plain JSON: {"kind", "agree", "signals", "checks", "text", "words", "bias", "w"}
with `w` one weight per feature in the order above (`checks` false and `words` 0
when absent, so older scorers read unchanged). The lab fits on standardised features
and folds the scaling into `w` and `bias`, so deciding is one dot product.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from . import embeddings, worked
from .answers import KINDS, normalize_answer, same_answer
from .errors import PolicyError
from .features import hashed, text_features
from .policy import finite_number
from .signals import SIGNALS, confidence_logit, get

FORM_FEATURES = ("blank", "log_chars", "log_words", "log_lines", "parsed")

TEXT_BLOCKS = ("query", "answer")
EMBED_DIM = 384
WEIGHT_DECIMALS = 6
_MAX_CACHED = 200_000

# sentence vectors by text: the lab replays one fitted policy many times over the
# same rows, and a worker sees the same prompt once per tier of a query
_VECTORS: dict[str, np.ndarray] = {}


def signal_features(signals: Mapping[str, float], names: Sequence[str]) -> list[float]:
    out: list[float] = []
    for s in names:
        v = get(signals, s)
        out += [0.0, 1.0] if v is None else [confidence_logit(s, v), 0.0]
    return out


def embed_missing(texts: Sequence[str | None]) -> None:
    """Embed, in one batch, the texts not in the process's cache yet."""
    missing = list(dict.fromkeys(t for t in texts if t and t.strip() and t not in _VECTORS))
    if missing:
        if len(_VECTORS) + len(missing) > _MAX_CACHED:
            _VECTORS.clear()
        for t, v in zip(missing, embeddings.embed(missing)):
            _VECTORS[t] = np.asarray(v, dtype=np.float64)


def text_vectors(texts: Sequence[str | None]) -> np.ndarray:
    """(n, 384) sentence vectors; zeros for a missing or blank text."""
    embed_missing(texts)
    zero = np.zeros(EMBED_DIM)
    return np.array([_VECTORS.get(t, zero) if t and t.strip() else zero for t in texts]).reshape(len(texts), EMBED_DIM)


def form_features(answer: str | None, kind: str) -> list[float]:
    if answer is None or not answer.strip():
        return [1.0, 0.0, 0.0, 0.0, 0.0]
    return [0.0, math.log1p(len(answer)), math.log1p(len(answer.split())), math.log1p(answer.count("\n")),
            float(normalize_answer(answer, kind) is not None)]


def feature_matrix(prompts: Sequence[str], answers: Sequence[str | None], earlier: Sequence[Sequence[str | None]],
                   confidences: Sequence[Mapping[str, float]], kind: str, agree: int, signals: Sequence[str],
                   text: Sequence[str], checks: bool = False, words: int = 0) -> np.ndarray:
    """Features of n (prompt, answer, earlier answers, the answer's signals), in a scorer's order."""
    rows = []
    for p, a, e, c in zip(prompts, answers, earlier, confidences):
        if len(e) != agree:
            raise ValueError(f"scorer compares with {agree} earlier answer(s), got {len(e)}")
        rows.append(form_features(a, kind) + [float(same_answer(a, x, kind)) for x in e]
                    + signal_features(c, signals) + (worked.features(p, a) if checks else []))
    head = head_count(agree, signals, checks)
    blocks = [np.array(rows, dtype=np.float64).reshape(len(answers), head)]
    if "query" in text:
        blocks.append(text_vectors(prompts))
    if "answer" in text:
        blocks.append(text_vectors(answers))
    if words:
        blocks.append(hashed(list(prompts), words).toarray())
    return np.hstack(blocks)


def head_count(agree: int, signals: Sequence[str], checks: bool = False) -> int:
    """The features before the embedding and word blocks."""
    return len(FORM_FEATURES) + agree + 2 * len(signals) + (len(worked.FEATURES) if checks else 0)


def feature_count(agree: int, signals: Sequence[str], text: Sequence[str], checks: bool = False,
                  words: int = 0) -> int:
    return head_count(agree, signals, checks) + EMBED_DIM * len(text) + words


KEYS = ("kind", "agree", "signals", "checks", "text", "words", "bias", "w")
MAX_WORDS = 1 << 16


class AnswerScorer:
    def __init__(self, d: Mapping[str, Any], what: str = "scorer"):
        if not isinstance(d, Mapping):
            raise PolicyError(f"{what} must be an object {{{', '.join(KEYS)}}}")
        unknown = set(d) - set(KEYS)
        if unknown:
            raise PolicyError(f"{what}: unknown key(s) {sorted(unknown)}; known: {', '.join(KEYS)}")
        self.kind = str(d.get("kind", "auto"))
        if self.kind not in KINDS:
            raise PolicyError(f"{what}.kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        agree = d.get("agree", 0)
        if isinstance(agree, bool) or not isinstance(agree, int) or agree < 0:
            raise PolicyError(f"{what}.agree must be a whole number >= 0, got {agree!r}")
        self.agree = agree
        signals = d.get("signals", [])
        if isinstance(signals, str) or not isinstance(signals, Sequence) or any(x not in SIGNALS for x in signals):
            raise PolicyError(f"{what}.signals must be a list of signal names from {', '.join(SIGNALS)}, "
                              f"got {signals!r}")
        self.signals = tuple(signals)
        text = d.get("text", [])
        if isinstance(text, str) or not isinstance(text, Sequence) or any(t not in TEXT_BLOCKS for t in text):
            raise PolicyError(f"{what}.text must be a list drawn from {list(TEXT_BLOCKS)}, got {text!r}")
        self.text = tuple(t for t in TEXT_BLOCKS if t in text)
        checks = d.get("checks", False)
        if not isinstance(checks, bool):
            raise PolicyError(f"{what}.checks must be true or false, got {checks!r}")
        self.checks = checks
        words = d.get("words", 0)
        if isinstance(words, bool) or not isinstance(words, int) or not 0 <= words <= MAX_WORDS:
            raise PolicyError(f"{what}.words must be a number of hash buckets from 0 to {MAX_WORDS}, got {words!r}")
        self.words = words
        if self.text and not embeddings.available():
            raise PolicyError(f"{what} reads sentence embeddings of the {' and '.join(self.text)}, and they are "
                              f"not available here (install the embeddings extra)")
        self.bias = finite_number(d.get("bias", 0.0), f"{what}.bias")
        w = d.get("w")
        n = feature_count(self.agree, self.signals, self.text, self.checks, self.words)
        if isinstance(w, str) or not isinstance(w, Sequence) or len(w) != n:
            raise PolicyError(f"{what}.w must be a list of {n} weights ({len(FORM_FEATURES)} form, {self.agree} "
                              f"agreement, 2 per signal, {len(worked.FEATURES) if self.checks else 0} checks, "
                              f"{EMBED_DIM} per text block, {self.words} words)")
        self.w = np.array([finite_number(x, f"{what}.w") for x in w])

    def score(self, prompt: str, answer: str | None, earlier: Sequence[str | None],
              signals: Mapping[str, float] | None = None) -> float:
        # the same sum as feature_matrix(...) @ w, the words as a sparse dot product
        # (the lab replays a scorer over thousands of rows)
        x = feature_matrix([prompt], [answer], [list(earlier)], [signals or {}], self.kind, self.agree, self.signals,
                           self.text, self.checks)[0]
        z = float((x * self.w[: x.size]).sum()) + self.bias
        if self.words:
            idx, vals = text_features(prompt, self.words)
            z += float(vals @ self.w[x.size:][idx])
        return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0

    def params(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"checks": True} if self.checks else {}
        if self.words:
            extra["words"] = self.words
        return {"kind": self.kind, "agree": self.agree, "signals": list(self.signals), **extra,
                "text": list(self.text), "bias": self.bias,
                "w": [float(x) for x in self.w]}
