"""Pseudo-labels: grade every model by agreement with a trusted reference model.

A team with traffic but no grades still has a model it trusts (the top tier). A
row's pseudo-label for model m is 1 when m's answer agrees with the reference's
answer (per a `router.core.comparators` comparator), else 0; the reference itself
gets 1. Quality tuned on such rows is agreement with the reference, not accuracy.

Nothing is graded silently:
- a row whose reference answer cannot be read (missing, blank, nothing of the
  expected kind) cannot be labelled: every model's `correct` is null there, and
  the rows are counted (`prepare` then drops them, with the reason);
- a candidate answer the comparator cannot read is counted per model and, by
  default, graded as disagreement (a cascade that accepted it would not be giving
  the reference's answer); with `unparsed="skip"` its `correct` is null instead.
Where the input also has real grades, how often the pseudo-label equals the real
grade is reported per model (the pseudo-labels' fidelity). The reference `"gold"`
grades against each row's `gold` answer instead: real grades, by the same comparator
(how a calibrated sample whose traffic carried gold answers is scored afterwards).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from router.core.comparators import Comparator, resolved
from router.core.records import Record, load_dataset, record_json, write_records

from .labelled import DataError

UNPARSED_MODES = ("disagree", "skip")
# as the reference: each row's own `gold` answer, i.e. real grades by the same comparator
GOLD = "gold"


@dataclass
class PseudoReport:
    reference: str
    comparator: str
    rows: int
    labelled_rows: int
    reference_unreadable: int  # rows left unlabelled: the reference gave no readable answer
    first_unreadable_id: str | None
    unparsed: dict[str, int]  # model -> answers the comparator could not read
    unparsed_mode: str
    agreement: dict[str, float]  # model -> share of labelled rows agreeing with the reference
    fidelity: dict[str, float] = field(default_factory=dict)  # model -> share where pseudo == real grade

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def lines(self) -> list[str]:
        out = [f"grades: `correct` = agreement with each row's gold answer ({self.comparator})"
               if self.reference == GOLD else
               f"pseudo-labels: `correct` = agreement with {self.reference!r} ({self.comparator}); "
               f"quality measured against that model, not against the truth",
               f"rows: {self.labelled_rows} of {self.rows} labelled"]
        if self.reference_unreadable:
            out.append(f"  {self.reference_unreadable} rows left unlabelled: {self.reference!r} gave no readable "
                       f"answer (first: id {self.first_unreadable_id})")
        what = "graded as disagreement" if self.unparsed_mode == "disagree" else "left unlabelled (correct null)"
        for m, a in self.agreement.items():
            extra = f", {self.unparsed[m]} unreadable answers {what}" if self.unparsed.get(m) else ""
            fid = "" if m not in self.fidelity else (
                f", the file's own `correct` matches on {self.fidelity[m]:.1%}" if self.reference == GOLD
                else f", pseudo = real grade on {self.fidelity[m]:.1%}")
            out.append(f"  {m}: agrees {a:.1%}{extra}{fid}")
        return out


def labels_note(reference: str) -> str:
    """The records' `labels` field: what their `correct` means."""
    return f"agreement with {reference!r}"


def pseudo_reference(note: str | None) -> str | None:
    """The reference model named by a records' `labels` field (None for real grades)."""
    prefix = "agreement with "
    if note and note.startswith(prefix):
        return note[len(prefix):].strip("'\"")
    return None


def most_accurate(records: Sequence[Record], models: Sequence[str]) -> str:
    """The model with the highest mean real `correct` on `records` (ties: later in order)."""
    best, best_acc = None, -1.0
    for m in models:
        graded = [r.responses[m].correct for r in records if m in r.responses and r.responses[m].correct is not None]
        if graded and sum(graded) / len(graded) >= best_acc:
            best, best_acc = m, sum(graded) / len(graded)
    if best is None:
        raise DataError("no model has a real `correct` grade on these rows: name the reference model")
    return best


def pseudo_label(records: Sequence[Record], reference: str, comparator: Comparator, *,
                 models: Sequence[str] | None = None, unparsed: str = "disagree") -> tuple[list[Record], PseudoReport]:
    """`records` with each model's `correct` replaced by agreement with `reference`."""
    if unparsed not in UNPARSED_MODES:
        raise DataError(f"unparsed answers: {unparsed!r}; known: {', '.join(UNPARSED_MODES)}")
    if not records:
        raise DataError("no rows to pseudo-label")
    models = list(models) if models else list(dict.fromkeys(m for r in records for m in r.responses))
    if reference == GOLD:
        ref_texts = [r.gold for r in records]
    elif reference not in models:
        raise DataError(f"reference model {reference!r} is not among the models: {', '.join(models)}")
    else:
        ref_texts = [r.responses[reference].text if reference in r.responses else None for r in records]
    comparator = resolved(comparator, ref_texts)
    ref_forms = comparator.canonical(ref_texts)
    forms = {m: comparator.canonical([r.responses[m].text if m in r.responses else None for r in records])
             for m in models if m != reference}
    counts = {m: [0, 0] for m in models}  # agreeing, labelled
    unread = {m: 0 for m in models}
    same_as_real = {m: [0, 0] for m in models}
    out: list[Record] = []
    skipped, first_skipped = 0, None
    for j, rec in enumerate(records):
        ref = ref_forms[j]
        labels: dict[str, float | None] = {}
        for m in models:
            if m not in rec.responses:
                continue
            if ref is None:
                labels[m] = None
            elif m == reference:
                labels[m] = 1.0
            elif forms[m][j] is None:
                unread[m] += 1
                labels[m] = 0.0 if unparsed == "disagree" else None
            else:
                labels[m] = 1.0 if comparator.same(forms[m][j], ref) else 0.0
            if labels[m] is not None:
                counts[m][0] += labels[m]
                counts[m][1] += 1
                real = rec.responses[m].correct
                if real is not None:
                    same_as_real[m][0] += (real >= 0.5) == (labels[m] >= 0.5)
                    same_as_real[m][1] += 1
        if ref is None:
            skipped += 1
            first_skipped = first_skipped or rec.id
        out.append(dataclasses.replace(rec, labels=None if reference == GOLD else labels_note(reference), responses={
            m: dataclasses.replace(r, correct=labels.get(m, r.correct)) for m, r in rec.responses.items()}))
    report = PseudoReport(
        reference=reference, comparator=comparator.describe(), rows=len(records),
        labelled_rows=len(records) - skipped, reference_unreadable=skipped, first_unreadable_id=first_skipped,
        unparsed={m: k for m, k in unread.items() if k}, unparsed_mode=unparsed,
        agreement={m: a / n for m, (a, n) in counts.items() if n},
        fidelity={m: a / n for m, (a, n) in same_as_real.items() if n},
    )
    return out, report


def label_file(path: str | Path, out: str | Path, comparator: Comparator, *, reference: str | None = None,
               unparsed: str = "disagree") -> PseudoReport:
    """Pseudo-label a benchmarks-format file and write it to `out` (`cascade pseudo-label`).
    The reference: the model named, "gold", or by default the most accurate by the
    file's own grades (on its train split if it has one)."""
    ds = load_dataset(path)
    if reference is None:
        train = ds.split("train") or ds.records
        reference = most_accurate(train, ds.models)
    elif reference not in ds.models and reference != GOLD:
        raise DataError(f"--reference {reference!r} is not in {Path(path).name}; models: "
                        f"{', '.join(ds.models)}")
    rows, report = pseudo_label(ds.records, reference, comparator, unparsed=unparsed)
    write_records(out, [record_json(r) for r in rows])
    return report
