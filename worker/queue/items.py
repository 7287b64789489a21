"""Input items: every line of a batch's input becomes an item, good or bad.

A line that cannot be a job becomes an item carrying an error that names the
line; the submitter stores it as a failed job, so a batch's counts add up and
nothing is silently dropped. "Cannot be a job" covers whatever the database or a
JSON column would refuse later, so one line never takes its batch down: bytes
that are not UTF-8, text that is not JSON, NaN/Infinity or a number too large
for a float, NUL characters and lone surrogates (PostgreSQL stores neither),
nesting deeper than MAX_DEPTH, a line above MAX_LINE_BYTES, an id too long for
its column, no prompt, and an id another line already uses (the keys given to
bad lines never take a real id: they step aside).
"""
from __future__ import annotations

import gzip
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from router.core.errors import UserError
from worker.job.request import RequestError, job_input
from worker.job.storable import MAX_DEPTH, bad_text, storable

MAX_KEY = 150  # + ":" + a batch id of at most MAX_BATCH_ID = the jobs.id column (200)
MAX_BATCH_ID = 49
MAX_LINE_BYTES = 8 * 1024 * 1024
# Input fields kept on the job; recorded responses of a benchmarks file are not.
_DROP = ("responses",)


class InputError(UserError):
    """An input file that cannot be read at all (a bad line is a failed item, not this)."""


@dataclass
class Item:
    key: str
    seq: int
    data: dict[str, Any] | None = None  # id, prompt, ... (None when the line is bad)
    error: str | None = None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"the number {text[:20]} is too large for a float")
    return v


def parse_line(line: str) -> Any:
    """json.loads without Python's extensions (NaN, Infinity) or numbers that become
    infinite; ValueError (or RecursionError) for anything else it cannot read."""
    return json.loads(line, parse_constant=_no_constant, parse_float=_finite_float)


def item_from(raw: Any, seq: int, where: str) -> Item:
    """One input record -> a job's input, or an error naming the record and field."""
    if not isinstance(raw, dict):
        return Item(f"line-{seq}", seq, error=f"{where}: expected a JSON object, got {type(raw).__name__}")
    rid = raw.get("id")
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int)) or str(rid) == ""):
        return Item(f"line-{seq}", seq, error=f"{where}: id must be a non-empty string or integer")
    key = str(rid) if rid is not None else f"line-{seq}"
    if len(key) > MAX_KEY:
        return Item(f"line-{seq}", seq, error=f"{where}: id is longer than {MAX_KEY} characters")
    why = bad_text(key, "id")
    if why:
        return Item(f"line-{seq}", seq, error=f"{where}: {why}")
    try:
        data = job_input({k: v for k, v in raw.items() if k not in _DROP})
    except RequestError as e:
        return Item(key, seq, error=f"{where}: {e}")
    why = storable(data)
    if why:
        return Item(key, seq, error=f"{where}: {why}")
    data["id"] = key
    return Item(key, seq, data=data)


def _raw_lines(p: Path):
    """(line number, bytes) of every non-blank line; decoding is per line, so one
    line's bad bytes fail that line only."""
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rb") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield n, line


def _line_item(n: int, line: bytes, where: str, split: str | None) -> Item | None:
    if len(line) > MAX_LINE_BYTES:
        return Item(f"line-{n}", n, error=f"{where}: {len(line)} bytes, above the limit of {MAX_LINE_BYTES}")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return Item(f"line-{n}", n, error=f"{where}: not valid UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1})")
    try:
        raw = parse_line(text)
    except json.JSONDecodeError as e:
        return Item(f"line-{n}", n, error=f"{where}: not valid JSON ({e.msg} at column {e.colno})")
    except ValueError as e:  # NaN, Infinity, 1e999, an integer of thousands of digits
        return Item(f"line-{n}", n, error=f"{where}: not valid JSON ({e})")
    except RecursionError:
        return Item(f"line-{n}", n, error=f"{where}: nested deeper than {MAX_DEPTH} levels")
    if split is not None and isinstance(raw, dict) and raw.get("split") != split:
        return None
    return item_from(raw, n, where)


def read_items(path: str | Path, *, split: str | None = None, limit: int | None = None) -> list[Item]:
    """Items of a JSONL (or .jsonl.gz) file, numbered by line; bad lines kept as errors."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"input file {str(p)!r} does not exist")
    items: list[Item] = []
    try:
        for n, line in _raw_lines(p):
            item = _line_item(n, line, f"{p.name}: line {n}", split)
            if item is None:
                continue
            items.append(item)
            if limit is not None and len(items) >= limit:
                break
    except (OSError, EOFError) as e:
        raise InputError(f"cannot read {p}: {e}") from None
    return unique_keys(items, lambda n: f"{p.name}: line {n}", "line")


def items_from_dicts(rows: Iterable[dict[str, Any]]) -> list[Item]:
    items = [item_from(raw, n, f"item {n}") for n, raw in enumerate(rows, 1)]
    return unique_keys(items, lambda n: f"item {n}", "item")


def unique_keys(items: list[Item], where, unit: str) -> list[Item]:
    """Every item under its own key: a second use of an id fails that line, naming the
    first; the key of a bad line steps aside (line-7~2) from any id a good line uses."""
    taken = {it.key for it in items if it.error is None}
    seen: dict[str, int] = {}
    out = []
    for it in items:
        if it.error is None and it.key in seen:
            it = Item(f"line-{it.seq}", it.seq, error=f"{where(it.seq)}: id {it.key!r} already used on {unit} {seen[it.key]}")
        if it.error is not None:
            key, k = it.key, 1
            while key in taken or key in seen:
                k += 1
                key = f"{it.key}~{k}"
            it = Item(key, it.seq, error=it.error)
        else:
            taken.add(it.key)
        seen[it.key] = it.seq
        out.append(it)
    return out
