"""`cascade db upgrade|current`: schema migrations of the configured database."""
from __future__ import annotations

import click

from worker.config.credentials import redact_text, redact_url
from worker.config.settings import get_settings
from worker.ops import migrate


@click.group()
def db() -> None:
    """Database migrations (Alembic)."""


@db.command()
def upgrade() -> None:
    """Create or upgrade the schema to the newest revision."""
    url = get_settings().db_url
    try:
        migrate.upgrade(url)
    except Exception as e:  # connection refused, permissions, ...
        raise click.ClickException(f"cannot upgrade {redact_url(url)}: {redact_text(str(e))}") from None
    click.echo(f"{redact_url(url)}: at revision {migrate.current(url)}")


@db.command()
def current() -> None:
    """Print the schema revision of the database."""
    url = get_settings().db_url
    click.echo(f"{redact_url(url)}: {migrate.current(url) or 'no schema (run `cascade db upgrade`)'}")
