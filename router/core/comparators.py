"""Do two answers say the same thing? The comparator behind pseudo-labels.

A pseudo-label grades a model's answer by agreement with a trusted model's answer
(the top tier's), not with the truth. Two steps, so a caller can count what could
not be compared instead of grading it silently:

- `canonical(texts)`: each text's comparable form, or None when the text holds no
  answer of the expected kind (blank, a refusal where a letter was asked for, a
  worked answer with no number in it).
- `same(a, b)`: whether two canonical forms agree.

Comparators:
- "canonical": `router.core.answers` (multiple-choice letters, exact numbers,
  normalised short text) for a fixed kind ("choice", "number", "text"); kind
  "auto" is resolved by the caller from the reference's answers (`infer_kind`).
- "embedding": free text, by cosine similarity of MiniLM sentence embeddings
  (`router.core.embeddings`) of the normalised texts, at or above `similarity`;
  equal normalised texts agree without a model call.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from . import embeddings
from .answers import KINDS, infer_kind, normalize_answer, normalize_text
from .errors import UserError

COMPARATORS = ("canonical", "embedding")
MIXED_SHARE = 0.1


class ComparatorError(UserError):
    """A comparator that cannot be built as asked."""


class Comparator(ABC):
    name: str

    @abstractmethod
    def canonical(self, texts: Sequence[str | None]) -> list[Any | None]:
        """The comparable form of each text, None where it holds no answer."""

    @abstractmethod
    def same(self, a: Any, b: Any) -> bool:
        """Whether two canonical forms (neither None) agree."""

    def describe(self) -> str:
        return self.name


@dataclass
class CanonicalComparator(Comparator):
    kind: str = "auto"
    name: str = "canonical"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ComparatorError(f"unknown answer kind {self.kind!r}; known: {', '.join(KINDS)}")

    def canonical(self, texts: Sequence[str | None]) -> list[Any | None]:
        return [normalize_answer(t, self.kind) for t in texts]

    def same(self, a: Any, b: Any) -> bool:
        return a == b

    def describe(self) -> str:
        return f"canonical answers ({self.kind})"


@dataclass(frozen=True)
class _Embedded:
    text: str
    vector: np.ndarray

    def __eq__(self, other: object) -> bool:  # the vector is derived from the text
        return isinstance(other, _Embedded) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)


@dataclass
class EmbeddingComparator(Comparator):
    similarity: float = 0.85
    name: str = "embedding"

    def __post_init__(self) -> None:
        if not -1.0 <= self.similarity <= 1.0:
            raise ComparatorError(f"embedding similarity must lie in [-1, 1], got {self.similarity!r}")

    def canonical(self, texts: Sequence[str | None]) -> list[Any | None]:
        norm = [normalize_text(t) if t is not None else "" for t in texts]
        todo = sorted({n for n in norm if n})
        vectors = dict(zip(todo, embeddings.embed(todo))) if todo else {}
        return [_Embedded(n, vectors[n]) if n else None for n in norm]

    def same(self, a: Any, b: Any) -> bool:
        return a.text == b.text or float(np.dot(a.vector, b.vector)) >= self.similarity

    def describe(self) -> str:
        return f"embedding similarity >= {self.similarity:g} ({embeddings.MODEL_NAME})"


def make_comparator(name: str, *, kind: str = "auto", similarity: float = 0.85) -> Comparator:
    if name == "canonical":
        return CanonicalComparator(kind)
    if name == "embedding":
        return EmbeddingComparator(similarity)
    raise ComparatorError(f"unknown comparator {name!r}; known: {', '.join(COMPARATORS)}")


def resolved(comparator: Comparator, reference_texts: Sequence[str | None]) -> Comparator:
    """A canonical comparator of kind "auto" fixed to the kind most reference answers
    are, so every answer of the file is read the same way; when more than
    `MIXED_SHARE` of the reference's answers are not of that kind (mixed traffic:
    numbers and words), each answer is read by its own form instead ("auto")."""
    if isinstance(comparator, CanonicalComparator) and comparator.kind == "auto":
        kind = infer_kind(reference_texts)
        given = [t for t in reference_texts if t is not None and t.strip()]
        unread = sum(normalize_answer(t, kind) is None for t in given)
        return CanonicalComparator(kind if unread <= MIXED_SHARE * len(given) else "auto")
    return comparator
