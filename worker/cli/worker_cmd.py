"""`cascade worker --tier NAME`: the worker pool of one tier (distributed mode)."""
from __future__ import annotations

import os
import socket
from signal import SIGTERM
from urllib.parse import urlsplit

import click
from celery.signals import setup_logging

from worker.cli.common import load_portfolio_option, user_errors
from worker.config.credentials import redact_url
from worker.config.logs import configure_logging
from worker.config.settings import get_settings
from worker.models.preflight import ensure_signals, verify_later
from worker.ops import metrics
from worker.ops.canary import Canary, canary_queue
from worker.ops.migrate import current
from worker.queue.app import limit_remote_control
from worker.queue.catalog import Catalog
from worker.queue.dispatch import worker_queues
from worker.queue.runtime import Runtime
from worker.queue.sweeper import Sweeper
from worker.queue.tasks import make_app

_LOCAL = {"127.0.0.1", "localhost", "::1", ""}


def check_broker_credentials(settings) -> None:
    """A tier worker refuses a broker anyone on the network can use: a non-local
    Redis URL must carry a user or password (CASCADE_ALLOW_OPEN_BROKER overrides)."""
    url = urlsplit(settings.broker)
    if url.scheme in ("redis", "rediss") and not (url.password or url.username) and url.hostname not in _LOCAL \
            and not settings.allow_open_broker:
        raise click.ClickException(
            f"the broker {redact_url(settings.broker)} has no credentials: anyone who reaches it controls the "
            "workers. Give Redis an ACL user and password (docs/operations.md, Security) and put them in "
            "CASCADE_BROKER_URL as ${NAME} secrets, or set CASCADE_ALLOW_OPEN_BROKER=true")


@click.command()
@click.option("--tier", "tier_name", required=True, help="the tier whose queue this pool consumes")
@click.option("--portfolio", "portfolio_path", type=click.Path(dir_okay=False), help="portfolio file (default: $CASCADE_PORTFOLIO)")
@click.option("--concurrency", "-c", type=click.IntRange(min=1), help="parallel jobs (threads pool; default $CASCADE_WORKER_CONCURRENCY)")
@click.option("--pool", type=click.Choice(["threads", "solo"]), help="default: solo for in-process models and for one thread, else threads")
@click.option("--events", is_flag=True, help="send task events (for Flower; costs throughput)")
@click.option("--metrics-port", type=click.IntRange(0, 65535),
              help="serve /metrics and /healthz on this port (default $CASCADE_METRICS_PORT; 0 = off)")
@click.option("--loglevel", "-l", default="INFO", show_default=True)
@click.option("--submit/--no-submit", default=True, show_default=True,
              help="also consume the cascade.submit queue (the Celery task API)")
@click.option("--allow-missing-signals", is_flag=True, default=None,
              help="start even if the tier's server answers the start-up probe without a signal the policy reads "
                   "(degraded: such decisions are logged and counted); default $CASCADE_ALLOW_MISSING_SIGNALS")
def worker(tier_name, portfolio_path, concurrency, pool, events, metrics_port, loglevel, submit,
           allow_missing_signals) -> None:
    """Consume only TIER's queue; pools of different tiers scale independently. Before
    it consumes, one probe checks that the tier's backend answers with every signal
    the policy reads there (waiting for a server that is not up yet)."""
    settings = get_settings()
    if settings.embedded:
        raise click.ClickException(
            "no broker configured: set CASCADE_BROKER_URL (and CASCADE_DATABASE_URL) for the distributed "
            "mode; in the embedded mode `cascade run` serves the tiers itself")
    with user_errors():
        portfolio = load_portfolio_option(portfolio_path)
        tier = portfolio.tier(tier_name)
        if current(settings.db_url) is None:
            raise click.ClickException("the database has no schema: run `cascade db upgrade` first")
        check_broker_credentials(settings)
        rt = Runtime(settings)
        rt.stages.on_statement(metrics.count_statement)
        catalog = Catalog.from_settings(settings, portfolio)
        app = make_app(settings, rt, catalog, tiers=[tier.name])
        # every portfolio the API may name, from its file: the copy in the database has its credentials blanked
        for named in catalog.portfolios.values():
            rt.add_portfolio(named)
        rt.jobs.save_portfolio(portfolio.digest, portfolio.spec())
        backend = rt.backend(tier)  # a local model loads once, here, before any job
        needs = rt.start_needs(portfolio, portfolio.index(tier.name))
        backend.check_needs(needs)
    threads = concurrency or max(settings.worker_concurrency, backend.stage_threads)
    # One stage at a time (one thread asked for): the consumer runs it in its own thread
    # (solo), one hand-over between threads fewer per message (0.2-0.3 ms of every stage
    # and escalation here, docs/throughput.md); a remote-control command (ping, inspect)
    # then waits for the stage in progress, as the next message does anyway
    pool = pool or ("solo" if backend.pool == "solo" or threads == 1 else "threads")
    if backend.pool == "solo" and pool != "solo":
        raise click.ClickException(f"the {backend.kind} backend holds one model per process: use --pool solo "
                                   "and start more processes to scale")
    conc = 1 if pool == "solo" else threads
    limit_remote_control(settings.remote_control)
    app.set_default()
    app.set_current()
    log_format = click.get_current_context().find_root().params.get("log_format", "auto")

    def _logging(**_kw):  # Celery's own loggers go through structlog too, in one format
        configure_logging(None if log_format == "auto" else log_format == "json", level=loglevel,
                          content=settings.log_content, static={"tier": tier.name})

    setup_logging.connect(_logging, weak=False)  # a local function: a weak reference would be collected
    port = settings.metrics_port if metrics_port is None else metrics_port
    health = [lambda: (True, f"starting: probing the backend of tier {tier.name}")]  # alive while it waits
    if port:
        metrics.watch_queues(settings.broker, settings.redis_prefix, [(t.name, t.queue_name) for t in portfolio.tiers])
        metrics.serve(port, health=lambda: health[0]())
    allow_missing = bool(allow_missing_signals or settings.allow_missing_signals)
    with user_errors():  # waits for a server not up yet; refuses one that lacks a signal (worker.models.preflight)
        checked = ensure_signals(backend, needs, allow_missing=allow_missing, wait=settings.preflight_wait)
    if checked.status == "unreachable":  # still down after PREFLIGHT_WAIT: serve (its jobs fall back), probe later
        verify_later(backend, needs, allow_missing=allow_missing, refuse=lambda _msg: os.kill(os.getpid(), SIGTERM))
    interval = settings.sweep_interval or max(0.5, settings.stale_after / 4)
    Sweeper(app, rt, tier, interval=interval, idle=settings.stale_after, chunk_size=settings.chunk_size).start()
    node = f"{tier.name}@{socket.gethostname()}"
    own_queue = canary_queue(tier.queue_name, node)
    probe = Canary(app, tier.name, own_queue, interval=settings.canary_interval, max_age=settings.canary_max_age)
    probe.start()
    health[0] = probe.health
    queues = [*worker_queues(tier.queue_name, submit=submit), own_queue]
    argv = ["worker", "-Q", ",".join(queues), "-n", node, "-P", pool, "-c", str(conc),
            "--without-gossip", "--without-mingle", "-l", loglevel]
    if events:
        argv.append("-E")
    click.echo(f"tier {tier.name}: queues {', '.join(queues)}, backend {backend.kind}, pool {pool} x{conc}"
               + (f", metrics on :{port}" if port else ""), err=True)
    app.worker_main(argv)

