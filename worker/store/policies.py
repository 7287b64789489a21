"""A portfolio's policy versions (`cascade retune`, `cascade policy ...`): version 1 is
the portfolio file's own policy (its row written with the first stored candidate);
later ones are candidates until promoted. At most one version is promoted per
portfolio (a partial unique index); a submitter plans each new job with it and the
job's plan keeps its number (worker.queue.admission), so every stage of the job asks
that version, and each attempt records it (`meta.policy_version`).

A stored version's policy never changes (only its state does), so a worker may keep
the policy it built from a version for as long as it runs."""
from __future__ import annotations

from typing import Any, Sequence

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from worker.job.codec import FINAL
from worker.store.engine import Database
from worker.store.schema import attempts, feedback, jobs, now, policy_versions

CANDIDATE, PROMOTED, RETIRED = "candidate", "promoted", "retired"

_pv = policy_versions


class PolicyVersionError(LookupError):
    """A version that does not exist or cannot move to the state asked."""


class PolicyStore(Database):
    def promoted(self, digest: str) -> int:
        """The version workers use for new jobs of this portfolio (1: none stored yet)."""
        return self.promoted_of([digest])[digest]

    def promoted_of(self, digests: Sequence[str]) -> dict[str, int]:
        with self.read() as c:
            got = dict(c.execute(select(_pv.c.portfolio, _pv.c.version)
                                 .where(_pv.c.portfolio.in_(list(digests)), _pv.c.state == PROMOTED)).all())
        return {d: got.get(d, 1) for d in digests}

    def versions(self, digest: str) -> list[dict[str, Any]]:
        with self.read() as c:
            return [dict(r) for r in c.execute(select(_pv).where(_pv.c.portfolio == digest)
                                               .order_by(_pv.c.version)).mappings()]

    def version(self, digest: str, version: int) -> dict[str, Any] | None:
        with self.read() as c:
            r = c.execute(select(_pv).where(_pv.c.portfolio == digest, _pv.c.version == version)).mappings().first()
        return dict(r) if r else None

    def add(self, digest: str, policy: dict[str, Any], file_policy: dict[str, Any], *, source: str,
            info: dict[str, Any] | None = None) -> int:
        """Store `policy` as the next candidate version of the portfolio (writing version 1,
        the file's `file_policy`, promoted, if this is the first); returns its number."""
        for attempt in range(3):  # two stores at once pick the same number: the second tries the next
            t = now()
            try:
                with self.tx() as c:
                    last = c.execute(select(func.max(_pv.c.version)).where(_pv.c.portfolio == digest)).scalar()
                    if last is None:
                        c.execute(_pv.insert().values(portfolio=digest, version=1, policy=file_policy,
                                                      source="portfolio", state=PROMOTED, created_at=t, promoted_at=t))
                        last = 1
                    c.execute(_pv.insert().values(portfolio=digest, version=last + 1, policy=policy, source=source,
                                                  state=CANDIDATE, info=info, created_at=t))
                return last + 1
            except IntegrityError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def set_info(self, digest: str, version: int, info: dict[str, Any]) -> None:
        """Merge `info` into the version's (the last shadow report, say)."""
        with self.tx() as c:
            old = c.execute(select(_pv.c.info).where(_pv.c.portfolio == digest, _pv.c.version == version)).scalar()
            c.execute(update(_pv).where(_pv.c.portfolio == digest, _pv.c.version == version)
                      .values(info={**(old or {}), **info}))

    def promote(self, digest: str, version: int) -> int:
        """Make `version` the promoted one; returns the version it replaced. Rows are
        locked first, so two promotions of one portfolio run one after the other."""
        with self.tx() as c:
            rows = {r["version"]: dict(r) for r in c.execute(
                select(_pv).where(_pv.c.portfolio == digest).with_for_update()).mappings()}
            if version not in rows and not (version == 1 and not rows):
                raise PolicyVersionError(_unknown(version, rows))
            current = next((v for v, r in rows.items() if r["state"] == PROMOTED), 1)
            if version == current:
                raise PolicyVersionError(f"version {version} is already the promoted one")
            t = now()
            c.execute(update(_pv).where(_pv.c.portfolio == digest, _pv.c.state == PROMOTED).values(state=RETIRED))
            c.execute(update(_pv).where(_pv.c.portfolio == digest, _pv.c.version == version)
                      .values(state=PROMOTED, promoted_at=t, replaced=current))
        return current

    def rollback_target(self, digest: str) -> tuple[int, dict[str, Any]]:
        """The promoted version and the one a rollback would promote again (the version
        promoted before it); PolicyVersionError if there is none."""
        return _rollback_target(self.versions(digest))

    def rollback(self, digest: str, expect: int | None = None) -> tuple[int, int]:
        """Promote again the version promoted before the current one: (from, to); a second
        rollback goes one promotion further back (an explicit promote starts afresh). With
        `expect`, refuse if that is no longer the version it would promote."""
        with self.tx() as c:
            rows = [dict(r) for r in c.execute(
                select(_pv).where(_pv.c.portfolio == digest).with_for_update()).mappings()]
            current, to = _rollback_target(rows)
            if expect is not None and to["version"] != expect:
                raise PolicyVersionError(f"the versions changed meanwhile: a rollback would now promote "
                                         f"{to['version']}, not {expect}; run it again")
            cur = next(r for r in rows if r["version"] == current)
            c.execute(update(_pv).where(_pv.c.portfolio == digest, _pv.c.version == cur["version"])
                      .values(state=RETIRED))
            # it keeps what it replaced: a second rollback goes one promotion further back
            c.execute(update(_pv).where(_pv.c.portfolio == digest, _pv.c.version == to["version"])
                      .values(state=PROMOTED))
        return cur["version"], to["version"]

    def decisions_by_version(self, batch_id: str) -> list[dict[str, Any]]:
        """The batch's attempts counted per (policy version, tier, decision); version
        None for attempts recorded before versions existed."""
        v = attempts.c.meta["policy_version"].as_integer()
        q = (select(v.label("version"), attempts.c.tier, attempts.c.decision, func.count().label("n"))
             .select_from(attempts.join(jobs, jobs.c.id == attempts.c.job_id))
             .where(jobs.c.batch_id == batch_id).group_by(v, attempts.c.tier, attempts.c.decision))
        with self.read() as c:
            return [dict(r) for r in c.execute(q).mappings()]

    def finished_jobs(self, digest: str, limit: int) -> list[dict[str, Any]]:
        """The portfolio's most recently finished jobs (newest first, at most `limit`), each
        with its attempts (call order) and its grade (`feedback`, None if ungraded)."""
        with self.read() as c:
            rows = [dict(r) for r in c.execute(
                select(jobs.c.id, jobs.c.batch_id, jobs.c.item_key, jobs.c.input, jobs.c.plan, jobs.c.status,
                       jobs.c.final_tier, jobs.c.final_answer, jobs.c.total_cost, jobs.c.finished_at)
                .where(jobs.c.portfolio == digest, jobs.c.status.in_(sorted(FINAL)))
                .order_by(jobs.c.finished_at.desc(), jobs.c.id).limit(limit)).mappings()]
            ids = [r["id"] for r in rows]
            ats: dict[str, list[dict]] = {i: [] for i in ids}
            grades: dict[str, dict] = {}
            for i in range(0, len(ids), 1000):
                part = ids[i:i + 1000]
                for a in c.execute(select(attempts).where(attempts.c.job_id.in_(part))
                                   .order_by(attempts.c.job_id, attempts.c.step)).mappings():
                    ats[a["job_id"]].append(dict(a))
                for f in c.execute(select(feedback).where(feedback.c.job_id.in_(part))).mappings():
                    grades[f["job_id"]] = dict(f)
        for r in rows:
            r["attempts"] = ats[r["id"]]
            r["feedback"] = grades.get(r["id"])
        return rows


def _rollback_target(rows: list[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    cur = next((r for r in rows if r["state"] == PROMOTED), None)
    to = next((r for r in rows if cur is not None and r["version"] == cur["replaced"]), None)
    if to is None:
        raise PolicyVersionError("nothing to roll back to: no version was promoted before the current one")
    return cur["version"], to


def _unknown(version: int, rows: dict[int, dict]) -> str:
    known = ", ".join(str(v) for v in sorted(rows)) or "1 (the portfolio file's; nothing stored yet)"
    return f"no policy version {version} for this portfolio; versions: {known} (see `cascade policy list`)"
