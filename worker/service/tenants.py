"""Tenants of the task API: API keys, spend budgets and request rate limits.

Keys look like `csk_<id>_<secret>`; only the SHA-256 of the whole key is stored
(`api_keys.hash`), next to its public id, so a leaked database gives no usable key.
A key names its tenant, and every read and write of the HTTP service is scoped to it.

Budgets: each job reserves its maximum cost when it is admitted, in the submitter's
insert, with the tenant's row locked (worker.queue.admission: every way in, so the
Python client and the Celery task too); `tenants.spent_usd` is moved in the database
itself (a trigger, migration 0003) when a job becomes final, and its reservation then
stops counting. Here, before anything is read from the request: a submission is
refused (402) once spent + reserved >= budget.

Rate limits: requests per minute per tenant, counted in Redis (one key per tenant and
minute, INCR + EXPIRE) so that several API processes share the count; in the embedded
mode there is one process by construction and the count is kept in it.
"""
from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import threading
import time

import redis

from router.core.errors import UserError
from worker.config.settings import Settings
from worker.queue.admission import BudgetExhausted
from worker.store.tenants import TenantStore

KEY_PREFIX = "csk"


class AuthError(UserError):
    pass


class RateLimited(UserError):
    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Tenants:
    def __init__(self, store: TenantStore, settings: Settings):
        self.store = store
        self.settings = settings
        self._redis = None if settings.embedded else redis.Redis.from_url(settings.broker)
        self._local: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()

    # -- keys --------------------------------------------------------------------------
    def create_key(self, tenant: str, name: str | None = None) -> tuple[str, str]:
        """A new key for `tenant` (created if new): (key id, the key). The key is shown once."""
        if not tenant or len(tenant) > 200 or "\x00" in tenant:
            raise UserError("a tenant is a name of 1 to 200 characters")
        self.store.upsert_tenant(tenant)
        key_id = secrets.token_hex(6)
        key = f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(24)}"
        self.store.add_key(key_id, tenant, _digest(key), name)
        return key_id, key

    def authenticate(self, key: str) -> str:
        """The tenant of a valid, unrevoked key; AuthError otherwise (never saying which part failed)."""
        return self.authenticate_with_limits(key)[0]

    def authenticate_with_limits(self, key: str) -> tuple[str, dict | None]:
        """(the key's tenant, its limits as `admit` reads them), in one statement."""
        parts = key.split("_", 2)
        row = self.store.limits("", key_id=parts[1]) if len(parts) == 3 and parts[0] == KEY_PREFIX else None
        if row is None or row["revoked_at"] is not None or not hmac.compare_digest(row["hash"], _digest(key)):
            raise AuthError("invalid or revoked API key")
        return row["tenant"], (row if row["spent_usd"] is not None else None)

    # -- limits ---------------------------------------------------------------------------
    def admit(self, tenant: str, limits: dict | None | bool = False) -> bool:
        """Before a submission: BudgetExhausted or RateLimited, else count the request.
        `limits`: the tenant's as just read (None: it has no row), else read here. True
        when the tenant has a budget (its jobs are admitted under the budget's lock)."""
        t = self.store.limits(tenant) if limits is False else limits
        if t is None:
            return False
        if t["budget_usd"] is not None and t["spent_usd"] + t["reserved_usd"] >= t["budget_usd"]:
            raise BudgetExhausted(f"tenant {tenant!r} has spent ${t['spent_usd']:.6g} and reserved "
                                  f"${t['reserved_usd']:.6g} for open jobs of its ${t['budget_usd']:.6g} budget")
        limit = t["rate_per_min"]
        if limit is None:
            return t["budget_usd"] is not None
        minute = int(time.time() // 60)
        n = self._count(tenant, minute)
        if n > limit:
            raise RateLimited(f"tenant {tenant!r} is limited to {limit} requests per minute",
                              retry_after=max(1, math.ceil((minute + 1) * 60 - time.time())))
        return t["budget_usd"] is not None

    def _count(self, tenant: str, minute: int) -> int:
        if self._redis is not None:
            key = f"{self.settings.redis_prefix}cascade:rate:{tenant}:{minute}"
            pipe = self._redis.pipeline()
            pipe.incr(key)
            pipe.expire(key, 120)
            return int(pipe.execute()[0])
        with self._lock:
            for k in [k for k in self._local if k[1] < minute]:
                del self._local[k]
            n = self._local[(tenant, minute)] = self._local.get((tenant, minute), 0) + 1
            return n

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()
