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
