"""`cascade db upgrade|current`: schema migrations of the configured database."""
from __future__ import annotations

import click

from worker.settings import get_settings


@click.group()
def db() -> None:
    """Database migrations (Alembic)."""


def _safe(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@db.command()
def upgrade() -> None:
    """Create or upgrade the schema to the newest revision."""
    from worker.migrate import current, upgrade as do_upgrade

    url = get_settings().db_url
    try:
        do_upgrade(url)
    except Exception as e:  # connection refused, permissions, ...
        raise click.ClickException(f"cannot upgrade {_safe(url)}: {e}") from None
    click.echo(f"{_safe(url)}: at revision {current(url)}")


@db.command()
def current() -> None:
    """Print the schema revision of the database."""
    from worker.migrate import current as cur

    url = get_settings().db_url
    click.echo(f"{_safe(url)}: {cur(url) or 'no schema (run `cascade db upgrade`)'}")
