"""Graded outcomes of jobs (`cascade feedback`, worker.service.feedback): one row
per job, a re-grade replaces it; read back per batch for export."""
from __future__ import annotations

from typing import Any, Sequence

from sqlalchemy import select

from worker.store.engine import Database, dialect_insert
from worker.store.schema import feedback, jobs, now


class FeedbackStore(Database):
    def record_feedback(self, rows: Sequence[dict[str, Any]]) -> int:
        """Upsert graded outcomes (job_id, correct, gold, tiers, source); a job graded
        again keeps its latest grade. Returns the number of rows written."""
        if not rows:
            return 0
        t = now()
        full = [{"gold": None, "tiers": {}, "source": None, **r, "created_at": t, "updated_at": t} for r in rows]
        with self.tx() as c:
            ins = dialect_insert(c, feedback)
            c.execute(ins.on_conflict_do_update(index_elements=["job_id"], set_={
                "correct": ins.excluded.correct, "gold": ins.excluded.gold, "tiers": ins.excluded.tiers,
                "source": ins.excluded.source, "updated_at": ins.excluded.updated_at}), full)
        return len(full)

    def feedback_of(self, batch_id: str) -> dict[str, dict]:
        """job id -> its feedback row, for the batch's graded jobs."""
        with self.read() as c:
            q = (select(feedback).select_from(feedback.join(jobs, jobs.c.id == feedback.c.job_id))
                 .where(jobs.c.batch_id == batch_id))
            return {r["job_id"]: dict(r) for r in c.execute(q).mappings()}
