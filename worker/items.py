"""Input items: every line of a batch's input becomes an item, good or bad.

A line that cannot be a job (not JSON, no prompt, an id used twice...) becomes an
item carrying an error that names the line; the submitter stores it as a failed
job, so a batch's counts add up and nothing is silently dropped.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from router.core.errors import UserError
from router.core.records import iter_lines

from .request import RequestError, job_input

MAX_KEY = 150
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
    try:
        data = job_input({k: v for k, v in raw.items() if k not in _DROP})
    except RequestError as e:
        return Item(key, seq, error=f"{where}: {e}")
    data["id"] = key
    return Item(key, seq, data=data)


def read_items(path: str | Path, *, split: str | None = None, limit: int | None = None) -> list[Item]:
    """Items of a JSONL (or .jsonl.gz) file, numbered by line; bad lines kept as errors."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"input file {str(p)!r} does not exist")
    items: list[Item] = []
    seen: dict[str, int] = {}
    try:
        for n, line in iter_lines(p):
            where = f"{p.name}: line {n}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                item = Item(f"line-{n}", n, error=f"{where}: not valid JSON ({e.msg} at column {e.colno})")
            else:
                if split is not None and isinstance(raw, dict) and raw.get("split") != split:
                    continue
                item = item_from(raw, n, where)
            if item.key in seen:
                item = Item(f"line-{n}", n, error=f"{where}: id {item.key!r} already used on line {seen[item.key]}")
            seen[item.key] = n
            items.append(item)
            if limit is not None and len(items) >= limit:
                break
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {p}: {e}") from None
    return items


def items_from_dicts(rows: Iterable[dict[str, Any]]) -> list[Item]:
    items, seen = [], {}
    for n, raw in enumerate(rows, 1):
        item = item_from(raw, n, f"item {n}")
        if item.key in seen:
            item = Item(f"line-{n}", n, error=f"item {n}: id {item.key!r} already used by item {seen[item.key]}")
        seen[item.key] = n
        items.append(item)
    return items
