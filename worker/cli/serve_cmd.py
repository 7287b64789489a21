"""`cascade serve`: the HTTP task API (FastAPI on uvicorn). With nothing configured it
runs embedded (SQLite under CASCADE_HOME, the tier workers in this process), so it
answers at once; with CASCADE_BROKER_URL and CASCADE_DATABASE_URL it only submits and
reads, and `cascade worker --tier T` processes do the work."""
from __future__ import annotations

import click
import uvicorn

from worker.cli.common import load_portfolio_option, user_errors
from worker.client import create_app
from worker.config.settings import get_settings


@click.command()
@click.option("--portfolio", "portfolio_path", type=click.Path(dir_okay=False),
              help="the portfolio served as cascade/default (default: $CASCADE_PORTFOLIO); more from $CASCADE_PORTFOLIO_DIR")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--log-level", default="warning", show_default=True)
def serve(portfolio_path, host, port, log_level) -> None:
    """Serve /v1/jobs, /v1/batches, /v1/chat/completions and /v1/models (OpenAPI at /openapi.json)."""
    settings = get_settings()
    with user_errors():
        portfolio = load_portfolio_option(portfolio_path) if (portfolio_path or settings.portfolio) else None
        if portfolio is None and settings.portfolio_dir is None:
            raise click.ClickException("no portfolio: pass --portfolio FILE, or set CASCADE_PORTFOLIO or "
                                       "CASCADE_PORTFOLIO_DIR")
        app = create_app(settings, portfolio)
    mode = "embedded" if settings.embedded else "distributed"
    click.echo(f"cascade serve: http://{host}:{port} ({mode} mode); OpenAPI at /openapi.json", err=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
