"""`cascade keys create|list|revoke|limits`: API keys of the task API's tenants (stored
hashed; a new key is printed once), and each tenant's budget and rate limit."""
from __future__ import annotations

import click

from worker.cli.common import user_errors
from worker.config.settings import get_settings
from worker.queue.batch import prepare_database
from worker.service.tenants import Tenants
from worker.store.tenants import TenantStore


def _tenants() -> Tenants:
    settings = get_settings()
    prepare_database(settings)
    return Tenants(TenantStore(settings.db_url), settings)


def _limits(store: TenantStore, tenant: str, budget: float | None, rate: int | None, clear: bool) -> None:
    limits = {}
    if budget is not None or clear:
        limits["budget_usd"] = budget
    if rate is not None or clear:
        limits["rate_per_min"] = rate
    store.upsert_tenant(tenant, **limits)


@click.group()
def keys() -> None:
    """API keys and tenant limits (`cascade serve` asks for a key in the distributed mode)."""


@keys.command()
@click.option("--tenant", required=True, help="the tenant the key acts for (created if new)")
@click.option("--name", help="a label, e.g. the calling service")
@click.option("--budget", type=click.FloatRange(min=0), help="the tenant's spend budget in USD")
@click.option("--rate", type=click.IntRange(min=1), help="the tenant's requests per minute")
def create(tenant, name, budget, rate) -> None:
    """Create a key; it is printed once (only its hash is stored)."""
    with user_errors():
        t = _tenants()
        key_id, key = t.create_key(tenant, name)
        _limits(t.store, tenant, budget, rate, clear=False)
        t.close()
    click.echo(f"key {key_id} for tenant {tenant} (shown once):", err=True)
    click.echo(key)


@keys.command(name="list")
@click.option("--tenant", help="only this tenant's keys")
def list_keys(tenant) -> None:
    """Keys (id, tenant, name, created, revoked) and each tenant's limits and spend."""
    with user_errors():
        t = _tenants()
        rows = t.store.keys(tenant)
        t.close()
    seen = {}
    for r in rows:
        if r["tenant"] not in seen:
            seen[r["tenant"]] = info = t.store.tenant(r["tenant"]) or {}
            click.echo(f"tenant {r['tenant']}: spent ${info.get('spent_usd', 0):.6g}, budget "
                       f"{'none' if info.get('budget_usd') is None else '$%.6g' % info['budget_usd']}, rate "
                       f"{info.get('rate_per_min') or 'none'}/min")
        state = f"revoked {r['revoked_at']:%Y-%m-%d %H:%M}" if r["revoked_at"] else "active"
        click.echo(f"  {r['id']}  {r['name'] or '-':20}  created {r['created_at']:%Y-%m-%d %H:%M}  {state}")


@keys.command()
@click.argument("key_id")
def revoke(key_id) -> None:
    """Revoke a key by its id (`cascade keys list`); it stops working at once."""
    with user_errors():
        t = _tenants()
        ok = t.store.revoke_key(key_id)
        t.close()
    if not ok:
        raise click.ClickException(f"no active key {key_id!r}")
    click.echo(f"revoked {key_id}")


@keys.command()
@click.argument("tenant")
@click.option("--budget", type=click.FloatRange(min=0), help="spend budget in USD")
@click.option("--rate", type=click.IntRange(min=1), help="requests per minute")
@click.option("--clear", is_flag=True, help="remove the limits not given")
def limits(tenant, budget, rate, clear) -> None:
    """Set a tenant's budget and rate limit."""
    with user_errors():
        t = _tenants()
        _limits(t.store, tenant, budget, rate, clear)
        t.close()
    click.echo(f"tenant {tenant}: budget {budget if budget is not None else '-'}, rate {rate or '-'}")
