"""`cascade flower`: Flower on the configured broker, with authentication on.

Flower's HTML pages and its `/api/...` both sit behind HTTP basic auth, so the
API answers the authenticated user (without auth Flower refuses every API call
and leaves its pages open to anyone: we never start it that way).
"""
from __future__ import annotations

import os
import re

import click

from worker.config.settings import get_settings
from worker.queue.tasks import make_app

_PAIR = re.compile(r"^[^:,\s]+:[^,\s]+$")


@click.command(context_settings={"ignore_unknown_options": True})
@click.option("--address", default="127.0.0.1", show_default=True, help="interface to listen on (0.0.0.0 in a container)")
@click.option("--port", default=5555, show_default=True, type=click.IntRange(1, 65535))
@click.option("--basic-auth", envvar="CASCADE_FLOWER_BASIC_AUTH", metavar="USER:PASSWORD[,USER:PASSWORD]",
              help="who may use Flower's pages and API (default $CASCADE_FLOWER_BASIC_AUTH); required")
@click.option("--events/--no-events", default=True, show_default=True,
              help="Flower turns task events on in every worker (tasks and workers show live; costs "
                   "throughput, see docs/operations.md); with --no-events only workers started with "
                   "`cascade worker --events` send them")
@click.argument("flower_args", nargs=-1, type=click.UNPROCESSED)
def flower(address, port, basic_auth, events, flower_args) -> None:
    """Start Flower on the configured broker. Extra arguments go to Flower as they are."""
    settings = get_settings()
    if settings.embedded:
        raise click.ClickException("no broker configured: set CASCADE_BROKER_URL (Flower watches the distributed mode)")
    if not basic_auth:
        raise click.ClickException("Flower needs credentials: pass --basic-auth USER:PASSWORD or set "
                                   "CASCADE_FLOWER_BASIC_AUTH (without them its pages are open and its API refuses)")
    if not all(_PAIR.match(p) for p in basic_auth.split(",")):
        raise click.ClickException("--basic-auth must be USER:PASSWORD pairs separated by commas")
    # through the environment, not argv: a password on the command line shows in `ps`
    os.environ["FLOWER_BASIC_AUTH"] = basic_auth
    os.environ.pop("FLOWER_UNAUTHENTICATED_API", None)
    app = make_app(settings)
    app.start(["flower", f"--address={address}", f"--port={port}", f"--enable_events={events}", *flower_args])
