"""Tenants of the task API and their API keys (worker.service.tenants): limits set
here; a tenant's spend is moved by a trigger of the database (migration 0003), what
it has reserved is summed over its open jobs (migration 0006); a key is stored as
its hash only."""
from __future__ import annotations

from typing import Any

from sqlalchemy import bindparam, select, update

from worker.store.engine import Database, dialect_insert
from worker.store.jobs import open_reservations, reserved_if_budgeted
from worker.store.schema import api_keys, now, tenants

# built once: every submission over HTTP reads one of these, and building the statement
# (and its cache key) on each call cost more than the database took to answer it
_LIMIT_COLUMNS = [tenants.c.budget_usd, tenants.c.spent_usd, tenants.c.rate_per_min, reserved_if_budgeted()]
_LIMITS = select(*_LIMIT_COLUMNS).where(tenants.c.id == bindparam("tenant"))
_KEY_LIMITS = (select(api_keys.c.tenant, api_keys.c.hash, api_keys.c.revoked_at, *_LIMIT_COLUMNS)
               .select_from(api_keys.outerjoin(tenants, tenants.c.id == api_keys.c.tenant))
               .where(api_keys.c.id == bindparam("key_id")))


class TenantStore(Database):
    def upsert_tenant(self, tenant: str, **limits: Any) -> None:
        """Create the tenant if new; set the given limits (budget_usd, rate_per_min; None clears)."""
        with self.tx() as c:
            c.execute(dialect_insert(c, tenants).values(id=tenant, spent_usd=0.0, created_at=now())
                      .on_conflict_do_nothing(index_elements=["id"]))
            if limits:
                c.execute(update(tenants).where(tenants.c.id == tenant).values(**limits))

    def tenant(self, tenant: str) -> dict | None:
        """The tenant's row, and `reserved_usd`: what its open jobs have reserved."""
        with self.read() as c:
            r = c.execute(select(tenants).where(tenants.c.id == tenant)).mappings().one_or_none()
            return None if r is None else {**r, "reserved_usd": open_reservations(c, tenant)}

    def limits(self, tenant: str, key_id: str | None = None) -> dict | None:
        """In one statement, what a submission is admitted on: the tenant's budget_usd,
        spent_usd, rate_per_min and reserved_usd (summed over its open jobs only when it
        has a budget); with `key_id`, that key's tenant, hash and revoked_at too (the
        tenant's columns None when it has no row). None: no such tenant (or key)."""
        with self.read() as c:
            r = (c.execute(_LIMITS, {"tenant": tenant}) if key_id is None else
                 c.execute(_KEY_LIMITS, {"key_id": key_id})).mappings().one_or_none()
            return dict(r) if r else None

    def add_key(self, key_id: str, tenant: str, digest: str, name: str | None) -> None:
        with self.tx() as c:
            c.execute(api_keys.insert().values(id=key_id, tenant=tenant, hash=digest, name=name, created_at=now()))

    def key(self, key_id: str) -> dict | None:
        with self.read() as c:
            r = c.execute(select(api_keys).where(api_keys.c.id == key_id)).mappings().one_or_none()
            return dict(r) if r else None

    def keys(self, tenant: str | None = None) -> list[dict]:
        with self.read() as c:
            q = select(api_keys.c.id, api_keys.c.tenant, api_keys.c.name, api_keys.c.created_at,
                       api_keys.c.revoked_at).order_by(api_keys.c.tenant, api_keys.c.created_at)
            if tenant is not None:
                q = q.where(api_keys.c.tenant == tenant)
            return [dict(r) for r in c.execute(q).mappings()]

    def revoke_key(self, key_id: str) -> bool:
        with self.tx() as c:
            return c.execute(update(api_keys).where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                             .values(revoked_at=now())).rowcount == 1
