"""`cascade db upgrade|current`: schema migrations of the configured database."""
from __future__ import annotations

import click
from sqlalchemy.engine import make_url

from worker import migrate
from worker.settings import get_settings


@click.group()
def db() -> None:
    """Database migrations (Alembic)."""


def _safe(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


@db.command()
def upgrade() -> None:
    """Create or upgrade the schema to the newest revision."""
    url = get_settings().db_url
    try:
        migrate.upgrade(url)
    except Exception as e:  # connection refused, permissions, ...
        raise click.ClickException(f"cannot upgrade {_safe(url)}: {e}") from None
    click.echo(f"{_safe(url)}: at revision {migrate.current(url)}")


@db.command()
def current() -> None:
    """Print the schema revision of the database."""
    url = get_settings().db_url
    click.echo(f"{_safe(url)}: {migrate.current(url) or 'no schema (run `cascade db upgrade`)'}")
