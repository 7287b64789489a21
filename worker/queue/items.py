"""Input items: every line of a batch's input becomes an item, good or bad, under a
key of its own.

A line that cannot be a job becomes an item carrying an error that names the
line; the submitter stores it as a failed job, so a batch's counts add up and
nothing is silently dropped. "Cannot be a job" covers whatever the database or a
JSON column would refuse later, so one line never takes its batch down: bytes
that are not UTF-8, text that is not JSON, NaN/Infinity or a number too large
for a float, NUL characters and lone surrogates (PostgreSQL stores neither),
nesting deeper than MAX_DEPTH, a line above MAX_LINE_BYTES, an id too long for
its column, no prompt, and an id another line already uses.

One path reads a line (`read_line`) and one decides its key (`Keys`), for `cascade
run` (a whole file), the Python client and `POST /v1/batches` (streamed, a chunk at
a time: worker.queue.submit.BatchWriter).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import math
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

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
    given: bool = False  # the key is the line's own id (else its automatic key, line-N)
    wanted: str = ""  # the key it had before it stepped aside ("": it did not)


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
    return Item(key, seq, data=data, given=rid is not None)


def _raw_lines(p: Path):
    """(line number, bytes) of every non-blank line; decoding is per line, so one
    line's bad bytes fail that line only."""
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rb") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield n, line


def read_line(n: int, line: bytes, where: str, max_bytes: int = MAX_LINE_BYTES) -> Any:
    """One input line -> its parsed JSON value, or an Item carrying why it cannot be
    read, for any reason: its size, its encoding, its JSON, NaN, a number too large,
    its nesting. Never raises."""
    if len(line) > max_bytes:
        return too_long(n, len(line), where, max_bytes)
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return Item(f"line-{n}", n, error=f"{where}: not valid UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1})")
    try:
        return parse_line(text)
    except json.JSONDecodeError as e:
        return Item(f"line-{n}", n, error=f"{where}: not valid JSON ({e.msg} at column {e.colno})")
    except ValueError as e:  # NaN, Infinity, 1e999, an integer of thousands of digits
        return Item(f"line-{n}", n, error=f"{where}: not valid JSON ({e})")
    except RecursionError:
        return Item(f"line-{n}", n, error=f"{where}: nested deeper than {MAX_DEPTH} levels")


def too_long(n: int, size: int | None, where: str, max_bytes: int) -> Item:
    """The item of a line longer than `max_bytes` (its size, when it was read whole)."""
    what = "" if size is None else f"{size} bytes, "
    return Item(f"line-{n}", n, error=f"{where}: {what}longer than the limit of {max_bytes} bytes a line")


def _line_item(n: int, line: bytes, where: str, split: str | None) -> Item | None:
    raw = read_line(n, line, where)
    if isinstance(raw, Item):
        return raw
    if split is not None and isinstance(raw, dict) and raw.get("split") != split:
        return None
    return item_from(raw, n, where)


def iter_records(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value or an Item naming why the line cannot be read) of a
    JSONL(.gz) file, streamed (the Python client's batches)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"input file {str(p)!r} does not exist")
    try:
        for n, line in _raw_lines(p):
            yield n, read_line(n, line, f"line {n}")
    except (OSError, EOFError) as e:
        raise InputError(f"cannot read {p}: {e}") from None


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


def unique_keys(items: list[Item], where: Callable[[int], str], unit: str) -> list[Item]:
    """Every item of a whole input under its own key (see `Keys`)."""
    return Keys(where, unit).assign(items)


class Keys:
    """The one rule that gives each line its key, for `cascade run`, the client and the API:

    - a line's key is its id; a line without one, or whose id cannot be used, or that
      cannot be read at all, gets its automatic key `line-N` (N: its line number);
    - the ids of the good lines in view (the whole input for `cascade run`, a chunk of
      a streamed upload) are reserved first: an automatic key, or the key of a bad
      line, steps aside from them and from every key already given (`line-7~2`);
    - a good line whose id an earlier line holds fails, naming that line ("id 'a'
      already used on line 3"), under its own automatic key.

    So no line is ever dropped: every one is a job, or a failed job naming why. A
    streamed upload learns of a key held by an earlier chunk from the database
    (the insert's conflict), and `taken` applies the same rule to that line."""

    def __init__(self, where: Callable[[int], str], unit: str = "line"):
        self.where, self.unit = where, unit

    def assign(self, items: list[Item]) -> list[Item]:
        reserved = {it.key for it in items if it.error is None and it.given}
        held: dict[str, int] = {}
        out = []
        for it in items:
            if it.error is None and it.given and it.key in held:
                it = self.duplicate(it, held[it.key])
            if it.error is not None or not it.given:
                it = self.rekey(it, _aside(it.key, lambda k: k in reserved or k in held))
            held[it.key] = it.seq
            out.append(it)
        return out

    def taken(self, it: Item, first: int | None, attempt: int) -> Item:
        """`it` again, its key being held already by line `first` of an earlier chunk:
        a good line with its own id fails as a duplicate; any other key steps aside
        (`attempt`: the how-manieth time for this line)."""
        if it.error is None and it.given:
            return self.duplicate(it, first)
        key = f"{it.wanted or it.key}~{attempt + 2}" if attempt < 8 else f"line-{it.seq}~{uuid.uuid4().hex[:12]}"
        return self.rekey(it, key)

    def duplicate(self, it: Item, first: int | None) -> Item:
        where = f" on {self.unit} {first}" if first is not None else " in this batch"
        return Item(f"line-{it.seq}", it.seq, error=f"{self.where(it.seq)}: id {it.key!r} already used{where}")

    @staticmethod
    def rekey(it: Item, key: str) -> Item:
        """The item under `key`; a key too long for the jobs' id column steps aside from line-N."""
        if key == it.key:
            return it
        if len(key) > MAX_KEY:  # the same key on a re-run, so `cascade run` resumes it
            key = f"line-{it.seq}~{hashlib.sha256(key.encode()).hexdigest()[:12]}"
        data = None if it.data is None else {**it.data, "id": key}
        return replace(it, key=key, data=data, wanted=it.wanted or it.key)


def _aside(key: str, taken: Callable[[str], bool]) -> str:
    """`key`, or the first of key~2, key~3, ... that is not taken."""
    out, k = key, 1
    while taken(out):
        k += 1
        out = f"{key}~{k}"
    return out
