"""Schema migrations (Alembic), run by `cascade db upgrade` and, in the embedded
mode, automatically before a run."""
from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext

from worker.store.engine import engine_for


def _config(url: str) -> Config:
    cfg = Config()
    # `migrations/` sits beside `worker/`, in a checkout and in site-packages alike
    cfg.set_main_option("script_location", str(Path(__file__).resolve().parents[2] / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    with engine_for(url).begin() as conn:
        cfg = _config(url)
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def current(url: str) -> str | None:
    with engine_for(url).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
