"""A request as a job carries it: a prompt or chat messages, and per-request
generation parameters. One validator for every way in (a batch line, the Python
client, the `cascade.submit` task, the HTTP API), each error naming the field.

Stored job input (JSON in the jobs table):
    {"id", "prompt", "messages"?, "params"?, "category"?, <other fields kept as meta>}
`prompt` is what a policy reads: the prompt itself, or for a chat, the content of
its last user message. `messages` is the whole chat (system turns included) and
`params` the generation parameters; the backends read them (worker.models.backends).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from router.core.errors import UserError
from worker.job.storable import text_problem

PARAMS = ("system", "max_tokens", "temperature", "stop")
ROLES = ("system", "user", "assistant")
MAX_PROMPT_CHARS = 200_000
MAX_MESSAGES = 256
MAX_STOP = 4
MAX_TOKENS = 1_000_000
# fields of the stored input that are not the caller's metadata
RESERVED = ("id", "prompt", "messages", "params", "category", "priority")


class RequestError(UserError):
    """A request that cannot be a job; `field` names the offending field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.detail = message


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise RequestError(field, f"must be a string, got {type(value).__name__}")
    why = text_problem(value)  # NUL, a lone surrogate: PostgreSQL cannot store it, so no mode takes it
    if why is not None:
        raise RequestError(field, why)
    if len(value) > MAX_PROMPT_CHARS:
        raise RequestError(field, f"is longer than {MAX_PROMPT_CHARS} characters ({len(value)})")
    return value


def check_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list):
        raise RequestError("messages", f"must be a list of {{role, content}} objects, got {type(messages).__name__}")
    if not messages:
        raise RequestError("messages", "must not be empty")
    if len(messages) > MAX_MESSAGES:
        raise RequestError("messages", f"has more than {MAX_MESSAGES} messages")
    out = []
    total = 0
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(where, f"must be an object with role and content, got {type(m).__name__}")
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise RequestError(f"{where}.{sorted(extra)[0]}", "is not supported (role, content, name)")
        role = m.get("role")
        if role not in ROLES:
            raise RequestError(f"{where}.role", f"must be one of {', '.join(ROLES)}, got {role!r}")
        content = _text(m.get("content"), f"{where}.content")
        total += len(content)
        if total > MAX_PROMPT_CHARS:
            raise RequestError("messages", f"are longer than {MAX_PROMPT_CHARS} characters in all")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "user" for m in out):
        raise RequestError("messages", "must contain a user message")
    if out[-1]["role"] != "user":
        raise RequestError("messages", f"must end with a user message, not {out[-1]['role']!r}")
    return out


def check_params(params: Any) -> dict[str, Any]:
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise RequestError("params", f"must be an object, got {type(params).__name__}")
    out: dict[str, Any] = {}
    for key, v in params.items():
        field = f"params.{key}"
        if key not in PARAMS:
            raise RequestError(field, f"is not a known parameter ({', '.join(PARAMS)})")
        if v is None:
            continue
        if key == "system":
            out[key] = _text(v, field)
        elif key == "max_tokens":
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_TOKENS:
                raise RequestError(field, f"must be an integer from 1 to {MAX_TOKENS}, got {v!r}")
            out[key] = v
        elif key == "temperature":
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= 2:
                raise RequestError(field, f"must be a number from 0 to 2, got {v!r}")
            out[key] = float(v)
        else:  # stop
            stops = [v] if isinstance(v, str) else v
            if not isinstance(stops, list) or not 1 <= len(stops) <= MAX_STOP:
                raise RequestError(field, f"must be a string or a list of 1 to {MAX_STOP} strings")
            for s in stops:
                if not _text(s, field):
                    raise RequestError(field, "must not contain an empty string")
            out[key] = list(stops)
    return out


def job_input(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A request (prompt or messages, params, other fields) -> the job's stored input
    (without its id). Raises RequestError naming the field."""
    has_prompt, has_messages = raw.get("prompt") is not None, raw.get("messages") is not None
    if has_prompt and has_messages:
        raise RequestError("messages", "give either prompt or messages, not both")
    params = check_params(raw.get("params"))
    data = {k: v for k, v in raw.items() if k not in ("prompt", "messages", "params")}
    if has_messages:
        messages = check_messages(raw["messages"])
        data["messages"] = messages
        data["prompt"] = next(m["content"] for m in reversed(messages) if m["role"] == "user")
    elif "prompt" in raw:
        data["prompt"] = _text(raw["prompt"], "prompt")
        if not data["prompt"].strip():
            raise RequestError("prompt", "must not be empty")
    else:
        raise RequestError("prompt", "missing (give 'prompt' or 'messages')")
    if params:
        data["params"] = params
    category = data.get("category")
    if category is not None:
        if not isinstance(category, str):
            raise RequestError("category", f"must be a string, got {type(category).__name__}")
        _text(category, "category")
    return data


def system_of(messages: list[Mapping[str, str]], params: Mapping[str, Any]) -> str | None:
    """The system prompt a backend sends: the request's `system` parameter, else its system message(s)."""
    if params.get("system") is not None:
        return params["system"]
    parts = [m["content"] for m in messages if m["role"] == "system"]
    return "\n\n".join(parts) if parts else None
