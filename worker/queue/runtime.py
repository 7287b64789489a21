"""What a worker process builds once and reuses for every job: the stores of the
queue (jobs, batches, stages, on one engine), the portfolios jobs were submitted
with (by digest, each with its policy built once), and one backend per tier (a
local model is loaded once, not per job).

It is passed explicitly: to the Celery app's stage task (`make_app(settings,
runtime)`), to the submitter and to the sweeper; nothing hangs it on the app."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from datetime import datetime, timedelta
from typing import Iterator, Sequence

from router.core.errors import InternalError
from router.core.policies import make_policy
from router.core.policy import Needs, Policy, tier_infos
from router.core.portfolio import Portfolio, Tier, portfolio_from_spec
from worker.config.credentials import is_redacted
from worker.config.settings import Settings
from worker.models.backends import Backend, BackendConfigError, backend_class, build_backend
from worker.models.preflight import both_needs
from worker.store.batches import BatchStore
from worker.store.jobs import JobStore
from worker.store.policies import PolicyStore
from worker.store.schema import now
from worker.store.stages import StageStore

PROMOTED_TTL = 1.0  # seconds a submitter keeps the promoted policy version it read


class Runtime:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.jobs = JobStore(settings.db_url, keep_content=settings.store_content)
        self.batches = BatchStore(settings.db_url, keep_content=settings.store_content)
        self.stages = StageStore(settings.db_url, keep_content=settings.store_content)
        self.policies = PolicyStore(settings.db_url)
        self._portfolios: dict[str, Portfolio] = {}
        self._policies: dict[tuple[str, int], Policy] = {}
        self._promoted: dict[str, tuple[int, float]] = {}  # digest -> (promoted version, when read)
        self._backends: dict[str, Backend] = {}
        self._lock = threading.Lock()
        self._inflight: dict[str, int] = {}  # job id -> stages of this process working on it
        self.last_stage_at = time.monotonic()  # when a stage last started here (the sweeper's watchdog)
        # who holds a job's lease: this process (its threads share it; `running` keeps them apart)
        self.holder = f"{socket.gethostname()}:{os.getpid()}"
        # ids of this process's call records it learned of and has not recorded finished (StageStore.begin_calls)
        self._calls: set[int] = set()

    def known_calls(self) -> list[int]:
        with self._lock:
            return list(self._calls)

    def note_calls(self, ids, *, finished: bool = False) -> None:
        with self._lock:
            if finished:
                self._calls.difference_update(ids)
            else:
                self._calls.update(ids)

    def lease_until(self) -> datetime:
        """A lease taken or renewed now ends `stale_after` seconds on: the heartbeat renews
        it every sweep (a quarter of that); a holder gone silent that long has lost it,
        exactly when the sweeper re-sends its jobs (worker.store.stages)."""
        return now() + timedelta(seconds=self.settings.stale_after)

    @contextlib.contextmanager
    def running(self, job_ids: Sequence[str]) -> Iterator[list[str]]:
        """Hold these jobs for a stage of this process: yields those no other thread of
        the process holds (a duplicate message waits its turn elsewhere, never calls a
        model a second time at once); the sweeper's heartbeat keeps held jobs fresh."""
        with self._lock:
            self.last_stage_at = time.monotonic()
            mine = [j for j in job_ids if j not in self._inflight]
            for j in mine:
                self._inflight[j] = 1
        try:
            yield mine
        finally:
            with self._lock:
                for j in mine:
                    self._inflight.pop(j, None)

    def inflight(self) -> list[str]:
        with self._lock:
            return list(self._inflight)

    def add_portfolio(self, portfolio: Portfolio) -> Portfolio:
        with self._lock:
            return self._portfolios.setdefault(portfolio.digest, portfolio)

    def portfolio(self, digest: str) -> Portfolio:
        """The portfolio jobs were submitted with (read from the store the first time)."""
        got = self._portfolios.get(digest)
        if got is None:
            got = self.add_portfolio(portfolio_from_spec(self.jobs.portfolio_spec(digest)))
        return got

    def current_policy(self, digest: str) -> tuple[int, Policy]:
        """The promoted version of the portfolio and its policy, for planning a new job.
        Read at most once per PROMOTED_TTL seconds per portfolio: a promotion reaches new
        jobs that much later, and nothing else depends on the delay (each job carries its
        version from here on, and a version's policy never changes)."""
        t = time.monotonic()
        hit = self._promoted.get(digest)
        if hit is None or t - hit[1] > PROMOTED_TTL:
            hit = self._promoted[digest] = (self.policies.promoted(digest), t)
        return hit[0], self.policy(digest, hit[0])

    def start_needs(self, portfolio: Portfolio, index: int) -> Needs:
        """What a tier worker probes for at start: what the portfolio file's policy reads at
        tier `index`, with what the promoted version reads there (jobs of both may come)."""
        needs = portfolio.built_policy.needs(index)
        version, promoted = self.current_policy(portfolio.digest)
        return needs if version == 1 else both_needs(needs, promoted.needs(index))

    def policy(self, digest: str, version: int) -> Policy:
        """The portfolio's policy at `version` (1: the file's own), built once: a stored
        version never changes, so a worker keeps it while it runs (no expiry to get wrong)."""
        if version == 1:
            return self.portfolio(digest).built_policy
        got = self._policies.get((digest, version))
        if got is None:
            row = self.policies.version(digest, version)
            if row is None:
                raise InternalError(f"policy version {version} of portfolio {digest} is not in the database")
            p = self.portfolio(digest)
            got = make_policy(row["policy"]["name"], tier_infos(p.tiers), dict(row["policy"].get("params") or {}))
            with self._lock:
                got = self._policies.setdefault((digest, version), got)
        return got

    def stage_size(self, tier: str, queue: str, cap: int) -> int:
        """Jobs per stage message to this tier's queue (its backend's stage_size), `cap`
        for a tier no portfolio of this process names."""
        for p in list(self._portfolios.values()):
            for t in p.tiers:
                if t.name == tier and queue in (t.queue_name, f"{t.queue_name}.interactive"):
                    return max(1, min(cap, backend_class(t.backend.kind).stage_size(t, cap)))
        return cap

    def queue_of(self, digest: str, tier: str) -> str:
        return self.portfolio(digest).tier(tier).queue_name

    @staticmethod
    def _backend_key(tier: Tier) -> str:
        return json.dumps({"name": tier.name, "backend": tier.backend.model_dump(mode="json")}, sort_keys=True)

    def backend(self, tier: Tier) -> Backend:
        """The tier's backend, built on first use; identical specs share one."""
        if is_redacted(tier.backend.options):
            raise BackendConfigError(
                f"tier {tier.name!r}: this portfolio was read back from the database, where its credentials "
                f"are blanked: start this worker with the portfolio file (--portfolio), with secrets as ${{NAME}}")
        key = self._backend_key(tier)
        b = self._backends.get(key)
        if b is None:
            with self._lock:
                b = self._backends.get(key)
                if b is None:
                    b = self._backends[key] = build_backend(tier)
        return b

    def close(self) -> None:
        with self._lock:
            for b in self._backends.values():
                b.close()
            self._backends.clear()
