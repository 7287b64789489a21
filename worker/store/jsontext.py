"""JSON to and from the text the stage statements send and read, with orjson: a stage
of 256 jobs spent a third of its Python time in the standard library's encoder and
decoder (py-spy on a tier worker, docs/throughput.md).

The values are ones `clean_json` made storable (non-finite numbers already null), so
orjson writes what `json` would, but for the spelling of some numbers (1e-7 for 1e-07:
the same number in the database). An integer beyond 64 bits, which orjson refuses to
write, goes through `json`. Read back, such an integer would become a float: only the
stage's own reads use `loads` (what it reads is never written back), not what the task
API shows a user."""
from __future__ import annotations

import json
from typing import Any

import orjson

_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY


def dumps(value: Any) -> str:
    try:
        return orjson.dumps(value, option=_OPTIONS).decode()
    except (orjson.JSONEncodeError, TypeError):
        return json.dumps(value)


def loads(text: str | bytes | None) -> Any:
    return None if text is None else orjson.loads(text)
