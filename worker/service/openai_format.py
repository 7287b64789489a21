"""The OpenAI shapes the HTTP service speaks: a chat completion request -> our request,
a finished job -> a chat completion (with the `cascade` extension field), and the
Batch API's input and output lines. Every refusal names the field (RequestError).

The extension field, on every completion and on the last streamed chunk:
    "cascade": {"job_id", "status", "tier", "cost_usd",
                "attempts": [{"tier", "model", "decision", "reason", "signals", "cost_usd", "latency_ms", "error"}]}
"""
from __future__ import annotations

import time
from datetime import timezone
from typing import Any, Mapping

from worker.job.request import RequestError

CHAT_URL = "/v1/chat/completions"
# chat completion fields we take: the model (a portfolio), the messages, our parameters
CHAT_FIELDS = ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "stop", "stream",
               "stream_options", "metadata", "user", "n")


def chat_request(body: Mapping[str, Any], where: str = "") -> tuple[str, dict[str, Any]]:
    """(portfolio name, request) from a chat completion body; RequestError naming the field."""
    if not isinstance(body, Mapping):
        raise RequestError(where.rstrip(".") or "body", f"must be an object, got {type(body).__name__}")
    for key, value in body.items():
        if key not in CHAT_FIELDS and value is not None:
            raise RequestError(f"{where}{key}", "is not supported by this service")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError(f"{where}model", "must name a portfolio, e.g. 'cascade/default'")
    n = body.get("n")
    if n not in (None, 1):
        raise RequestError(f"{where}n", "only n = 1 is supported")
    params = {}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        params["max_tokens"] = max_tokens
    for key in ("temperature", "stop"):
        if body.get(key) is not None:
            params[key] = body[key]
    request: dict[str, Any] = {"messages": body.get("messages")}
    if request["messages"] is None:
        raise RequestError(f"{where}messages", "missing")
    if params:
        request["params"] = params
    return model, request


def usage(job: Mapping[str, Any]) -> dict[str, int]:
    final = next((a for a in reversed(job["attempts"]) if a["tier"] == job["tier"]), None)
    tin = (final or {}).get("tokens_in") or 0
    tout = (final or {}).get("tokens_out") or 0
    return {"prompt_tokens": tin, "completion_tokens": tout, "total_tokens": tin + tout}


def extension(job: Mapping[str, Any]) -> dict[str, Any]:
    return {"job_id": job["id"], "status": job["status"], "tier": job["tier"], "cost_usd": job["cost_usd"],
            "attempts": [{k: a[k] for k in ("tier", "model", "decision", "reason", "signals", "cost_usd",
                                            "latency_ms", "error")} for a in job["attempts"]]}


def completion(job: Mapping[str, Any], model: str, created: int | None = None) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{job['id']}", "object": "chat.completion", "created": created or int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": job["answer"] or ""},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": usage(job), "cascade": extension(job),
    }


