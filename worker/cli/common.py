"""Helpers shared by the subcommands: clear one-line errors instead of tracebacks."""
from __future__ import annotations

import contextlib

import click

from router.portfolio import PortfolioError
from router.records import RecordsError


@contextlib.contextmanager
def user_errors():
    """Errors caused by the user's input become a clean message and exit code 2."""
    from worker.backends import BackendConfigError

    try:
        yield
    except (PortfolioError, RecordsError, BackendConfigError, ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None


def load_portfolio_option(path):
    """The portfolio given with --portfolio, else $CASCADE_PORTFOLIO; a clear error if neither."""
    from router.portfolio import load_portfolio
    from worker.settings import get_settings

    path = path or get_settings().portfolio
    if not path:
        raise click.ClickException("no portfolio: pass --portfolio FILE or set CASCADE_PORTFOLIO")
    return load_portfolio(path)
