"""The Python client as users import it (docs/api.md), and the one place where the
service is wired to run stages in its own process.

    from worker.client import Client
    with Client() as c:
        print(c.run("What is 2 + 2?")["answer"])

worker.service never imports the stage task: its Client submits and reads, and is
given whatever runs the stages. Here, in the embedded mode (nothing configured:
SQLite and in-process queues) it is given the embedded tier workers of
worker.queue.embedded, threads of this process running the same stage task as a
`cascade worker`; so the client and `cascade serve` work on a bare checkout. In the
distributed mode the tier workers are other processes and nothing starts here.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from router.core.portfolio import Portfolio
from worker.config.settings import Settings, get_settings
from worker.queue.embedded import tier_workers
from worker.queue.submit import TENANT_DEFAULT
from worker.service import client as service
from worker.service.api import create_app as service_app
from worker.service.client import JobNotFound

__all__ = ["AsyncClient", "Client", "JobNotFound", "create_app"]


class Client(service.Client):
    def __init__(self, settings: Settings | None = None, *, portfolio: Portfolio | str | Path | None = None,
                 tenant: str = TENANT_DEFAULT, workers: bool | None = None):
        """workers: run the tiers in this process (default: only in the embedded mode)."""
        settings = settings or get_settings()
        here = settings.embedded if workers is None else workers
        super().__init__(settings, portfolio=portfolio, tenant=tenant,
                         tier_workers=tier_workers(settings) if here else None)


class AsyncClient(service.AsyncClient):
    sync_class = Client


def create_app(settings: Settings | None = None, portfolio: Portfolio | None = None, *,
               workers: bool | None = None) -> FastAPI:
    """`cascade serve`'s application: the HTTP service with this module's Client."""
    settings = settings or get_settings()
    return service_app(settings, client_factory=lambda: Client(settings, portfolio=portfolio, workers=workers))
