"""What callers of the task API read: a job (status, answer, answering tier, cost, and
each attempt with its signals, decision and reason) and a batch (counts, cost, share
answered per tier), as plain JSON-ready dicts. The Python client, the HTTP service
and the batch result streams all render through here."""
from __future__ import annotations

from datetime import datetime
from typing import Any

from worker.store.batches import finished

ATTEMPT_FIELDS = ("tier", "model", "answer", "signals", "decision", "reason", "error", "cost_usd", "latency_ms",
                  "tokens_in", "tokens_out")


def _ts(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat()


def job_view(job: dict[str, Any], attempts: list[dict[str, Any]]) -> dict[str, Any]:
    inp = job["input"] or {}
    return {
        "id": job["id"], "status": job["status"], "answer": job["final_answer"], "tier": job["final_tier"],
        "cost_usd": job["total_cost"], "error": job["error"], "batch_id": job["batch_id"],
        "custom_id": job["item_key"] if job["batch_id"] else None, "priority": inp.get("priority"),
        "metadata": inp.get("metadata") or {}, "current_tier": job["current_tier"],
        "created_at": _ts(job["created_at"]), "finished_at": _ts(job["finished_at"]),
        "attempts": [{k: a[k] for k in ATTEMPT_FIELDS} for a in attempts],
    }


_NOTICE_FLOATS = ("total_cost",)
_NOTICE_ATTEMPT_FLOATS = ("cost_usd", "latency_ms")


def notice_view(notice: dict[str, Any] | None) -> tuple[str, dict[str, Any]] | None:
    """(its tenant, the job as `job_view` shows it) from the notice of a job that became
    final, when the notice carried the job (migration 0013); None for a bare id or a
    notice without every field job_view reads (the caller reads the row instead).
    A non-finite float comes as its text ("NaN", "Infinity"), as PostgreSQL writes it
    in JSON."""
    if not notice:
        return None
    try:
        job = {k: notice[k] for k in ("id", "tenant", "status", "final_answer", "final_tier", "total_cost", "error",
                                      "batch_id", "item_key", "current_tier")}
        job["input"] = {"priority": notice["priority"], "metadata": notice["metadata"]}
        for k in ("created_at", "finished_at"):
            job[k] = None if notice[k] is None else datetime.fromisoformat(notice[k])
        for k in _NOTICE_FLOATS:
            job[k] = _float(job[k])
        attempts = [{k: a[k] for k in ATTEMPT_FIELDS} for a in notice["attempts"]]
        for a in attempts:
            for k in _NOTICE_ATTEMPT_FLOATS:
                a[k] = _float(a[k])
    except (KeyError, TypeError, ValueError):
        return None
    return job["tenant"], job_view(job, attempts)


def _float(v: Any) -> Any:
    return float(v) if isinstance(v, str) else v


# a tier deciding without a signal its policy reads more often than this is warned about
GAP_WARN = 0.01


def signal_gap_view(gaps: dict[str, dict[str, int]]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Per tier: decisions taken on an answer, those taken without a signal the policy
    reads there, their share; and a warning for each tier whose share is above 1%."""
    out, warnings = {}, []
    for tier, g in gaps.items():
        share = g["without"] / g["decisions"] if g["decisions"] else 0.0
        out[tier] = {"decisions": g["decisions"], "without_signal": g["without"], "share": share}
        if share > GAP_WARN:
            warnings.append(f"tier {tier}: {g['without']} of {g['decisions']} decisions ({share:.1%}) were taken "
                            f"without a signal the policy reads there (the server's answer lacked it; see the "
                            f"attempts' reasons, and `cascade check`)")
    return out, warnings


def batch_view(batch: dict[str, Any], tiers: list[dict[str, Any]],
               gaps: dict[str, dict[str, int]] | None = None) -> dict[str, Any]:
    """Counts by status, cost so far, the share of finished jobs each tier answered, and
    (with `gaps`, BatchStore.signal_gaps) the decisions each tier took without its signal."""
    answered: dict[str, int] = {}
    calls: dict[str, int] = {}
    for t in tiers:
        calls[t["tier"]] = calls.get(t["tier"], 0) + t["n"]
        if t["decision"] == "accept":
            answered[t["tier"]] = answered.get(t["tier"], 0) + t["n"]
    done = batch["done"]
    status = "completed" if finished(batch) else "in_progress"
    if batch["cancelled"] and finished(batch):
        status = "cancelled"
    out = {
        "id": batch["id"], "status": status,
        "counts": {"total": batch["total"], "done": done, "succeeded": batch["succeeded"], "failed": batch["failed"],
                   "cancelled": batch["cancelled"], "open": batch["total"] - done},
        "submitting": bool(batch.get("submitting")),  # lines remain to be submitted: not finished
        "cost_usd": batch["total_cost"],
        "tiers": {t: {"calls": n, "answered": answered.get(t, 0), "share": answered.get(t, 0) / done if done else 0.0}
                  for t, n in sorted(calls.items())},
        "created_at": _ts(batch["created_at"]), "updated_at": _ts(batch["updated_at"]),
    }
    if gaps is not None:
        out["missing_signals"], out["warnings"] = signal_gap_view(gaps)
    return out
