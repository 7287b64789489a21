"""Helpers shared by the subcommands: a user's mistake is one plain line, never a traceback."""
from __future__ import annotations

import contextlib
import json

import click

from router.core.errors import UserError
from router.core.portfolio import load_portfolio
from worker.config.settings import get_settings


@contextlib.contextmanager
def user_errors():
    """A `UserError` (or a missing file) becomes a one-line message and exit code 1;
    anything else propagates and is reported as a bug by `worker.cli.main`."""
    try:
        yield
    except (UserError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None


def load_portfolio_option(path):
    """The portfolio given with --portfolio, else $CASCADE_PORTFOLIO; a clear error if neither."""
    path = path or get_settings().portfolio
    if not path:
        raise click.ClickException("no portfolio: pass --portfolio FILE or set CASCADE_PORTFOLIO")
    return load_portfolio(path)


def short(params: dict, width: int = 160) -> str:
    """Knobs on one line (a router's weights run to thousands of characters)."""
    text = json.dumps(params)
    return text if len(text) <= width else text[:width - 3] + "..."
