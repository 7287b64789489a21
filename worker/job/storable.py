"""What PostgreSQL can store, checked on the way in and enforced on the way out.

Input lines are checked (`storable`): a line that fails names its problem and
fails alone. What a model or a server sends back is cleaned (`clean_text`,
`clean_json`): an answer with a NUL or a NaN signal is recorded, with its cost,
rather than failing the transaction of every job in its stage.
"""
from __future__ import annotations

import math
from typing import Any

MAX_DEPTH = 64
REPLACEMENT = "\ufffd"


def storable(value: Any, path: str = "", depth: int = 0) -> str | None:
    """Why a parsed value cannot be stored as it is (None when it can): a NUL or a
    lone surrogate in a string or key (PostgreSQL refuses both in text and JSON),
    a non-finite number, nesting deeper than MAX_DEPTH."""
    found = unstorable(value, path, depth)
    if found is None:
        return None
    where, what = found
    return f"{where}: {what}" if where else what


def unstorable(value: Any, path: str = "", depth: int = 0) -> tuple[str, str] | None:
    """`storable` as (the field's path, what is wrong there), for an error naming the
    field: `metadata.k`, `messages[0].content`. A key that cannot be stored is named by
    the object holding it."""
    if depth > MAX_DEPTH:
        return path, f"nested deeper than {MAX_DEPTH} levels"
    if isinstance(value, str):
        what = text_problem(value)
        return None if what is None else (path, what)
    if isinstance(value, float) and not math.isfinite(value):
        return path, f"{value} is not a JSON number"
    if isinstance(value, dict):
        for k, v in value.items():
            what = text_problem(str(k))
            if what is not None:
                return path, f"a key {what}"  # the key itself is not repeated: it cannot be shown
            found = unstorable(v, f"{path}.{k}" if path else str(k), depth + 1)
            if found:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = unstorable(v, f"{path}[{i}]", depth + 1)
            if found:
                return found
    return None


def text_problem(s: str) -> str | None:
    """Why PostgreSQL cannot store this text (None when it can)."""
    if "\x00" in s:
        return "contains a NUL character (\\u0000), which the database cannot store"
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"contains a lone surrogate (\\u{ord(s[e.start]):04x}), which is not text"
    return None


def bad_text(s: str, where: str) -> str | None:
    what = text_problem(s)
    return None if what is None else f"{where or 'text'}: {what}"


def clean_text(s: str | None) -> str | None:
    """NUL and lone surrogates replaced by U+FFFD; everything else kept."""
    if s is None:
        return None
    if "\x00" in s:
        s = s.replace("\x00", REPLACEMENT)
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        s = "".join(REPLACEMENT if 0xD800 <= ord(c) <= 0xDFFF else c for c in s)
    return s


def clean_json(value: Any, depth: int = 0) -> Any:
    """A JSON value the database accepts: strings cleaned, non-finite numbers as
    null, anything else as its text, deeper levels than MAX_DEPTH as their text."""
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return clean_text(value)
    if depth >= MAX_DEPTH:
        return clean_text(str(value))[:1000]
    if isinstance(value, dict):
        return {clean_text(str(k)): clean_json(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v, depth + 1) for v in value]
    try:
        f = float(value)  # numpy scalars and the like
    except (TypeError, ValueError):
        return clean_text(str(value))
    return f if math.isfinite(f) else None