def chunks(job: Mapping[str, Any], model: str) -> list[dict[str, Any]]:
    """A finished job as stream chunks: the role, the answer, the end with the extension."""
    base = {"id": f"chatcmpl-{job['id']}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model}
    return [
        {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
        {**base, "choices": [{"index": 0, "delta": {"content": job["answer"] or ""}, "finish_reason": None}]},
        {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": usage(job),
         "cascade": extension(job)},
    ]


def batch_line(raw: Any, model: str) -> dict[str, Any]:
    """One OpenAI Batch input line ({custom_id, method, url, body}) -> a batch item;
    RequestError naming the field. Every line's body.model must be the batch's model."""
    if not isinstance(raw, dict):
        raise RequestError("line", f"expected a JSON object, got {type(raw).__name__}")
    cid = raw.get("custom_id")
    if not isinstance(cid, str) or not cid:
        raise RequestError("custom_id", "must be a non-empty string")
    if raw.get("method", "POST") != "POST":
        raise RequestError("method", f"must be POST, got {raw.get('method')!r}")
    if raw.get("url", CHAT_URL) != CHAT_URL:
        raise RequestError("url", f"must be {CHAT_URL}, got {raw.get('url')!r}")
    name, request = chat_request(raw.get("body"), "body.")
    if name != model:
        raise RequestError("body.model", f"is {name!r} but this batch runs {model!r}")
    return {"id": cid, **request}


def is_openai_line(raw: Any) -> bool:
    return isinstance(raw, dict) and "custom_id" in raw and "body" in raw


def batch_output(job: Mapping[str, Any], model: str) -> dict[str, Any]:
    """A finished batch job as an OpenAI Batch output line (result or error)."""
    if job["status"] == "succeeded":
        return {"id": f"batch_req_{job['id']}", "custom_id": job["custom_id"],
                "response": {"status_code": 200, "request_id": job["id"], "body": completion(job, model)},
                "error": None}
    code = {"cancelled": "cancelled", "failed": "job_failed"}.get(job["status"], job["status"])
    if job["status"] == "cancelled" and (job["error"] or "").startswith("expired"):
        code = "batch_expired"  # OpenAI's code for a request its batch's window left unrun
    return {"id": f"batch_req_{job['id']}", "custom_id": job["custom_id"], "response": None,
            "error": {"code": code, "message": job["error"] or job["status"]}}


# the ids of a batch's output and error files (served from its jobs, never stored twice)
OUTPUT_FILE, ERROR_FILE = "file-output-", "file-errors-"


def _unix(t) -> int | None:
    """Unix seconds; SQLite gives back naive datetimes, stored in UTC."""
    if t is None:
        return None
    return int((t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp())


def batch_status(batch: Mapping[str, Any]) -> str:
    """OpenAI's status from the batch row: validating while lines are still being
    submitted; in_progress (cancelling once a cancel was asked for) until every job is
    final; then cancelled, expired (its completion window cancelled jobs), failed (no
    line could run: every one is in the error file) or completed."""
    if batch["submitting"] and not batch.get("cancelled_at"):
        return "validating"
    if batch["done"] < batch["total"] or batch["submitting"]:
        return "cancelling" if batch.get("cancelled_at") else "in_progress"
    if batch.get("cancelled_at"):
        return "cancelled"
    if batch["cancelled"] and batch["expires_at"] is not None and batch["expires_at"] <= batch["updated_at"]:
        return "expired"
    if batch["total"] and batch["succeeded"] == 0 and batch["failed"] == batch["total"]:
        return "failed"
    if batch["cancelled"]:
        return "cancelled"
    return "completed"


def batch_object(batch: Mapping[str, Any], view: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """The batch row as OpenAI's batch object; the project's own view (counts, cost, tiers,
    decisions without their signal, warnings) and `extra` under the extension field
    `cascade`. request_counts.failed counts the failed, cancelled and expired lines:
    everything the error file holds."""
    req = batch.get("request") or {}
    status = batch_status(batch)
    final = status in ("completed", "failed", "cancelled", "expired")
    ended = _unix(batch["updated_at"]) if final else None
    errors_n = batch["failed"] + batch["cancelled"]
    return {
        "id": batch["id"], "object": "batch", "endpoint": req.get("endpoint", CHAT_URL),
        "input_file_id": req.get("input_file_id") or "", "completion_window": req.get("completion_window") or "",
        "status": status, "errors": None,
        "output_file_id": f"{OUTPUT_FILE}{batch['id']}" if final and batch["succeeded"] else None,
        "error_file_id": f"{ERROR_FILE}{batch['id']}" if final and errors_n else None,
        "created_at": _unix(batch["created_at"]),
        "in_progress_at": None if status == "validating" else _unix(batch["created_at"]),
        "expires_at": _unix(batch["expires_at"]), "finalizing_at": ended if status == "completed" else None,
        "completed_at": ended if status == "completed" else None,
        "failed_at": ended if status == "failed" else None,
        "expired_at": ended if status == "expired" else None,
        "cancelling_at": _unix(batch.get("cancelled_at")),
        "cancelled_at": ended if status == "cancelled" else None,
        "request_counts": {"total": batch["total"], "completed": batch["succeeded"], "failed": errors_n},
        "metadata": req.get("metadata"),
        "cascade": {**view, **extra},
    }
