"""Retention (`cascade purge`): what finished before a given time leaves the
database, a batch only once every job of it is final. Prompts and answers that
are not kept go earlier, with the transaction that finishes their job
(worker.store.jobs.forget_content)."""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from worker.job.codec import FINAL, OPEN
from worker.store.batches import FINISHED
from worker.store.engine import Database
from worker.store.files import FileStore
from worker.store.schema import attempts, batches, jobs, model_calls


class RetentionStore(Database):
    def purge(self, before: datetime, *, dry_run: bool = False, chunk: int = 1000) -> dict[str, int]:
        """Delete what finished before `before`: every batch whose jobs are all final
        (with its jobs and attempts), and finished jobs outside any batch. Open work,
        and a batch with any job still open, are never touched. Returns the counts."""
        out = {"batches": 0, "jobs": 0, "attempts": 0}
        open_in_batch = select(jobs.c.id).where(jobs.c.batch_id == batches.c.id, jobs.c.status.in_(OPEN)).exists()
        with self.read() as c:
            done_batches = c.execute(select(batches.c.id).where(
                FINISHED, batches.c.updated_at < before, ~open_in_batch)).scalars().all()
        for batch_id in done_batches:  # one transaction per batch: no long lock
            with self.tx() as c:
                in_batch = select(jobs.c.id).where(jobs.c.batch_id == batch_id)
                if c.execute(select(in_batch.where(jobs.c.status.in_(OPEN)).exists())).scalar():
                    continue  # re-opened meanwhile (a re-run resumed it)
                got = self._delete_jobs(c, in_batch, dry_run)
                if not dry_run:
                    c.execute(batches.delete().where(batches.c.id == batch_id))
            out["batches"] += 1
            out["jobs"] += got[0]
            out["attempts"] += got[1]
        loose = (select(jobs.c.id).where(jobs.c.batch_id.is_(None), jobs.c.status.in_(FINAL),
                                         jobs.c.finished_at < before).order_by(jobs.c.id))
        with self.read() as c:
            loose_ids = c.execute(loose).scalars().all()
        for i in range(0, len(loose_ids), chunk):
            with self.tx() as c:
                got = self._delete_jobs(c, select(jobs.c.id).where(jobs.c.id.in_(loose_ids[i : i + chunk]),
                                                                   jobs.c.status.in_(FINAL)), dry_run)
            out["jobs"] += got[0]
            out["attempts"] += got[1]
        return out

    def purge_files(self, at: datetime, *, dry_run: bool = False) -> int:
        """Delete the uploaded files (/v1/files) whose expiry is before `at`, one
        transaction each; returns how many."""
        store = FileStore(self.url)
        ids = store.expired(at)
        if not dry_run:
            for file_id in ids:
                store.delete(file_id)
        return len(ids)

    @staticmethod
    def _delete_jobs(c: Connection, ids, dry_run: bool) -> tuple[int, int]:
        sub = ids.scalar_subquery()
        if dry_run:
            n_jobs = c.execute(select(func.count()).select_from(jobs).where(jobs.c.id.in_(sub))).scalar()
            n_att = c.execute(select(func.count()).select_from(attempts).where(attempts.c.job_id.in_(sub))).scalar()
            return n_jobs, n_att
        n_att = c.execute(attempts.delete().where(attempts.c.job_id.in_(sub))).rowcount
        # no foreign key deletes them with their jobs on PostgreSQL (migration 0011)
        c.execute(model_calls.delete().where(model_calls.c.job_id.in_(sub)))
        n_jobs = c.execute(jobs.delete().where(jobs.c.id.in_(sub))).rowcount
        return n_jobs, n_att
